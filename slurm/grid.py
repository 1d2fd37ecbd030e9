"""A grid of synthetic-task runs from one small YAML: expansion, naming, local runner, SLURM plan.

    python -m slurm.submit sweep --grid configs/reproduce/memorization_cpu.yaml --local [--jobs 2]
    python -m slurm.submit sweep --grid configs/reproduce/phonebook_gpu.yaml [--dry-run]
    python -m slurm.grid GRID --stage data|run|report [--index I]   # one SLURM array task

The YAML (`GridConfig`) names a task (memorization | phonebook | shortest_path |
length2_path), the sizes (book sizes, training-set sizes, n, or the graph size |V| of
length2_path, whose training-set size is `data: {size: N}`), the models (a model YAML each,
plus overrides, and optionally the subset of sizes it runs: a phone book straddles each
model's own capacity), the seeds and the budget. Every (size, seed) gets one data directory, every (model, size,
seed) one run directory; each run is the project's ordinary CLI, so the commands printed
here are the ones a user would type:

- memorization: `python -m data_prep synthetic memorization` then `python -m pretrain.memorization`
  (it writes results.json itself); length2_path the same with `synthetic length2-path`;
- phonebook / shortest_path: `python -m data_prep synthetic ...`, `python -m pretrain` on the
  grid's training recipe, then `python -m eval --suite synthetic`.

A run counts as finished when a results.json under its run directory holds the task's
`synthetic` section (the last thing a run writes), so a rerun of the same grid skips it; a
killed run is simply run again (training resumes from its own checkpoint). The data step is
skipped when the directory's manifest.json (written last by the generator) exists.

Locally, runs go one after the other (`--jobs N`: N at a time, each with
OMP_NUM_THREADS=cores/N unless it is set) with a progress line each (wall time and the load
average, appended to RUNS_DIR/timings.jsonl too), then `python -m eval.report` draws the
figures. Runs are deterministic by seed, so N changes wall time, not results. On SLURM: a data array (one task per data directory) -> the run array
(afterok) -> the report job (afterok), all through `slurm/grid.sbatch`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mop.cli import ArgumentParser, examples
from mop.config import StrictModel, find_config, read_yaml, validate
from mop.errors import ConfigError, UserError, cli_entry
from mop.results import RESULTS_FILE

TASKS = ("memorization", "phonebook", "shortest_path", "length2_path")
# Tasks trained by the one-layer sequence classifier (`python -m pretrain.memorization`).
CLASSIFIER_TASKS = ("memorization", "length2_path")
# results.json `synthetic` section of each task, and the headline metric for progress lines.
SECTION = {
    "memorization": "memorization",
    "phonebook": "phonebook",
    "shortest_path": "shortest_path",
    "length2_path": "length2_path",
}
METRIC = {
    "memorization": "accuracy",
    "phonebook": "accuracy",
    "shortest_path": "exact_match",
    "length2_path": "accuracy",  # on the held-out graphs
}
GENERATOR = {
    "memorization": "memorization",
    "phonebook": "phonebook",
    "shortest_path": "shortest-path",
    "length2_path": "length2-path",
}
# The generator flag that the grid's sizes set (--size unless named here).
SIZE_FLAG = {"length2_path": "--vertices"}
GRID_SCRIPT = "grid.sbatch"


class GridModel(StrictModel):
    """One model of the grid: a model YAML plus dotted overrides, under a short name."""

    name: str = Field(min_length=1)
    config: str
    overrides: list[str] = Field(default_factory=list)
    sizes: list[int] | None = None  # a subset of the grid's sizes; None: all of them

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not all(ch.isalnum() or ch in "_.-" for ch in v):
            raise ValueError("use letters, digits, '_', '.' and '-' only (it names directories)")
        return v


class GridSlurm(StrictModel):
    """sbatch options per stage (account, partition, GPUs, time)."""

    data: list[str] = Field(default_factory=list)
    run: list[str] = Field(default_factory=list)
    report: list[str] = Field(default_factory=list)


class GridConfig(StrictModel):
    task: Literal["memorization", "phonebook", "shortest_path", "length2_path"]
    runs_dir: str
    report_dir: str | None = None  # default RUNS_DIR/report
    sizes: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0])
    models: list[GridModel] = Field(min_length=1)
    # Budget: training steps, one number or one per size (a bigger book needs more passes).
    steps: int | dict[int, int]
    # Generator flags (`--seq-len 16`, `--num-test 200`, `--nodes 12`) as a mapping.
    data: dict[str, Any] = Field(default_factory=dict)
    # memorization: extra `python -m pretrain.memorization` flags (lr, batch_size, log_every);
    # LM tasks: dotted overrides of the training recipe (`optim.lr: 1e-3`).
    train: dict[str, Any] = Field(default_factory=dict)
    # More of the same, per size, after `train` (a batch that keeps the steps per pass of a
    # book fixed: {125: {batch.micro_batch: 25}, 250: {batch.micro_batch: 50}}).
    train_by_size: dict[int, dict[str, Any]] = Field(default_factory=dict)
    train_config: str | None = None  # the LM tasks' recipe (configs/train/*.yaml)
    eval_args: list[str] = Field(default_factory=list)  # extra `python -m eval` arguments
    threshold: float = Field(0.9, ge=0.0, le=1.0)  # report: "memorized" at this accuracy
    slurm: GridSlurm = Field(default_factory=GridSlurm)

    @field_validator("sizes", "seeds")
    @classmethod
    def _distinct_non_negative(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v) or len(set(v)) != len(v):
            raise ValueError("must be distinct non-negative integers")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> GridConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be distinct, got {names}")
        for m in self.models:
            extra = sorted(set(m.sizes or []) - set(self.sizes))
            if extra:
                raise ValueError(f"model {m.name}: sizes {extra} are not in the grid's sizes")
        unused = [s for s in self.sizes if not any(s in self.sizes_of(m) for m in self.models)]
        if unused:
            raise ValueError(f"sizes {unused} are run by no model")
        if isinstance(self.steps, dict):
            missing = [s for s in self.sizes if s not in self.steps]
            if missing:
                raise ValueError(f"steps has no budget for sizes {missing}")
        stray = sorted(set(self.train_by_size) - set(self.sizes))
        if stray:
            raise ValueError(f"train_by_size names sizes {stray} that are not in sizes")
        if self.task not in CLASSIFIER_TASKS and not self.train_config:
            raise ValueError(f"task {self.task} needs train_config (a configs/train/*.yaml)")
        return self

    def steps_for(self, size: int) -> int:
        return self.steps[size] if isinstance(self.steps, dict) else self.steps

    def sizes_of(self, model: GridModel) -> list[int]:
        """The sizes `model` runs, in the grid's order."""
        return [s for s in self.sizes if model.sizes is None or s in model.sizes]


@dataclass
class DataJob:
    size: int
    seed: int
    out: str
    command: list[str]


@dataclass
class Run:
    name: str
    model: str
    size: int
    seed: int
    data_dir: str
    run_dir: str
    commands: list[list[str]] = field(default_factory=list)


def load_grid(path: str | Path) -> GridConfig:
    """Read and validate a grid YAML; model configs must exist (a typo fails before any run)."""
    grid = validate(GridConfig, read_yaml(path))
    for m in grid.models:
        if not find_config(m.config).is_file():
            raise ConfigError(f"grid {path}: model {m.name}: config not found: {m.config}")
    if grid.train_config and not find_config(grid.train_config).is_file():
        raise ConfigError(f"grid {path}: train_config not found: {grid.train_config}")
    return grid


def _flags(options: dict[str, Any]) -> list[str]:
    """{"num_test": 200, "seq_len": 16} -> ["--num-test", "200", "--seq-len", "16"]."""
    out: list[str] = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def data_dir(grid: GridConfig, size: int, seed: int) -> str:
    return f"{grid.runs_dir.rstrip('/')}/data/{grid.task}-n{size}-s{seed}"


def run_name(model: str, size: int, seed: int) -> str:
    """`dense_f32-n4096-s0`: model, size and seed, so a directory listing reads as the grid."""
    return f"{model}-n{size}-s{seed}"


def report_dir(grid: GridConfig) -> str:
    return grid.report_dir or f"{grid.runs_dir.rstrip('/')}/report"


def data_jobs(grid: GridConfig) -> list[DataJob]:
    """One generator command per (size, seed), sizes outermost."""
    jobs = []
    for size in grid.sizes:
        for seed in grid.seeds:
            out = data_dir(grid, size, seed)
            cmd = ["python", "-m", "data_prep", "synthetic", GENERATOR[grid.task]]
            size_flag = SIZE_FLAG.get(grid.task, "--size")
            cmd += ["--out", out, size_flag, str(size), "--seed", str(seed), *_flags(grid.data)]
            jobs.append(DataJob(size, seed, out, cmd))
    return jobs


def expand(grid: GridConfig) -> list[Run]:
    """Every (size, seed, model) run with its commands, small sizes first (cheap results early)."""
    runs = []
    for size in grid.sizes:
        for seed in grid.seeds:
            ddir = data_dir(grid, size, seed)
            for m in grid.models:
                if size not in grid.sizes_of(m):
                    continue
                name = run_name(m.name, size, seed)
                rdir = f"{grid.runs_dir.rstrip('/')}/runs/{name}"
                run = Run(name, m.name, size, seed, ddir, rdir)
                run.commands = _commands(grid, m, size, seed, ddir, rdir)
                runs.append(run)
    return runs


def _commands(
    grid: GridConfig, m: GridModel, size: int, seed: int, ddir: str, rdir: str
) -> list[list[str]]:
    steps = str(grid.steps_for(size))
    train_args = {**grid.train, **grid.train_by_size.get(size, {})}
    if grid.task in CLASSIFIER_TASKS:
        cmd = ["python", "-m", "pretrain.memorization", "--data", ddir, "--model", m.config]
        cmd += [*m.overrides, "--steps", steps, "--seed", str(seed), *_flags(train_args)]
        cmd += ["--name", m.name, "--out", rdir]
        return [cmd]
    train = ["python", "-m", "pretrain", "--config", str(grid.train_config)]
    train += [f"model={m.config}", *(f"model.{o}" for o in m.overrides)]
    # The grid's seed drives the data (book, graphs), its order and the model's init.
    train += [f"data.data_dir={ddir}", f"data.seed={seed}", f"seed={seed}", f"run_dir={rdir}"]
    train += [f"logging.run_name={m.name}", f"max_steps={steps}"]
    train += [f"{k}={_yaml_value(v)}" for k, v in train_args.items()]
    ev = ["python", "-m", "eval", "--checkpoint", rdir, "--suite", "synthetic"]
    ev += ["--name", m.name, *grid.eval_args]
    return [train, ev]


def check_runs(grid: GridConfig) -> None:
    """Validate every LM run's training config (recipe + its overrides) before anything runs,
    so a bad override fails here in one line, not after hours of other runs or in the queue."""
    if grid.task in CLASSIFIER_TASKS:
        return
    from mop.config import load_config
    from pretrain.config import TrainConfig

    checked: set[str] = set()
    for run in expand(grid):
        overrides = run.commands[0][5:]  # after `python -m pretrain --config RECIPE`
        key = " ".join(overrides)
        if key not in checked:
            load_config(TrainConfig, grid.train_config, overrides)
            checked.add(key)


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(_yaml_value(x) for x in v) + "]"
    return str(v)


# -- finished runs ----------------------------------------------------------------------------


def finished_result(grid: GridConfig, run: Run) -> dict[str, Any] | None:
    """The task's `synthetic` section if some results.json under the run directory has it."""
    from mop.results import load_results

    root = Path(run.run_dir)
    if not root.is_dir():
        return None
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            doc = load_results(path)
        except (UserError, OSError, ValueError):
            continue  # a half-written or foreign file: not finished
        section = (doc.get("synthetic") or {}).get(SECTION[grid.task])
        if isinstance(section, dict) and section.get(METRIC[grid.task]) is not None:
            return section
    return None


def data_ready(job: DataJob) -> bool:
    return (Path(job.out) / "manifest.json").is_file()


# -- local runner -----------------------------------------------------------------------------


def _exec(cmd: list[str], log: Path | None = None) -> None:
    """Run one CLI step with this interpreter; a failure stops the grid with its log named."""
    argv = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
    if log is None:
        proc = subprocess.run(argv, check=False)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise UserError(f"step failed with exit {proc.returncode}: {shlex.join(cmd)}{where}")


def _summary(grid: GridConfig, section: dict[str, Any]) -> str:
    value = section.get(METRIC[grid.task])
    return f"{METRIC[grid.task]} {value:.4f}" if isinstance(value, (int, float)) else "finished"


def _start_run(grid: GridConfig, run: Run, verbose: bool) -> tuple[float, float]:
    """Run one grid run's CLI steps; returns (wall seconds, load average at the start)."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    for cmd in run.commands:
        _exec(cmd, None if verbose else Path(run.run_dir + ".log"))
    return time.perf_counter() - t0, load


def _record_timing(grid: GridConfig, run: Run, secs: float, load0: float, jobs: int) -> None:
    """Append one line to RUNS_DIR/timings.jsonl: how long the run took and under what load."""
    rec = {
        "run": run.name,
        "seconds": round(secs, 1),
        "load_start": round(load0, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "jobs": jobs,
        "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(grid.runs_dir) / "timings.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


def run_local(
    grid: GridConfig, report: bool = True, verbose: bool = False, jobs: int = 1
) -> dict[str, int]:
    """Generate data, run every unfinished run (`jobs` at a time), then the report.

    A failing run stops new ones from starting; those already running finish first (their
    results are kept), then the first failure is raised.
    """
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Each run is one process: share the cores instead of oversubscribing them.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    data, runs = data_jobs(grid), expand(grid)
    for job in data:
        if not data_ready(job):
            print(f"[grid] data {job.out}: generating", flush=True)
            _exec(job.command, None if verbose else Path(job.out + ".log"))
    counts = {"ran": 0, "skipped": 0}
    todo: list[tuple[str, Run]] = []
    for i, run in enumerate(runs, 1):
        head = f"[grid] {i}/{len(runs)} {run.name}"
        done = finished_result(grid, run)
        if done is not None:
            print(f"{head}: skipped, already finished ({_summary(grid, done)})", flush=True)
            counts["skipped"] += 1
        else:
            todo.append((head, run))
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Future, tuple[str, Run]] = {}
        queue = list(reversed(todo))
        while queue or running:
            while queue and len(running) < jobs and failure is None:
                head, run = queue.pop()
                print(f"{head}: running (log {run.run_dir}.log)", flush=True)
                running[pool.submit(_start_run, grid, run, verbose)] = (head, run)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                head, run = running.pop(fut)
                try:
                    secs, load0 = fut.result()
                    done = finished_result(grid, run)
                    if done is None:
                        raise UserError(
                            f"{run.name} finished but wrote no {SECTION[grid.task]} result"
                        )
                except BaseException as exc:  # noqa: BLE001 - re-raised once the others end
                    failure = failure or exc
                    continue
                _record_timing(grid, run, secs, load0, jobs)
                print(
                    f"{head}: {_summary(grid, done)} in {secs:.0f}s (load {load0:.1f})",
                    flush=True,
                )
                counts["ran"] += 1
    if failure is not None:
        raise failure
    if report:
        _exec(report_command(grid))
        print(f"[grid] report: {report_dir(grid)}/report.md", flush=True)
    return counts


def report_command(grid: GridConfig) -> list[str]:
    runs = f"{grid.runs_dir.rstrip('/')}/runs"
    return ["python", "-m", "eval.report", runs, "--out", report_dir(grid)] + [
        "--threshold",
        f"{grid.threshold:g}",
    ]


def print_plan(grid: GridConfig) -> None:
    """The commands a local run would execute (unfinished ones only), without running them."""
    for job in data_jobs(grid):
        if not data_ready(job):
            print(shlex.join(job.command))
    for run in expand(grid):
        state = "finished" if finished_result(grid, run) is not None else "to run"
        print(f"# {run.name}: {state}")
        if state == "to run":
            for cmd in run.commands:
                print(shlex.join(cmd))
    print(shlex.join(report_command(grid)))


# -- SLURM ------------------------------------------------------------------------------------


def submit_grid(sub: Any, grid_path: str, grid: GridConfig) -> list[str]:
    """data array -> run array (afterok) -> report (afterok); returns the three job ids.

    `sub` is slurm.submit's Submitter (sbatch or --dry-run printing). Each array task runs
    `python -m slurm.grid GRID --stage ... --index $SLURM_ARRAY_TASK_ID`, which skips what is
    already finished, so resubmitting a grid only redoes what is missing.
    """
    n_data, n_runs = len(data_jobs(grid)), len(expand(grid))
    name = Path(grid_path).stem
    data = sub.sbatch(
        GRID_SCRIPT,
        [grid_path, "data"],
        options=[f"--job-name=grid-data-{name}", f"--array=0-{n_data - 1}", *grid.slurm.data],
    )
    runs = sub.sbatch(
        GRID_SCRIPT,
        [grid_path, "run"],
        options=[f"--job-name=grid-run-{name}", f"--array=0-{n_runs - 1}", *grid.slurm.run],
        after=[data],
    )
    report = sub.sbatch(
        GRID_SCRIPT,
        [grid_path, "report"],
        options=[f"--job-name=grid-report-{name}", *grid.slurm.report],
        after=[runs],
    )
    return [data, runs, report]


def run_stage(grid: GridConfig, stage: str, index: int | None) -> None:
    """One SLURM array task (or the report job) of a submitted grid."""
    if stage == "report":
        _exec(report_command(grid))
        return
    items: list[Any] = data_jobs(grid) if stage == "data" else expand(grid)
    if index is None or not 0 <= index < len(items):
        raise UserError(f"--index must be in [0, {len(items) - 1}] for stage {stage}")
    item = items[index]
    if stage == "data":
        if data_ready(item):
            print(f"[grid] data {item.out}: already there")
        else:
            _exec(item.command)
        return
    done = finished_result(grid, item)
    if done is not None:
        print(f"[grid] {item.name}: skipped, already finished ({_summary(grid, done)})")
        return
    for cmd in item.commands:
        print(f"$ {shlex.join(cmd)}", flush=True)
        _exec(cmd)


def sweep_grid(sub: Any, args: argparse.Namespace, conflicting: Any) -> None:
    """`python -m slurm.submit sweep --grid GRID [--local] [--dry-run]` (the hook in submit.py)."""
    if not args.grid:
        raise UserError("--local needs --grid GRID")
    if conflicting:
        raise UserError("--grid takes no training config, --models, --eval or overrides")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs != 1 and not args.local:
        raise UserError("--jobs needs --local (on SLURM the run array runs in parallel)")
    grid = load_grid(args.grid)
    check_runs(grid)
    n_runs, n_data = len(expand(grid)), len(data_jobs(grid))
    print(f"[grid] {args.grid}: {grid.task}, {n_runs} runs over {n_data} data directories")
    if args.local and args.dry_run:
        print_plan(grid)
    elif args.local:
        counts = run_local(grid, jobs=args.jobs)
        print(f"[grid] {counts['ran']} run(s) trained, {counts['skipped']} skipped (finished)")
    else:
        submit_grid(sub, args.grid, grid)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m slurm.grid",
        description=__doc__.split("\n")[0],
        epilog=examples(
            "python -m slurm.grid configs/reproduce/memorization_cpu.yaml --stage data --index 0",
            "python -m slurm.grid configs/reproduce/memorization_cpu.yaml --stage report",
            notes="One stage of a grid, as slurm/grid.sbatch runs it; to run a whole grid use "
            "python -m slurm.submit sweep --grid GRID [--local].",
        ),
    )
    p.add_argument("grid", help="grid YAML (configs/reproduce/*.yaml)")
    p.add_argument(
        "--stage",
        choices=("data", "run", "report"),
        required=True,
        help="data: make one data directory; run: train+evaluate one run; report: the figures",
    )
    p.add_argument("--index", type=int, help="array task index (data and run stages)")
    args = p.parse_args(argv)
    run_stage(load_grid(args.grid), args.stage, args.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
