"""Submit chains and sweeps of SLURM jobs with the right dependencies.

    python -m slurm.submit data CONFIG --tasks 64 [key=value ...] [--dry-run]
        tokenizer job -> tokenize array (afterok) -> merge (afterok)
    python -m slurm.submit sweep TRAIN_CONFIG --models configs/model/moe_d512_e*.yaml
            [--eval all] [--dry-run]
        one training job per model config (slurm/train.sbatch), each requeueing itself;
        run_dir=<--runs-dir>/<model name>; every job's config is validated before anything is
        submitted; with --eval, an evaluation job per run once its training has finished
    python -m slurm.submit sweep --grid configs/reproduce/memorization_cpu.yaml [--local]
        a grid of synthetic-task runs (slurm/grid.py): --local runs them here one by one
        (--jobs N: N at a time; a rerun skips finished runs); otherwise data array -> run
        array -> report job
    python -m slurm.submit eval runs/moe_d512_e8 runs/dense_d512 [--suite all]
            [--eval-arg=--limit=500] [--after JOB]
        one evaluation job per run or checkpoint (slurm/eval.sbatch)

Job ids come from `sbatch --parsable`. `--dry-run` prints the sbatch commands with
placeholder ids instead of submitting, and writes nothing. Extra `--sbatch` arguments
(account, partition, qos) are passed to every job. Every config, path and suite a chain
needs is checked before the first sbatch; the log directories are created before it.
The options for every job (--dry-run, --sbatch, --container*) go before or after the command.

In a container (every job: data, train, eval, sweep; see slurm/container.py):
    python -m slurm.submit --container IMAGE [--container-runtime pyxis|apptainer]
        [--container-mounts /data:/data,/scratch] sweep ...
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mop.cli import ArgumentParser, examples
from mop.config import find_config, find_configs, parse_args_with_overrides
from mop.errors import ConfigError, UserError, cli_entry
from slurm.container import Container, parse_container

SLURM_DIR = Path(__file__).resolve().parent
# `key=value` (a dotted config override), as opposed to a file path
OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


class Submitter:
    def __init__(self, dry_run: bool, extra: list[str], container: Container | None = None):
        self.dry_run = dry_run
        self.extra = extra
        self.count = 0
        # what each job's environment gets on top of the submitter's (sbatch exports it):
        # where slurm/launch.sh is, and the container to run in
        self.env = {"MOP_SLURM_DIR": str(SLURM_DIR), **(container.job_env() if container else {})}

    def sbatch(
        self,
        script: str,
        args: list[str],
        options: list[str] | None = None,
        after: list[str] | None = None,
    ) -> str:
        cmd = ["sbatch", "--parsable", *self.extra, *(options or [])]
        if after:
            cmd.append(f"--dependency=afterok:{':'.join(after)}")
        cmd += [str(SLURM_DIR / script), *args]
        self.count += 1
        if self.dry_run:
            job = f"<job{self.count}>"
            env = [f"{k}={v}" for k, v in self.env.items() if k != "MOP_SLURM_DIR"]
            print(f"{job} = {shlex.join([*env, *cmd])}")
            return job
        for log_dir in log_dirs(script, cmd):
            log_dir.mkdir(parents=True, exist_ok=True)  # sbatch cannot create them
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, env={**os.environ, **self.env}
            )
        except FileNotFoundError:
            raise UserError(
                "sbatch not found: run on a SLURM login node, or use --dry-run"
            ) from None
        if proc.returncode != 0:
            raise UserError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        job = proc.stdout.strip().split(";")[0]
        print(f"submitted {job}: {shlex.join(cmd)}")
        return job


def log_dirs(script: str, cmd: list[str]) -> list[Path]:
    """Directories of the job's --output/--error files: from the command line, else from the
    script's #SBATCH lines (relative to the submit directory, as sbatch reads them). A
    directory part with a %-pattern is left alone (it is only known in the job)."""
    found: dict[str, str] = {}
    lines = (SLURM_DIR / script).read_text().splitlines()
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")]
    for arg in [*directives, *cmd]:  # later wins, as in sbatch
        m = re.match(r"^(--output|--error|-o|-e)[= ](\S+)", arg.strip())
        if m:
            found["--output" if m[1] in ("--output", "-o") else "--error"] = m[2]
    dirs = []
    for pattern in found.values():
        parent = Path(pattern).parent
        if "%" not in str(parent) and str(parent) != ".":
            dirs.append(parent)
    return dirs


def submit_data(sub: Submitter, config: str, tasks: int, overrides: list[str]) -> list[str]:
    if tasks < 1:
        raise UserError(f"--tasks must be >= 1, got {tasks}")
    _check_data_config(config, overrides)  # a bad config fails here, not in the queue
    tok = sub.sbatch("data_prep_tokenizer.sbatch", [config, *overrides])
    arr = sub.sbatch(
        "data_prep_tokenize.sbatch",
        [config, *overrides],
        options=[f"--array=0-{tasks - 1}"],
        after=[tok],
    )
    merge = sub.sbatch("data_prep_merge.sbatch", [config, *overrides], after=[arr])
    return [tok, arr, merge]


def sweep_run_dir(runs_dir: str, model: str) -> str:
    """Where a sweep's job for `model` (a model config path) trains: RUNS_DIR/<config name>."""
    return f"{runs_dir.rstrip('/')}/{Path(model).stem}"


def submit_sweep(
    sub: Submitter,
    config: str,
    models: list[str],
    overrides: list[str],
    after: list[str],
    runs_dir: str = "runs",
) -> list[str]:
    if not models:
        raise UserError("--models needs at least one model config")
    if any(o.startswith("run_dir=") for o in overrides):
        raise UserError("a sweep names each run itself: use --runs-dir, not run_dir=")
    planned = []
    for model in models:  # every job's config is checked before the first is queued
        if not find_config(model).is_file():
            raise UserError(f"model config not found: {model}")
        name = Path(model).stem
        run_dir = sweep_run_dir(runs_dir, model)
        job_overrides = [f"model={model}", f"run_dir={run_dir}", f"logging.run_name={name}"]
        job_overrides += overrides
        try:  # a bad value fails here, not in the queue; the message names the model file
            _check_train_config(config, job_overrides)
        except ConfigError as exc:
            raise ConfigError(f"--models {model}: {exc} (drop it from --models)") from None
        planned.append((name, [config, *job_overrides]))
    return [
        sub.sbatch("train.sbatch", args, options=[f"--job-name=train-{name}"], after=after or None)
        for name, args in planned
    ]


def split_models(models: list[str]) -> tuple[list[str], list[str]]:
    """`--models a.yaml b.yaml max_steps=10`: argparse hands the override to --models;
    give it back. Returns (model files, overrides)."""
    files = [m for m in models if not OVERRIDE.match(m)]
    return files, [m for m in models if OVERRIDE.match(m)]


def submit_eval(
    sub: Submitter,
    checkpoints: list[str],
    suite: str,
    eval_args: list[str],
    after: list[str] | None = None,
) -> list[str]:
    """One slurm/eval.sbatch job per run directory or checkpoint."""
    if not checkpoints:
        raise UserError("eval needs at least one run directory or checkpoint")
    from eval.suites import parse_suites

    parse_suites(suite)  # an unknown suite fails here, not in the queue
    if not after:  # a run still to be trained (--after, sweep --eval) does not exist yet
        for ckpt in checkpoints:
            if not Path(ckpt).exists():
                raise UserError(f"run directory or checkpoint not found: {ckpt}")
    jobs = []
    for ckpt in checkpoints:
        name = Path(ckpt).name
        jobs.append(
            sub.sbatch(
                "eval.sbatch",
                [ckpt, "--suite", suite, *eval_args],
                options=[f"--job-name=eval-{name}"],
                after=after or None,
            )
        )
    return jobs


def _check_train_config(config: str, overrides: list[str]) -> None:
    from mop.config import load_config
    from pretrain.config import TrainConfig

    load_config(TrainConfig, config, overrides)


def _check_data_config(config: str, overrides: list[str]) -> None:
    from data_prep.config import DataPrepConfig
    from mop.config import load_config

    load_config(DataPrepConfig, config, overrides)


def _add_job_flags(parser: argparse.ArgumentParser, *, in_command: bool) -> None:
    """The flags that apply to every job, accepted before the command
    (`slurm.submit --dry-run sweep ...`) and after it (`slurm.submit sweep ... --dry-run`), and
    listed in both --help texts. After the command they default to SUPPRESS: argparse would
    otherwise reset what was given before the command to the defaults; `--sbatch` given after
    it collects apart (`sbatch_after`) and is appended to those given before (`main`)."""
    unset = {"default": argparse.SUPPRESS} if in_command else {}
    g = parser.add_argument_group("options for every job (before or after the command)")
    g.add_argument(
        "--dry-run", action="store_true", help="print sbatch commands, submit nothing", **unset
    )
    g.add_argument(
        "--sbatch",
        action="append",
        dest="sbatch_after" if in_command else "sbatch",
        metavar="ARG",
        help="extra sbatch argument for every job (repeatable), e.g. --sbatch=--account=abc",
        **(unset or {"default": []}),
    )
    g.add_argument(
        "--container",
        metavar="IMAGE",
        help="run every job in this image (pyxis: squashfs file or image name; apptainer: .sif)",
        **unset,
    )
    g.add_argument(
        "--container-runtime",
        help="pyxis (srun --container-image) or apptainer (apptainer exec --nv); default pyxis",
        **(unset or {"default": "pyxis"}),
    )
    g.add_argument(
        "--container-mounts",
        metavar="SRC[:DST],...",
        help="more mounts besides the submit directory, e.g. /data:/data,/scratch",
        **unset,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subparser per command (`data`, `sweep`, `eval`), each taking the
    job flags too; add a command's own flags to its subparser."""
    ap = ArgumentParser(
        prog="python -m slurm.submit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_flags(ap, in_command=False)
    sp = ap.add_subparsers(
        dest="cmd", metavar="COMMAND", required=True, help="run `COMMAND --help` for its flags"
    )
    d = sp.add_parser(
        "data",
        help="tokenizer -> tokenize array -> merge",
        epilog=examples(
            "python -m slurm.submit data configs/data/math.yaml --tasks 64 --dry-run",
            "python -m slurm.submit data configs/data/math.yaml --tasks 64 --sbatch=--account=abc",
        ),
    )
    d.add_argument("config", help="data-prep YAML (configs/data/*.yaml)")
    d.add_argument("--tasks", type=int, default=16, help="array size of the tokenize job")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    s = sp.add_parser(
        "sweep",
        help="one training job per model config, or a --grid",
        epilog=examples(
            "python -m slurm.submit sweep configs/train/paper_moe_d512_e8.yaml "
            "--models configs/model/moe_d512_e*.yaml --eval all",
            "python -m slurm.submit sweep --grid configs/reproduce/memorization_cpu.yaml --local",
            "python -m slurm.submit sweep --grid configs/reproduce/phonebook_cpu.yaml --local "
            "--jobs 2",
        ),
    )
    s.add_argument("config", nargs="?", help="training recipe YAML (not with --grid)")
    s.add_argument("--models", nargs="+", help="model YAMLs, one training job each")
    s.add_argument("--grid", help="a grid YAML (configs/reproduce/*.yaml): see slurm/grid.py")
    s.add_argument("--local", action="store_true", help="with --grid: run here, one by one")
    s.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="with --grid --local: N runs at a time (each OMP_NUM_THREADS=cores/N unless set)",
    )
    s.add_argument("--after", action="append", default=[], help="job id to wait for (afterok)")
    s.add_argument(
        "--runs-dir",
        default="runs",
        help="run_dir of each job = RUNS_DIR/<model config name> (default: runs)",
    )
    s.add_argument(
        "--eval",
        metavar="SUITE",
        help="then evaluate each run (slurm/eval.sbatch, afterok on its training job)",
    )
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted train overrides")
    e = sp.add_parser(
        "eval",
        help="one evaluation job per run directory or checkpoint",
        epilog=examples("python -m slurm.submit eval runs/moe_d512_e8 runs/dense_d512 --suite all"),
    )
    e.add_argument("checkpoints", nargs="+", metavar="RUN_DIR", help="run or checkpoint dirs")
    e.add_argument("--suite", default="all", help="python -m eval --suite (default: all)")
    e.add_argument(
        "--eval-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra python -m eval argument, e.g. --eval-arg=--limit=500",
    )
    e.add_argument("--after", action="append", default=[], help="job id to wait for (afterok)")
    for command in (d, s, e):
        _add_job_flags(command, in_command=True)
    return ap


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = parse_args_with_overrides(ap, argv)
    args.sbatch = [*args.sbatch, *getattr(args, "sbatch_after", [])]
    container = parse_container(args.container, args.container_runtime, args.container_mounts)
    sub = Submitter(args.dry_run, args.sbatch, container)
    if args.cmd == "data":
        submit_data(sub, args.config, args.tasks, args.overrides)
    elif args.cmd == "eval":
        submit_eval(sub, args.checkpoints, args.suite, args.eval_arg, args.after)
    elif args.grid or args.local:
        from slurm.grid import sweep_grid

        sweep_grid(sub, args, args.config or args.models or args.overrides or args.eval)
    else:
        if not args.config or not args.models:
            raise UserError("sweep needs a training config and --models (or --grid GRID)")
        args.models, moved = split_models(args.models)
        args.models = find_configs(args.models)  # a glob the shell did not match: the repo's
        # in command-line order, so that the last of two values for one key wins
        given = list(sys.argv[1:] if argv is None else argv)
        args.overrides = sorted([*args.overrides, *moved], key=given.index)
        if args.eval:
            from eval.suites import parse_suites

            parse_suites(args.eval)  # before any training job is submitted
        jobs = submit_sweep(
            sub, args.config, args.models, args.overrides, args.after, args.runs_dir
        )
        if args.eval:
            for model, job in zip(args.models, jobs):
                submit_eval(sub, [sweep_run_dir(args.runs_dir, model)], args.eval, [], after=[job])
    return 0


if __name__ == "__main__":
    sys.exit(main())
