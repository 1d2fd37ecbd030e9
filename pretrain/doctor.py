"""`python -m pretrain.doctor [--config TRAIN.yaml [key=value ...]] [--fast]`: check a machine
before a long job.

Environment: Python, torch (and a matmul on each device kind here), CUDA, NCCL (a one-rank
all-reduce on GPU), DeepSpeed (imports with the accelerator it will use; loads its
shared-memory comm op on CPU), the optimizer (one step of torch's AdamW with the kernel
training uses: fused, on GPU and CPU), megablocks and
grouped_gemm (a grouped GEMM on GPU; missing is only a warning without CUDA, unless the config
asks for moe.backend=megablocks). With a config: the process layout against the visible GPUs,
which GPU this process takes (`gpu binding`; run the doctor inside the job step, under srun, to
see each task's own view under per-task binding), free disk where checkpoints go against
`checkpoint.keep_last + 1` checkpoints of this model, the data directory (manifest, tokenizer, every shard's size; `--fast` skips the sha256 of each
shard), a writable run directory, the save a restart would resume from (its integrity record;
`--fast` checks sizes only), the wandb mode.

Prints a table; exit 0 when nothing failed (warnings allowed), else 1 with one `fix:` line per
problem. `--fast` skips the device ops and the shard hashes (seconds; slurm/train.sbatch runs
it first). The layout comes from `--world-size/--nproc-per-node`, else from the launcher's
environment (WORLD_SIZE / LOCAL_WORLD_SIZE, SLURM_NTASKS / SLURM_NTASKS_PER_NODE); GPUs are
expected when `--device cuda`, when SLURM allocated GPUs, when CUDA is visible, or when the
config needs them (moe.backend=megablocks).

The checks themselves: pretrain/doctor_env.py (the machine), pretrain/doctor_job.py (a train
config on it); this module runs them and reports.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mop.cli import ArgumentParser, examples
from mop.config import load_config
from mop.errors import cli_entry
from pretrain.doctor_env import (
    Check,
    check_deepspeed,
    check_moe_kernels,
    check_optimizer,
    check_python,
    check_torch,
)
from pretrain.doctor_job import (
    check_data,
    check_disk,
    check_gpu_binding,
    check_layout,
    check_resume,
    check_wandb,
    check_writable,
    layout_from,
    slurm_gpus,
)

FAIL_EXIT_CODE = 1  # not 75: a job stopped by the doctor must not be requeued


# Report --------------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace, env: dict[str, str] | None = None) -> list[Check]:
    env = dict(os.environ) if env is None else env
    cfg = None
    if args.config:
        from pretrain.config import TrainConfig

        cfg = load_config(TrainConfig, args.config, args.overrides)
    checks = [check_python(), *check_torch(args.fast)]
    import torch

    cuda = torch.cuda.is_available()
    checks.append(check_deepspeed(cuda, args.fast))
    checks.append(check_optimizer(cuda, args.fast))
    megablocks = (
        cfg is not None and cfg.model.ffn == "moe" and cfg.model.moe.backend == "megablocks"
    )
    checks += check_moe_kernels(megablocks, cuda, args.fast)
    if cfg is None:
        return checks
    from pretrain.config import resolve_precision

    layout = layout_from(args, env, megablocks, cuda)
    visible = torch.cuda.device_count() if cuda else 0
    checks += check_layout(cfg, layout, visible, slurm_gpus(env))
    binding = check_gpu_binding(layout, env, visible)
    if binding is not None:
        checks.append(binding)
    checks.append(check_disk(cfg, resolve_precision(cfg, layout.gpus_needed > 0)))
    checks.append(check_writable("run dir", Path(cfg.run_dir)))
    if Path(cfg.checkpoint_dir).absolute() != (Path(cfg.run_dir) / "checkpoints").absolute():
        checks.append(check_writable("checkpoint dir", Path(cfg.checkpoint_dir)))
    checks.append(check_resume(cfg, args.fast))
    checks += check_data(cfg, args.fast)
    checks.append(check_wandb(cfg, env))
    return checks


def format_table(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{'check':<{w}}  {'status':<6}  detail"]
    lines += [f"{c.name:<{w}}  {c.status:<6}  {c.detail}" for c in checks]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m pretrain.doctor",
        description="Check this machine (and a train config) before a long job.",
        epilog=examples(
            "python -m pretrain.doctor",
            "python -m pretrain.doctor --config configs/train/tiny_cpu.yaml "
            "data.data_dir=demo_out/data --fast",
            notes="Exit 0: ready (warnings allowed); 1: a problem, each with its fix.",
        ),
    )
    p.add_argument("--config", help="train config YAML: adds layout, disk, data, run dir checks")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for python -m pretrain")
    p.add_argument("--fast", action="store_true", help="skip device ops and shard sha256s")
    p.add_argument("--world-size", type=int, help="processes in the job (default: from env)")
    p.add_argument("--nproc-per-node", type=int, help="processes on this node (default: env)")
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cuda: GPUs are required; auto: required under a SLURM GPU allocation or when "
        "CUDA is visible",
    )
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checks = run_checks(args)
    print(format_table(checks), flush=True)
    problems = [c for c in checks if c.status == "fail"]
    for c in checks:
        if c.status in ("fail", "warn") and c.fix:
            print(f"{'fix' if c.status == 'fail' else 'hint'}: {c.name}: {c.fix}")
    if problems:
        names = ", ".join(c.name for c in problems)
        print(f"error: doctor found {len(problems)} problem(s): {names}", file=sys.stderr)
        return FAIL_EXIT_CODE
    print("doctor: no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
