"""`python -m pretrain --config configs/train/X.yaml [key.sub=value ...] [--dry-run]`.

Works in one CPU process, under torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
LOCAL_RANK) and under srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). `--dry-run` prints the
resolved config, the derived sizes and the DeepSpeed config, and touches no device.
The config, the output paths and the data directory are checked before torch is imported,
so a bad input is one `error:` line within a second (pretrain/preflight.py).
Exit codes: see pretrain/trainer.py (0 done, 75 (EX_TEMPFAIL) requeue after a stop signal, 65
non-finite, 66 every checkpoint damaged, 67 repeated loss spikes).
"""

from __future__ import annotations

import sys

from pretrain.stop import install_stop_handlers

if __name__ == "__main__":
    install_stop_handlers()  # before the imports below (torch): a stop signal is a requeue
    from pretrain.console import announce_start

    announce_start(sys.argv[1:])  # the imports below take seconds: say so first

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from dataclasses import asdict  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from mop.cli import ArgumentParser, examples
from mop.config import load_config, to_yaml
from mop.errors import cli_entry
from pretrain.config import TrainConfig, derived_sizes, resolve_precision
from pretrain.console import Console, filter_known_chatter, model_label, quiet_third_party
from pretrain.deepspeed_config import deepspeed_config
from pretrain.launch import (
    dist_env,
    init_distributed,
    prepare_env,
    reproducibility_line,
    set_determinism,
)

HELP_NOTES = """\
Override any config field: dotted key=value after the options (values are YAML), e.g.
  optim.lr=3e-4 batch.micro_batch=8 model=configs/model/moe_d512_e8.yaml model.vocab_size=64
  (`model=` takes a model YAML; later model.* overrides apply on top of it).
Outputs go to run_dir: config.yaml (the resolved config), metrics.jsonl, checkpoints/
(or checkpoint.dir), wandb/ (mode: logging.wandb_mode, else $WANDB_MODE, else offline).
Resume: run the same command again. With checkpoint.resume=auto (the default) a run continues
from the latest complete checkpoint in its checkpoint directory, also in another layout
(GPU count, tensor/expert parallel sizes; ZeRO 1/2 saves); checkpoint.resume=never starts fresh.
Loss spikes (spike.*, on; pretrain/spike.py): loss > spike.loss_ratio=1.5 x the median of the
last spike.history=100 normal steps (and spike.zscore=6 robust spreads above it), grad norm >
spike.grad_norm_ratio=10 x its median, or non-finite, on spike.min_suspicious=4 of the last
spike.window=8 steps: back to the newest save from before it, its batches skipped (recorded in
checkpoints/rollbacks.json and every later save), and on; spike.lr_factor / spike.lr_steps
lower the lr after it. Check the thresholds with fault.spike_at_step=N (step N's update with
its lr x1000, once per run); spike.enabled=false trains through spikes.
Exit codes: 0 done, 75 stopped by a signal after a checkpoint (requeue), 65 too many
non-finite steps, 66 every checkpoint damaged, 67 a spike after spike.max_rollbacks=3
rollbacks within spike.rollback_span=1000 steps (not requeued), 2 bad config or path, 3 bad
data."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m pretrain",
        description="Train a dense or MoE decoder with DeepSpeed (one process, torchrun or srun).",
        epilog=examples(
            "python -m pretrain --config configs/train/tiny_cpu.yaml data.data_dir=demo_out/data",
            "python -m pretrain --config configs/train/tiny_cpu.yaml --dry-run",
            "torchrun --nproc_per_node=8 -m pretrain --config configs/train/paper_moe_d512_e8.yaml "
            "run_dir=runs/x",
            notes=HELP_NOTES,
        ),
    )
    p.add_argument("--config", required=True, help="train config YAML (configs/train/*.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, derived sizes and DeepSpeed config; touch nothing",
    )
    p.add_argument(
        "--profile",
        metavar="FROM:TO",
        help="torch profiler trace of steps FROM..TO into RUN_DIR/profile/, e.g. --profile 5:8",
    )
    return p.parse_args(argv)


def param_groups(model) -> list[dict]:
    """No weight decay on norms/biases (1-D) and embeddings, as in GPT-2/OLMo."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.startswith("embed.") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    cfg: TrainConfig,
    ds_cfg: dict,
    sizes,
    mesh,
    de,
    cuda: bool,
    console: Console,
    model_name: str,
    profile: tuple[int, int] | None = None,
) -> int:
    prepare_env(de, cuda)  # before deepspeed is imported: DS_ACCELERATOR=cpu without CUDA
    if not cuda:
        from pretrain.host_memory import keep_freed_host_memory

        keep_freed_host_memory()  # each step reuses the last one's pages (no page faults)
    console.phase("importing DeepSpeed")
    quiet_third_party()
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist

    from pretrain.data import TrainData, ValidationSet, open_manifest
    from pretrain.deepspeed_compat import (
        defer_muon_compile,
        keep_stage0_grad_norm,
        reduce_gradients_in_place,
    )
    from pretrain.metrics import MetricsLogger
    from pretrain.parallel import build_mpu, init_process_groups
    from pretrain.parallel.meta_build import build_parallel_model
    from pretrain.schedule import lr_multiplier
    from pretrain.trainer import (
        CheckpointCallback,
        EvalCallback,
        LoggingCallback,
        Trainer,
        flops_per_token,
        write_run_config,
    )

    defer_muon_compile()  # before DeepSpeed's first look at Muon (seconds of compiler import)

    # Data problems (missing directory, another tokenizer) fail before any process group
    # or device memory is set up.
    console.phase(f"reading the data manifest of {cfg.data.data_dir}")
    manifest = open_manifest(cfg.data, cfg.model.vocab_size)
    console.phase(
        f"initializing torch.distributed ({'nccl' if cuda else 'gloo'}, world {de.world_size})"
    )
    with filter_known_chatter():
        device_index = init_distributed(de, cuda, cfg.parallel.timeout_minutes)
    # tp / dp / ep groups, created in the same order everywhere, with the same timeout
    mesh = init_process_groups(mesh, cfg.parallel.timeout_minutes)
    if cfg.deterministic:
        # torch imports torch._dynamo here (~1 s; torch.optim's optimizers import it anyway)
        console.phase("enabling deterministic algorithms")
        set_determinism(cfg.deterministic, cuda)
    data = TrainData(
        cfg.data.data_dir, manifest, cfg.data, pad_multiple=mesh.tp, vocab_size=cfg.model.vocab_size
    )
    val = None
    if cfg.eval.interval and (manifest.get("validation") or {}).get("num_sequences"):
        val = ValidationSet(cfg.data.data_dir, manifest)
    elif cfg.eval.interval and de.rank == 0:
        # Synthetic task directories hold train/test splits, not validation sequences.
        print(
            f"[train] {cfg.data.data_dir} has no validation sequences: in-loop validation is "
            "off (a synthetic task: score it with python -m eval --suite synthetic)",
            flush=True,
        )

    console.phase("building the model")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
    # Initialised where it trains (drawing 11B weights (E=64) on the host took minutes), and
    # under tensor/expert parallel only this rank's shards, the slices of the plain model.
    device = torch.device("cuda", device_index) if cuda else torch.device("cpu")
    model = build_parallel_model(cfg, mesh, device)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, cfg.schedule, cfg.max_steps)
        )

    groups = param_groups(model)
    if mesh.ep > 1:
        from pretrain.parallel.expert import prepare_expert_parallel_for_deepspeed

        # expert shards: their own optimizer groups, gradients reduced over expert-dp only
        groups = prepare_expert_parallel_for_deepspeed(model, mesh, groups)
    console.phase("building the DeepSpeed engine")
    engine, *_ = deepspeed.initialize(
        # the device chosen from those visible (pretrain.launch.cuda_device_index): without it
        # DeepSpeed would take cuda:LOCAL_RANK
        args=None if device_index is None else SimpleNamespace(device_rank=device_index),
        model=model,
        model_parameters=groups,
        config=ds_cfg,
        lr_scheduler=schedule,
        mpu=build_mpu(mesh),  # ZeRO over the data-parallel group only
    )
    keep_stage0_grad_norm(engine)
    reduce_gradients_in_place(engine)  # ZeRO 1 with one dp rank: one copy, not four passes
    # Per-rank RNG streams (restored from the checkpoint on resume).
    random.seed(cfg.seed * 1009 + de.rank)
    np.random.seed(cfg.seed * 1009 + de.rank)
    torch.manual_seed(cfg.seed * 1009 + de.rank)

    tok_sha = manifest["tokenizer"]["sha256"]
    trainer = Trainer(cfg, engine, data, val, sizes, mesh, tok_sha, callbacks=[])
    console.phase(f"looking for a checkpoint in {cfg.checkpoint_dir}")
    tag = trainer.resume()
    write_run_config(cfg, de.rank)
    logger = MetricsLogger(
        cfg.run_dir,
        cfg.logging,
        cfg.model_dump(mode="json"),
        de.rank,
        resume_step=trainer.state.step if tag else None,
    )
    logger.listeners.append(console.on_metrics)
    trainer.callbacks = [
        LoggingCallback(logger, cfg, flops_per_token(cfg)),
        EvalCallback(logger, cfg),
        console,
        CheckpointCallback(cfg, logger),  # last: a save sees the step's logging and eval done
    ]
    if cfg.stop_on_plateau is not None:  # before CheckpointCallback: its stop step is saved
        from pretrain.plateau import PlateauStop, steps_per_pass

        per_pass = steps_per_pass(data.samples_per_pass, sizes.global_batch)
        plateau = PlateauStop(cfg.stop_on_plateau, per_pass, logger.log)
        at = next(i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, CheckpointCallback))
        trainer.callbacks.insert(at, plateau)
    if profile:
        from pretrain.profiler import ProfilerCallback

        trainer.callbacks.append(
            ProfilerCallback(profile, cfg.run_dir, de.rank, trainer.state.step)
        )
    console.banner(trainer, model_name, "bf16" if ds_cfg.get("bf16") else "fp32", tag)
    console.line(reproducibility_line(cfg.deterministic, cuda))
    if de.rank == 0 and data.packing == "document":
        print("[train] document packing: one document per sample at position 0", flush=True)
    try:
        code = trainer.fit()
        trainer.report_checkpoints(wait=True)  # a background save completes before exit
    finally:
        logger.close()
    console.summary(trainer, code)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return code


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = None
    if args.profile:
        from pretrain.profiler import parse_profile_range

        profile = parse_profile_range(args.profile)
    if not args.dry_run:
        install_stop_handlers()  # entry points that import main() (e.g. test wrappers)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    de = dist_env()
    console = Console(de.rank)
    sizes = derived_sizes(cfg, de.world_size)
    if not args.dry_run:
        from pretrain.preflight import check_run_inputs

        check_run_inputs(cfg)  # paths and data, before torch and DeepSpeed are imported
    import torch

    from pretrain.parallel import build_mesh

    cuda = torch.cuda.is_available()
    mesh = build_mesh(cfg, de.world_size, de.rank)
    precision = resolve_precision(cfg, cuda)
    ds_cfg = deepspeed_config(cfg, sizes, precision)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print("# derived: " + json.dumps({**asdict(sizes), "precision": precision}))
        print("# deepspeed: " + json.dumps(ds_cfg, sort_keys=True))
        return 0
    name = model_label(args.config, args.overrides)
    return train(cfg, ds_cfg, sizes, mesh, de, cuda, console, name, profile)


if __name__ == "__main__":
    sys.exit(main())
