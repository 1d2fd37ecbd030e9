"""End-to-end demo on generated data, small enough for a laptop CPU.

    python -m mop.demo --out demo_out        (what `make demo` runs)

1. writes tiny local files in the real hub schemas (parquet, jsonl.zst, JSON array, ...),
2. trains a BPE tokenizer on the mixture, tokenizes it into shards, merges the manifest,
   mixture plan and validation sequences (configs/data/tiny.yaml),
3. generates the synthetic phone-book and shortest-path tasks.
Every step is the real CLI, so the printed commands are what a user runs on a cluster.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run([sys.executable, *cmd], check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mop.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="output directory (recreated)")
    parser.add_argument("--docs", type=int, default=60, help="documents per generated file")
    args = parser.parse_args(argv)
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()

    from data_prep.samples import write_tiny_mixture

    raw = write_tiny_mixture(out / "raw", n_docs=args.docs)
    print(f"[demo] wrote sample sources in the hub schemas: {', '.join(sorted(raw))}")

    cfg = "configs/data/tiny.yaml"
    over = [f"output_dir={out / 'data'}"]
    over += [f"sources.{i}.data_files={out / 'raw' / k}" for i, k in enumerate(_tiny_keys())]
    _run(["-m", "data_prep", "tokenizer", "--config", cfg, *over])
    _run(["-m", "data_prep", "tokenize", "--config", cfg, *over])
    _run(["-m", "data_prep", "verify", "--data-dir", str(out / "data")])
    syn = out / "synthetic"
    _run(
        [
            "-m",
            "data_prep",
            "synthetic",
            "phonebook",
            "--out",
            str(syn / "phonebook"),
            "--size",
            "2000",
            "--seed",
            "0",
        ]
    )
    _run(
        [
            "-m",
            "data_prep",
            "synthetic",
            "shortest-path",
            "--out",
            str(syn / "shortest_path"),
            "--size",
            "500",
            "--seed",
            "0",
            "--num-test",
            "50",
        ]
    )
    _run(
        [
            "-m",
            "data_prep",
            "synthetic",
            "memorization",
            "--out",
            str(syn / "memorization"),
            "--size",
            "256",
            "--seed",
            "0",
        ]
    )
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f}s; outputs under {out}")
    return 0


def _tiny_keys() -> list[str]:
    import yaml

    data = yaml.safe_load((REPO / "configs/data/tiny.yaml").read_text())
    return [s["source"] for s in data["sources"]]


if __name__ == "__main__":
    sys.exit(main())
