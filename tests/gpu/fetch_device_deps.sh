#!/usr/bin/env bash
# Run HERE (with network to PyPI), before a session's device call: fills .whl/ (git-ignored)
# with what the lent GPU machine lacks (it has no network): deepspeed and its pure-Python
# needs, pydantic, and the sdists of the GPU kernels (built there by run_device_checks.sh).
#   bash tests/gpu/fetch_device_deps.sh     then carry `.whl` in the device call
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps -d .whl "${plat[@]}" \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  hjson==3.1.0
# sdists: pip would try to build their metadata (needs CUDA), so fetch the files directly
sdist() {  # sdist PROJECT FILE
  local url
  url=$(curl -fsS "https://pypi.org/simple/$1/" | grep -o "href=\"[^\"]*$2[^\"]*\"" | head -n 1 \
        | sed 's/^href="//; s/#.*//; s/"$//')
  [ -n "$url" ] || { echo "no $2 on the index" >&2; exit 1; }
  curl -fsS -o ".whl/$2" "$url"
}
sdist deepspeed deepspeed-0.19.8.tar.gz
sdist grouped-gemm grouped_gemm-0.3.0.tar.gz
sdist megablocks megablocks-0.10.0.tar.gz
sdist stanford-stk stanford_stk-0.7.1.tar.gz
du -sh .whl && ls .whl
