#!/usr/bin/env bash
# Run HERE, where pip reaches a package index (whichever pip's own configuration names),
# before a session's device call: fills .whl/ (git-ignored) with what the lent GPU machine
# lacks (it has no network): deepspeed's sdist and its pure-Python needs (pydantic, hjson),
# transformers (the benchmark's baseline; the machine's own is older), and the sdists of the
# GPU kernels (stanford-stk, grouped_gemm, megablocks; built there by run_device_checks.sh).
#   bash tests/gpu/fetch_device_deps.sh     then carry `.whl` in the device call
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude)  # also right in a git worktree
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
# Wheels for the GPU machine's Python (3.12, x86_64), whatever this machine runs.
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps -d .whl "${plat[@]}" \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  hjson==3.1.0 transformers==5.23.0
# sdists: `pip download` would build their metadata (grouped_gemm's needs a CUDA torch), so
# fetch_sdist.py asks pip's finder for the file on the same index and downloads it as is.
for spec in deepspeed==0.19.8 stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0; do
  "$PY" tests/gpu/fetch_sdist.py .whl "${spec%%==*}" "${spec##*==}"
done
du -sh .whl && ls .whl
