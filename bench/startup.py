"""Start-up time of `python -m pretrain`: from the command to its first training step (issue 21).

    python bench/startup.py --data-dir DIR [--runs 3] [--config configs/train/tiny_cpu.yaml]
                            [--out DIR] [extra overrides ...]

Runs the command `--runs` times in turn (fresh run directory each time, so every run is a fresh
start, not a resume) and notes, per run, when each console line arrived: the `+N.Ns` stage
stamps the console prints itself and the arrival of the `step 1/` line (the first step done;
metrics.jsonl gets it at the same moment). The run is cut short after a few steps
(`max_steps=6`, the schedule's warm-up is 5): only the way to the first step is measured.
Prints per run the seconds to the first step and the stage that took longest, then the
median; writes startup.json into --out (or $OUT) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[train\] (.*?) \.\.\. \(\+([0-9.]+)s\)")


def one_run(args: argparse.Namespace) -> dict:
    run_dir = tempfile.mkdtemp(prefix="mop_startup_")
    cmd = [
        sys.executable, "-m", "pretrain", "--config", args.config,
        f"data.data_dir={args.data_dir}", f"run_dir={run_dir}", "max_steps=6", *args.overrides,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    stages: list[tuple[str, float]] = []  # (stage, seconds since the command, by our clock)
    first_step = None
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        m = STAMP.match(line)
        if m:
            stages.append((m.group(1), now))
        elif first_step is None and line.startswith("[train] step 1/"):
            first_step = now
            stages.append(("first step", now))
    rc = proc.wait()
    shutil.rmtree(run_dir, ignore_errors=True)
    spans = [(a[0], b[1] - a[1]) for a, b in zip(stages, stages[1:])]
    return {
        "rc": rc,
        "first_step_s": first_step,
        "stages": stages,
        "longest": max(spans, key=lambda s: s[1]) if spans else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="a tokenized tiny data set (data_prep)")
    p.add_argument("--config", default="configs/train/tiny_cpu.yaml")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    runs = []
    for i in range(args.runs):
        r = one_run(args)
        runs.append(r)
        longest = r["longest"]
        print(
            f"[startup] run {i + 1}: rc {r['rc']}, first step at {r['first_step_s']:.1f} s; "
            f"longest stage: {longest[0]!r} {longest[1]:.1f} s"
            if r["first_step_s"] is not None and longest
            else f"[startup] run {i + 1}: rc {r['rc']}, no first step",
            flush=True,
        )
        for name, at in r["stages"]:
            print(f"    +{at:5.1f}s  {name}")
    firsts = [r["first_step_s"] for r in runs if r["first_step_s"] is not None]
    median = statistics.median(firsts) if firsts else None
    load = {"before": load_before, "after": os.getloadavg()}
    if median is not None:
        print(f"[startup] median first step {median:.1f} s over {len(firsts)} runs; load {load}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "config": args.config,
            "runs": runs,
            "median_first_step_s": median,
            "load_average": load,
        }
        (out / "startup.json").write_text(json.dumps(result, indent=2))
    return 0 if len(firsts) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
