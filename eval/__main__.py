"""`python -m eval --checkpoint RUN_DIR[/checkpoints/step_X] --suite ppl|knowledge|commonsense|
math|synthetic|all|<task> [--limit N] [--data-dir DIR] [--benchmark-dir DIR] [--batch-size B]
[--device D]`

Writes (merges into) `results.json` beside the evaluated checkpoint (schema: mop/results.py)
and prints a table of what it computed. `--suite` takes one name or a comma list; `all` is
ppl + knowledge + commonsense + math (synthetic tasks only make sense for models trained on
them, so they are asked for by name). Under torchrun every rank evaluates its share and rank 0
writes the file.

Benchmark suites run one task at a time and each finished task is written at once, so a job
killed midway (preemption, time limit) loses at most the task in flight: rerunning the same
command skips every task already in results.json with the same settings (limit, shots, dtype,
generation length); `--redo` evaluates them again.

`--data-dir` replaces the training data directory recorded in the checkpoint (tokenizer,
validation sequences, synthetic test set); `--benchmark-dir` holds local benchmark files for
the lm-eval tasks (eval/tasks), else the harness reads its (offline) dataset cache.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

from eval.suites import BENCHMARKS, SUITES, parse_suites
from mop.cli import ArgumentParser, check_device, examples
from mop.errors import ConfigError, DataError, cli_entry
from mop.progress import eta, fmt_duration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m eval",
        description=__doc__.split("\n")[0],
        epilog=examples(
            "python -m eval --checkpoint runs/moe_d512_e8 --suite ppl",
            "python -m eval --checkpoint runs/moe_d512_e8 --suite knowledge,commonsense --limit 100",
            "python -m eval --checkpoint runs/x/checkpoints/step_00010000 --suite all",
            "python -m eval --checkpoint runs/pb_1e5/synth12_dense_d256 --suite synthetic",
            "torchrun --nproc_per_node=8 -m eval --checkpoint runs/x --suite all",
            notes="Results are merged into results.json beside the checkpoint; tasks already "
            "there with the same settings are skipped (--redo evaluates them again).",
        ),
    )
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step dir or HF")
    p.add_argument(
        "--suite",
        required=True,
        help=f"{'|'.join(SUITES)}|all or a benchmark task (eval/tasks), or a comma list",
    )
    p.add_argument("--limit", type=int, help="at most N sequences / documents per task")
    p.add_argument("--data-dir", help="training data directory (default: the checkpoint's)")
    p.add_argument("--benchmark-dir", help="local benchmark files for the lm-eval tasks")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if there is one)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="autocast dtype"
    )
    p.add_argument("--num-fewshot", type=int, help="override every task's shot count")
    p.add_argument(
        "--max-gen-toks", type=int, default=256, help="generation length cap (default 256)"
    )
    p.add_argument("--name", help="model name in results.json (default: the run directory's)")
    p.add_argument("--redo", action="store_true", help="re-evaluate tasks already in results.json")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Numbers, device and paths, before torch is imported or a checkpoint is read."""
    for flag, low in (("limit", 1), ("batch_size", 1), ("max_gen_toks", 1), ("num_fewshot", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    for flag in ("checkpoint", "data_dir", "benchmark_dir"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            name = "checkpoint" if flag == "checkpoint" else f"--{flag.replace('_', '-')}"
            raise DataError(f"{name} path does not exist: {path}")
    check_device(args.device)


def task_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a benchmark score depends on besides the checkpoint; stored with each task."""
    return {
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "dtype": args.dtype,
        "max_gen_toks": args.max_gen_toks,
    }


def finished_tasks(checkpoint_dir, settings: dict[str, Any]) -> set[str]:
    """Tasks of results.json evaluated with exactly these settings."""
    from mop.fileio import read_json
    from mop.results import results_path

    path = results_path(checkpoint_dir)
    if not path.is_file():
        return set()
    tasks = read_json(path).get("tasks", {})
    return {name for name, entry in tasks.items() if entry.get("settings") == settings}


def _same_on_every_rank(value: Any) -> Any:
    """Rank 0's value everywhere: every rank must run the same harness calls."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_distributed(device: str | None) -> tuple[int, int, str]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process group, one device per rank."""
    import torch
    import torch.distributed as dist

    from pretrain.launch import cuda_device_index

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda and (device is None or (device == "cuda" and world > 1)):
        # from the GPUs visible: one per task under SLURM's per-task binding
        device = f"cuda:{cuda_device_index(local, torch.cuda.device_count())}"
    elif device is None:
        device = "cpu"
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def rank0_wait_group(units: list[tuple[str, str]]) -> Any:
    """A CPU (gloo) group whose barrier the other ranks wait at while rank 0 runs a suite
    alone (the synthetic tasks), or None when there is no such suite or no other rank.

    Waiting in the next suite's first NCCL collective instead would abort the job once rank 0
    took longer than the process-group timeout (10 minutes). A dead rank 0 still ends the wait
    at once (its connection closes; torchrun and srun stop the other ranks)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if not any(unit in RANK0_ONLY for unit, _ in units):
        return None
    return dist.new_group(backend="gloo", timeout=RANK0_WAIT)  # collective: every rank


RANK0_ONLY = {"synthetic"}  # single-process evaluations: the other ranks have nothing to do
RANK0_WAIT = datetime.timedelta(days=7)  # as long as rank 0 takes: it ends when rank 0 does


def run_suite_section(name: str, lm, args, loaded) -> tuple[str, dict[str, Any]]:
    """(results.json section, its data) for `ppl`, `synthetic`, or one benchmark task."""
    if name in ("ppl", "synthetic") and loaded.ref.kind == "hf" and args.data_dir is None:
        raise ConfigError(f"--suite {name} of an HF export needs --data-dir (its data directory)")
    if name == "ppl":
        from eval.perplexity import evaluate_perplexity

        return "ppl", evaluate_perplexity(
            lm.model,
            loaded.data_dir,
            batch_size=args.batch_size,
            limit=args.limit,
            tokenizer_sha256=loaded.tokenizer.hash,
            autocast_dtype=lm.autocast_dtype,
        )
    if name == "synthetic":
        try:
            from eval.synthetic import run_synthetic
        except ImportError as exc:
            raise ConfigError(f"the synthetic suite is not available: {exc}") from None
        data = run_synthetic(
            lm.model, loaded.tokenizer, loaded.data_dir, args.limit, lm.device, args.batch_size
        )
        return "synthetic", data
    try:
        from eval.tasks import run_suite
    except ImportError as exc:
        raise ConfigError(f"the benchmark suites are not available: {exc}") from None
    data = run_suite(lm, name, args.benchmark_dir, args.limit, args.num_fewshot)
    return "tasks", {
        task: {**entry, "settings": task_settings(args)} for task, entry in data.items()
    }


def format_table(doc: dict[str, Any], sections: list[str]) -> str:
    rows: list[tuple[str, str]] = []
    if "ppl" in sections and "ppl" in doc:
        ppl = doc["ppl"]
        rows += [("ppl/loss", f"{ppl['loss']:.4f}"), ("ppl/perplexity", f"{ppl['perplexity']:.3f}")]
    if "tasks" in sections:
        for task, t in sorted(doc.get("tasks", {}).items()):
            rows.append(
                (f"{t['category']}/{task} ({t['primary']}, n={t['n']})", f"{t['score']:.4f}")
            )
        for cat, score in doc.get("categories", {}).items():
            rows.append((f"category/{cat}", f"{score:.4f}"))
    if "synthetic" in sections:
        for task, metrics in sorted(doc.get("synthetic", {}).items()):
            for key, value in metrics.items():
                if isinstance(value, float):
                    rows.append((f"synthetic/{task}/{key}", f"{value:.4f}"))
    width = max((len(k) for k, _ in rows), default=10)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _units(suites: list[str]) -> list[tuple[str, str]]:
    """(what one call evaluates, its suite): ppl / synthetic whole, benchmarks task by task."""
    from eval.tasks import TASKS, task_names

    units: list[tuple[str, str]] = []
    for suite in suites:
        if suite in BENCHMARKS:
            units += [(task, suite) for task in task_names(suite)]
        elif suite in TASKS:
            units.append((suite, TASKS[suite].category))
        else:
            units.append((suite, suite))
    return list(dict.fromkeys(units))  # a task asked for alone and in its suite runs once


def check_generation_room(units: list[tuple[str, str]], skip: set[str], lm) -> None:
    """Refuse, before the first task, a generation task whose length (its own max_gen_toks,
    else --max-gen-toks) leaves no context in the model's window: it would otherwise stop the
    run midway, after every task before it."""
    from lm_eval.models.utils import normalize_gen_kwargs

    from eval.tasks import TASKS, harness_config

    too_long: dict[str, int] = {}
    for unit, _ in units:
        spec = TASKS.get(unit)
        if spec is None or unit in skip:
            continue
        cfg = harness_config(spec, next(iter(spec.subjects.values()), None))
        if cfg.get("output_type") != "generate_until":
            continue
        kwargs = dict(cfg.get("generation_kwargs") or {})
        gen = int(normalize_gen_kwargs(kwargs, lm.max_gen_toks)["max_gen_toks"])
        if gen >= lm.max_length:
            too_long[unit] = gen
    if too_long:
        tasks = ", ".join(f"{task} (max_gen_toks={gen})" for task, gen in too_long.items())
        own = sorted(task for task, gen in too_long.items() if gen != lm.max_gen_toks)
        fix = f"pass --max-gen-toks below {lm.max_length}"
        if own:
            fix += f"; {', '.join(own)} set their own length: leave them out of --suite"
        raise ConfigError(
            f"{tasks}: no room for context in the model's max_seq_len={lm.max_length}, "
            f"nothing evaluated: {fix}"
        )


def running_scores(running: dict[str, list[float]]) -> str:
    """'knowledge 0.1234 (2 tasks), math 0.0500 (1 task); ' -- mean primary score per suite."""
    parts = [
        f"{suite} {sum(v) / len(v):.4f} ({len(v)} task{'s' if len(v) > 1 else ''})"
        for suite, v in running.items()
    ]
    return f"running mean: {', '.join(parts)}; " if parts else ""


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suites = parse_suites(args.suite)
    check_args(args)
    rank, world, device = init_distributed(args.device)

    from eval.checkpoint import load_for_eval
    from eval.lm_adapter import MopLM
    from mop.results import load_results, results_path, update_results

    loaded = load_for_eval(args.checkpoint, data_dir=args.data_dir, device=device)
    lm = MopLM(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=args.batch_size,
        device=device,
        dtype=args.dtype,
        max_gen_toks=args.max_gen_toks,
    )
    header = loaded.header(args.name)
    if rank == 0:
        print(f"[eval] {header['checkpoint']} (step {header['step']}) on {device}", flush=True)
    doc: dict[str, Any] = {}
    done: list[str] = []
    skip = set() if args.redo else finished_tasks(loaded.ref.path, task_settings(args))
    skip = _same_on_every_rank(skip if rank == 0 else None)
    units = _units(suites)
    wait_group = rank0_wait_group(units)  # collective: before any rank can be ahead
    check_generation_room(units, skip, lm)
    running: dict[str, list[float]] = {}  # suite -> primary scores of the tasks done so far
    started = time.perf_counter()
    for i, (unit, suite) in enumerate(units, 1):
        t0 = time.perf_counter()
        if unit in skip:
            if rank == 0:
                print(
                    f"[eval] task {i}/{len(units)} {unit}: already in results.json (same settings), skipped"
                )
                done.append("tasks")
            continue
        if rank == 0:
            print(f"[eval] task {i}/{len(units)} {unit} ({suite}) ...", flush=True)
        if unit in RANK0_ONLY:
            if rank == 0:
                if wait_group is not None:
                    print(f"[eval] {unit} runs on rank 0; {world - 1} ranks wait", flush=True)
                section, data = run_suite_section(unit, lm, args, loaded)
            if wait_group is not None:
                import torch.distributed as dist

                dist.barrier(group=wait_group)  # every rank leaves the suite together
        else:
            section, data = run_suite_section(unit, lm, args, loaded)
        if rank != 0:
            continue
        meta = {
            "suite": suite,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device),
            "world_size": world,
            "limit": args.limit,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if section == "tasks":  # when and where each task ran, beside its score
            data = {task: {**entry, "meta": meta} for task, entry in data.items()}
        doc = update_results(loaded.ref.path, header, section, data, meta)
        done.append(section)
        if section == "tasks":
            for task, entry in data.items():
                print(f"[eval] {task}: {entry['primary']} {entry['score']:.4f} (n={entry['n']})")
                running.setdefault(suite, []).append(entry["score"])
        left = eta(i, len(units), time.perf_counter() - started)
        print(f"[eval] {running_scores(running)}ETA {fmt_duration(left)}", flush=True)
    if rank == 0:
        if not doc and results_path(loaded.ref.path).is_file():
            doc = load_results(loaded.ref.path)  # everything was skipped: show the file
        print(format_table(doc, list(dict.fromkeys(done))))
        print(f"[eval] wrote {results_path(loaded.ref.path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
