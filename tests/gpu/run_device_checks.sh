#!/usr/bin/env bash
# The one command of a GPU loan (issue 14). Run ON the lent GPU machine, its own torch, no
# network, with .whl carried in (fill it first, here: bash tests/gpu/fetch_device_deps.sh):
#   bash tests/gpu/run_device_checks.sh
# bench/device_kit.py installs the carried packages, builds grouped_gemm + megablocks (with the
# CUDA 13 patch) against the machine's torch, runs tests/gpu, bench/train_throughput.py and
# bench/moe_backends.py, each step with its own time cap, all within 8 minutes. It leaves
# exactly $OUT/summary.json and $OUT/logs.tar.gz and prints the summary last.
# `bash tests/gpu/run_device_checks.sh --smoke` is the same on a CPU with tiny shapes (CI).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out}
exec "${PY:-python3}" bench/device_kit.py --out "$OUT" "$@"
