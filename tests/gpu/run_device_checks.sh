#!/usr/bin/env bash
# Run ON the lent GPU machine (one device call; carry .whl, see fetch_device_deps.sh):
#   bash tests/gpu/run_device_checks.sh
# Installs the carried packages into /tmp/site, builds grouped_gemm + megablocks (with the
# CUDA 13 patch) against the machine's torch, then runs tests/gpu (megablocks parity with the
# torch backend for E=8/64, bf16 training + SIGTERM/resume) and bench/moe_backends.py.
# Everything it measures lands under $OUT (copy the numbers into bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
  .whl/deepspeed-0.19.8.tar.gz .whl/stanford_stk-0.7.1.tar.gz
PY=python3 bash docker/build_gpu_deps.sh .whl 2>&1 | tee "$OUT/build_gpu_deps.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
# One device call is precious: a failing test must not cost the benchmark's numbers.
python3 -m pytest -s -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" \
  || echo "tests/gpu FAILED (see tests_gpu.log); running the benchmark anyway"
python3 bench/moe_backends.py 2>&1 | tee "$OUT/bench_moe_backends.log"
