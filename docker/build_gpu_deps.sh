#!/usr/bin/env bash
# Build the GPU-only kernels (stanford-stk, grouped_gemm, megablocks) against the torch that
# is already installed. megablocks 0.10.0 pins torch 2.7.0 in its metadata, hence --no-deps;
# its CUDA extension does not compile with CUDA 13 (CUB dropped `debug_synchronous`,
# databricks/megablocks#180), so the two calls in csrc/cumsum.h are patched when needed.
#   bash docker/build_gpu_deps.sh [WHEEL_OR_SDIST_DIR]   (offline: point at downloaded sdists)
set -euo pipefail
PY=${PY:-python3}
SRC=${1:-}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fetch() {  # fetch PROJECT VERSION FILE into $work: from $SRC if given, else PyPI
  if [ -n "$SRC" ]; then
    cp "$SRC/$3" "$work/"
  else  # metadata of these sdists is built with the installed torch (needs --no-build-isolation)
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "$1==$2"
  fi
}
if [ -n "$SRC" ]; then
  "$PY" -m pip install -q --no-deps --no-build-isolation "$SRC"/stanford_stk-0.7.1.tar.gz
else
  "$PY" -m pip install -q --no-deps stanford-stk==0.7.1
fi
fetch grouped_gemm 0.3.0 grouped_gemm-0.3.0.tar.gz
"$PY" -m pip install -q --no-deps --no-build-isolation "$work"/grouped_gemm-0.3.0.tar.gz
fetch megablocks 0.10.0 megablocks-0.10.0.tar.gz
tar -xzf "$work"/megablocks-0.10.0.tar.gz -C "$work"
cuda_major=$("$PY" -c "import torch; print((torch.version.cuda or '0').split('.')[0])")
if [ "$cuda_major" -ge 13 ]; then
  echo "[gpu-deps] CUDA $cuda_major: removing CUB's debug_synchronous argument in csrc/cumsum.h"
  perl -0pi -e 's/stream,\s*debug_synchronous\)/stream)/g' "$work"/megablocks-0.10.0/csrc/cumsum.h
  if grep -q 'debug_synchronous))' "$work"/megablocks-0.10.0/csrc/cumsum.h; then
    echo "[gpu-deps] cumsum.h patch did not apply" >&2; exit 1
  fi
fi
"$PY" -m pip install -q --no-deps --no-build-isolation "$work"/megablocks-0.10.0
"$PY" -c "import megablocks, grouped_gemm, stk; print('[gpu-deps] megablocks', megablocks.__version__ if hasattr(megablocks, '__version__') else 'ok')"
