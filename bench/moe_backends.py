"""Benchmark the MoE backends (torch vs megablocks) on one GPU; prints a table, writes JSON.

    python bench/moe_backends.py --experts 8 64 --tokens 16384 --d 1024 --ffn 2688 --out results/

Reuses tests/gpu/test_moe_backends.py (same comparison: errors vs an fp32 reference, timings).
JSON goes to --out or $OUT when set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.gpu.test_moe_backends import (  # noqa: E402
    compare_backends,
    format_rows,
    megablocks_usable,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    ok, why = megablocks_usable()
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    rows = []
    for e in args.experts:
        rows.append(compare_backends(e, args.tokens, args.d, args.ffn, args.top_k, args.iters))
        print(format_rows(rows[-1:]), flush=True)
    print("\n" + format_rows(rows))
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
