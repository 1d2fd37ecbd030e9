"""Where the CPU profile's step spends its time, ours against transformers (issue 21).

    python bench/profile_cpu_step.py [--model dense_d1024|moe_d1024_e8|moe_d1024_e64]
                                     [--steps 3] [--top 25] [--set key=value ...]

Builds the two cases of one model of `bench/train_throughput.py --cpu` (same shapes, same
recipe, same host-memory setting), warms each up, then records `--steps` steps of each under
torch.profiler, the two taking turns step by step (a shared machine's load hits both alike).
Prints per op the self CPU ms per step of ours and theirs and the difference, largest
differences first; ops of ours are also grouped by phase (forward, loss, backward, engine step)
through record_function labels put around the trainer's calls for the profile only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as tt  # noqa: E402  (bench/ is on sys.path when run as a script)


def label_phases(trainer) -> None:
    """record_function labels around the engine's calls (profile only: wraps the instance)."""
    import torch

    engine = trainer.engine
    for name in ("forward", "backward", "step"):
        original = getattr(engine, name)

        def wrapped(*a, _f=original, _n=name, **k):
            with torch.profiler.record_function(f"phase:{_n}"):
                return _f(*a, **k)

        setattr(engine, name, wrapped)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dense_d1024", choices=sorted(tt.CPU_RATIO_FLOORS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1: per-op times free of "
        "the waits a loaded machine adds to every parallel region)",
    )
    p.add_argument("--set", nargs="*", default=[], help="train config overrides for ours")
    args = p.parse_args(argv)
    import os

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pretrain.host_memory import keep_freed_host_memory

    keep_freed_host_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    targs = tt.parse_args(["--cpu", "--set", *args.set])
    selected = [c for c in tt.cases(False) if c.model == args.model and not c.compile]
    selected = [c for c in selected if not tt.skip_reason(c, targs, False)]
    built = [tt.build_case(c, targs, False) for c in selected]
    for b in built:
        if b.row["status"] != "ok":
            print(b.row)
            return 1
    ours_b = next(b for b in built if b.row["impl"] == "ours")
    label_phases(ours_b.keep[0])
    for _ in range(args.warmup):
        for b in built:
            b.step()
    # One profiler per step (a stopped profiler does not restart): per-op sums accumulate.
    acc: dict[str, dict[str, list[float]]] = {"ours": defaultdict(lambda: [0.0, 0, 0.0]),
                                              "transformers": defaultdict(lambda: [0.0, 0, 0.0])}  # fmt: skip
    walls: dict[str, list[float]] = defaultdict(list)
    load = os.getloadavg()
    for _ in range(args.steps):
        for b in built:
            impl = b.row["impl"]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                s = time.perf_counter()
                b.step()
                walls[impl].append(time.perf_counter() - s)
            for e in prof.key_averages():
                a = acc[impl][e.key]
                a[0] += e.self_cpu_time_total / 1e3 / args.steps
                a[1] += e.count
                a[2] += e.cpu_time_total / 1e3 / args.steps
    mine = {k: (v[0], v[1] // args.steps) for k, v in acc["ours"].items()}
    theirs = {k: (v[0], v[1] // args.steps) for k, v in acc["transformers"].items()}
    print(
        f"\n{args.model}: {args.steps} profiled steps each, load {load[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after; torch threads {torch.get_num_threads()}"
    )
    for impl, w in walls.items():
        print(f"  {impl}: wall ms per step (profiled) {[round(x * 1e3) for x in w]}")
    keys = set(mine) | set(theirs)
    rows = []
    for k in keys:
        if k.startswith("phase:") or k.startswith("ProfilerStep"):
            continue
        m, mc = mine.get(k, (0.0, 0))
        t, tc = theirs.get(k, (0.0, 0))
        rows.append((m - t, k, m, mc, t, tc))
    rows.sort(key=lambda r: -abs(r[0]))
    print(
        f"\n{'op':50s} {'ours ms':>9s} {'calls':>6s} {'theirs ms':>9s} {'calls':>6s} {'diff':>8s}"
    )
    for d, k, m, mc, t, tc in rows[: args.top]:
        print(f"{k[:50]:50s} {m:9.1f} {mc:6d} {t:9.1f} {tc:6d} {d:+8.1f}")
    tot_m = sum(v for v, _ in mine.values())
    tot_t = sum(v for v, _ in theirs.values())
    print(f"{'total self CPU':50s} {tot_m:9.1f} {'':6s} {tot_t:9.1f} {'':6s} {tot_m - tot_t:+8.1f}")
    print("\nours by phase (CPU ms per step, self + children):")
    for k, v in sorted(acc["ours"].items()):
        if k.startswith("phase:"):
            print(f"  {k:20s} {v[2]:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
