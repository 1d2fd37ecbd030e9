"""Training config: one `TrainConfig`, validated here and nowhere else.

`python -m pretrain --config configs/train/X.yaml key.sub=value ...` loads it through
`mop.config.load_config`. `model` may be a path to a model YAML (resolved against the working
directory, then the repository root); the resolved run config always holds the full model
section, so a run directory is reproducible on its own.

Sizes that depend on the world size (data-parallel degree, global batch) are derived by
`derived_sizes` once the launcher's world size is known, and checked there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mop.config import StrictModel, find_config, load_config
from mop.errors import ConfigError
from pretrain.model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


class DataConfig(StrictModel):
    data_dir: str
    seq_len: int = Field(ge=1)
    # Seed of the sample order (source schedule and window permutations), not of the model init.
    seed: int = Field(0, ge=0)
    # Slots of the periodic source schedule; each period holds round(share * period) samples of
    # every source, shuffled by a seeded permutation. Larger = finer shares, same cost per sample.
    mixture_period: int = Field(1000, ge=1)
    # Pin the tokenizer: shards made with another tokenizer are refused.
    tokenizer_sha256: str | None = None
    # How documents become samples (pretrain/data.py). pack: documents concatenated and cut
    # into seq_len windows (pretraining). document: one document per sample at position 0,
    # padded to seq_len, padding excluded from the loss (a synthetic task whose eval asks
    # each entry at position 0, e.g. the phone-book). auto: what the data directory's
    # manifest asks for (`task.train_packing`, written by the phone-book generator), else pack.
    packing: Literal["auto", "pack", "document"] = "auto"


class OptimConfig(StrictModel):
    """AdamW; weight decay is not applied to norms, biases and embeddings."""

    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class ScheduleConfig(StrictModel):
    """Linear warmup, then cosine to min_lr, or warmup-stable-decay (linear decay at the end)."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # wsd: fraction of max_steps spent in the final decay.
    decay_fraction: float = Field(0.2, gt=0, le=1)


class BatchConfig(StrictModel):
    micro_batch: int = Field(1, ge=1)  # sequences per rank per forward
    grad_accum: int = Field(1, ge=1)
    # Optional: the global batch you expect; checked against micro x accum x dp at start-up.
    global_batch: int | None = Field(None, ge=1)


class CheckpointConfig(StrictModel):
    dir: str | None = None  # None = <run_dir>/checkpoints
    interval: int = Field(1000, ge=1)  # steps between saves (plus one at the end / preemption)
    keep_last: int = Field(2, ge=1)
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the latest complete save
    # Write ZeRO 1/2 saves in the background: the loop waits only for the copy of the state
    # to host memory (pretrain/checkpoint.py); ZeRO 0/3 saves are always synchronous.
    async_save: bool = True


class PlateauConfig(StrictModel):
    """Stop once the training loss averaged over one pass of the data (one epoch: for a
    synthetic task, the loss on the whole book) has not improved by more than `min_delta`
    for `patience` passes in a row (pretrain/plateau.py). max_steps still bounds the run.

    A book is first learned in format only (the loss sits at chance on the digits for many
    passes) and memorized later: `armed_below` and `min_passes` keep that first plateau from
    stopping the run. Passes count toward `patience` only once the pass loss has gone below
    `armed_below` (None: from the first pass) and the run has done `min_passes` passes."""

    metric: Literal["loss"] = "loss"
    patience: int = Field(3, ge=1)  # passes without improvement before stopping
    min_delta: float = Field(1e-3, ge=0)  # an improvement must lower the pass loss by more
    armed_below: float | None = None  # no stop before the pass loss is below this (nats/token)
    min_passes: int = Field(0, ge=0)  # no stop before this many passes


class SpikeConfig(StrictModel):
    """Loss-spike rollback (pretrain/spike.py). A step is suspicious when its loss is above
    `loss_ratio` x the median of the last `history` normal steps and `zscore` robust spreads
    above it, when its gradient norm is likewise above `grad_norm_ratio` x its median, or when
    it was non-finite. `min_suspicious` of the last `window` steps suspicious, at least one of
    them by its loss or non-finite (gradient-norm alarms alone never are) = a spike: the run
    returns to the newest save from before it, skips the batches from `skip_before` steps
    before the first suspicious one through the detection step, and goes on. Defaults are
    conservative: a clean run never rolls back."""

    enabled: bool = True
    history: int = Field(100, ge=2)  # normal steps in the reference statistics
    min_history: int = Field(20, ge=1)  # judging starts once the reference holds this many
    window: int = Field(8, ge=1)
    min_suspicious: int = Field(4, ge=1)
    loss_ratio: float = Field(1.5, gt=1)
    grad_norm_ratio: float = Field(10.0, ge=0)  # 0: the gradient norm is not judged
    zscore: float = Field(6.0, ge=0)
    skip_before: int = Field(1, ge=0)  # batches before the first suspicious step also skipped
    lr_factor: float = Field(1.0, gt=0, le=1)  # lr multiplier after a rollback ...
    lr_steps: int = Field(0, ge=0)  # ... for this many steps (0: the lr is not lowered)
    max_rollbacks: int = Field(3, ge=0)  # within rollback_span steps; one more stops (exit 67)
    rollback_span: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SpikeConfig:
        if self.min_suspicious > self.window:
            raise ValueError(
                f"spike.min_suspicious={self.min_suspicious} > spike.window={self.window}: "
                "a spike could never be declared"
            )
        if self.min_history > self.history:
            raise ValueError(f"spike.min_history={self.min_history} > spike.history={self.history}")
        return self


class FaultConfig(StrictModel):
    """Deliberate faults, to check the spike thresholds on your own setup (and for tests)."""

    # The update of this step is applied with its lr x spike_lr_factor, once per run: an
    # update that damages every weight (pretrain/spike.py).
    spike_at_step: int | None = Field(None, ge=1)
    spike_lr_factor: float = Field(1000.0, gt=1)


class EvalConfig(StrictModel):
    interval: int = Field(0, ge=0)  # steps between validation passes; 0 = off
    max_batches: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)  # validation sequences per rank per forward


WANDB_MODES = ("offline", "online", "disabled")
# wandb's other spellings of WANDB_MODE
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


class LoggingConfig(StrictModel):
    # Unset: WANDB_MODE from the environment, else offline (wandb's convention: the variable
    # decides unless the config sets the mode). Resolved here, so the saved config says which.
    wandb_mode: Literal["offline", "online", "disabled"] = Field(None, validate_default=True)
    project: str = "mixture-of-parrots"
    run_name: str | None = None
    log_interval: int = Field(10, ge=1)
    # Peak dense TFLOP/s of one device in the training precision (H100 SXM bf16: 989); None =
    # MFU not reported.
    peak_tflops: float | None = Field(None, gt=0)
    # Expert load per data source on log steps (MoE): counted from the step's own routing
    # over every micro-batch and data-parallel rank, so it costs no extra forward.
    expert_load_by_source: bool = True

    @field_validator("wandb_mode", mode="before")
    @classmethod
    def _wandb_mode_from_environment(cls, v: object) -> object:
        if v is not None:
            return v
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if not env:
            return "offline"
        mode = WANDB_MODE_ALIASES.get(env, env)
        if mode not in WANDB_MODES:
            raise ValueError(
                f"WANDB_MODE={os.environ['WANDB_MODE']!r} in the environment: use "
                f"{', '.join(WANDB_MODES)} (or set logging.wandb_mode)"
            )
        return mode


class ParallelConfig(StrictModel):
    """Model parallel degrees; data parallel is what is left of the world size."""

    tensor_parallel: int = Field(1, ge=1)
    expert_parallel: int = Field(1, ge=1)
    # Process-group timeout: a collective that waits longer (a hung or dead rank) fails the
    # job instead of holding the allocation; with TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    # (slurm/train.sbatch) NCCL aborts. Raise it if a checkpoint save outlasts it.
    timeout_minutes: float = Field(10.0, gt=0)


class TrainConfig(StrictModel):
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    batch: BatchConfig = BatchConfig()
    parallel: ParallelConfig = ParallelConfig()
    # ZeRO 0-3. Stages 1-3 skip non-finite steps through the ZeRO optimizer's overflow check;
    # stage 0 (a plain optimizer) through the trainer's own check
    # (deepspeed_compat.step_without_update).
    zero_stage: int = Field(1, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    # torch.compile each block (applied by pretrain.parallel.parallelize, after activation
    # checkpointing; the model's math is unchanged). Worth it on GPU; costs start-up time.
    compile: bool = False
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # reads WANDB_MODE at load
    max_steps: int = Field(ge=1)
    stop_on_plateau: PlateauConfig | None = None  # None: train to max_steps
    # A skipped (non-finite) step is also a suspicious step for the spike guard, which rolls
    # back after spike.min_suspicious of them in its window: with the defaults before this.
    max_nonfinite_in_a_row: int = Field(5, ge=1)
    spike: SpikeConfig = SpikeConfig()
    fault: FaultConfig = FaultConfig()
    run_dir: str
    seed: int = Field(0, ge=0)  # model init and per-rank RNG seeds
    # torch.use_deterministic_algorithms: true (warn_only: bitwise on a CPU, up to kernel
    # nondeterminism on CUDA), strict (bitwise on CUDA too: errors on an op without a
    # deterministic kernel), false. pretrain/launch.py set_determinism.
    deterministic: bool | Literal["strict"] = True

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_path(cls, v):
        if isinstance(v, str):
            return cls.load_subconfig("model", v)
        return v

    @classmethod
    def load_subconfig(cls, key: str, path: str) -> dict:
        """A sub-config given as a YAML file path (only `model`), as a dict (mop.config)."""
        if key != "model":
            raise ConfigError(f"{key}={path}: only model= takes a file")
        return load_config(ModelConfig, resolve_path(path)).model_dump(mode="json")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.model.causal:
            # A non-causal model (Soft MoE) sees the tokens it must predict: its LM loss would
            # fall to ~0 and mean nothing. A sweep that globs configs/model/ would pick it up.
            raise ValueError(
                f"model.causal=false (model.ffn={self.model.ffn}): pretrain trains a causal "
                "language model and a non-causal model would see future tokens; train it with "
                "python -m pretrain.memorization (classification) instead"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} > model.max_seq_len={self.model.max_seq_len}"
            )
        if self.zero_stage == 3 and self.model.ffn == "moe":
            # DeepSpeed's stage-3 gather/release of parameters breaks the MoE backward (the
            # expert weights are used through views, not nn.Linear): seen as a size-0 tensor.
            raise ValueError(
                "zero_stage=3 with model.ffn=moe is not supported (DeepSpeed's stage-3 "
                "parameter partitioning fails in the MoE backward); use zero_stage 1 or 2"
            )
        if self.parallel.expert_parallel > 1 and self.zero_stage == 0:
            # Stage 0 saves module and optimizer from rank 0 only: the other ranks' expert
            # shards and their Adam moments would be lost at the first resume (seen: resumed
            # losses off by 1e-4 with every rank holding rank 0's experts).
            raise ValueError(
                "parallel.expert_parallel > 1 needs zero_stage 1 or 2 (stage 0 checkpoints "
                "hold only rank 0's experts, so a resume would lose the others)"
            )
        at = self.fault.spike_at_step
        if at is not None and at > self.max_steps:
            raise ValueError(
                f"fault.spike_at_step={at} > max_steps={self.max_steps}: it would never fire"
            )
        if self.schedule.warmup_steps > self.max_steps:
            raise ValueError(
                f"schedule.warmup_steps={self.schedule.warmup_steps} > max_steps={self.max_steps}"
            )
        return self

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")


def resolve_path(path: str) -> str:
    """A relative config path: the working directory first, then the repository root."""
    p = find_config(path)
    if not p.exists():
        raise ConfigError(f"model config file not found: {path} (nor under {REPO_ROOT})")
    return str(p)


@dataclass(frozen=True)
class DerivedSizes:
    world_size: int
    dp: int
    tp: int
    micro_batch: int
    grad_accum: int
    global_batch: int  # sequences per optimizer step, all ranks
    tokens_per_step: int


def derived_sizes(cfg: TrainConfig, world_size: int) -> DerivedSizes:
    """World layout and batch sizes, derived once; a wrong combination is a ConfigError."""
    tp = cfg.parallel.tensor_parallel
    if world_size % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide the world size {world_size} "
            "(tp x dp must equal the number of processes)"
        )
    dp = world_size // tp
    global_batch = cfg.batch.micro_batch * cfg.batch.grad_accum * dp
    if cfg.batch.global_batch is not None and cfg.batch.global_batch != global_batch:
        raise ConfigError(
            f"batch.global_batch={cfg.batch.global_batch} but micro_batch "
            f"{cfg.batch.micro_batch} x grad_accum {cfg.batch.grad_accum} x dp {dp} = "
            f"{global_batch}; change grad_accum or micro_batch (or drop global_batch)"
        )
    return DerivedSizes(
        world_size=world_size,
        dp=dp,
        tp=tp,
        micro_batch=cfg.batch.micro_batch,
        grad_accum=cfg.batch.grad_accum,
        global_batch=global_batch,
        tokens_per_step=global_batch * cfg.data.seq_len,
    )


def resolve_precision(cfg: TrainConfig, cuda: bool) -> Literal["fp32", "bf16"]:
    if cfg.precision == "auto":
        return "bf16" if cuda else "fp32"
    return cfg.precision
