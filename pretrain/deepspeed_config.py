"""The DeepSpeed config dict, generated from `TrainConfig` (nobody keeps a second JSON)."""

from __future__ import annotations

from typing import Any

from pretrain.config import DerivedSizes, TrainConfig


def deepspeed_config(
    cfg: TrainConfig, sizes: DerivedSizes, precision: str, cuda: bool
) -> dict[str, Any]:
    """Our config -> DeepSpeed's. The lr schedule is ours (a LambdaLR passed to initialize),
    so DeepSpeed gets no `scheduler` section. The optimizer is torch's AdamW through
    DeepSpeed's `torch_adam` switch (see `adamw_kernel`). Activation checkpointing is applied
    by `pretrain.parallel`, not by DeepSpeed."""
    o = cfg.optim
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": sizes.micro_batch,
        "gradient_accumulation_steps": sizes.grad_accum,
        "train_batch_size": sizes.global_batch,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                **adamw_kernel(cuda),
            },
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        # Our own metrics logger reports; silence DeepSpeed's periodic prints.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # check_grad_overflow: a non-finite gradient skips the step (counted by the trainer).
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return ds


def adamw_kernel(cuda: bool) -> dict[str, bool]:
    """How torch's AdamW updates all parameters at once instead of one at a time.

    CUDA: `fused` (one kernel per parameter group; no JIT build, unlike DeepSpeed's FusedAdam,
    whose op build added tens of seconds and compiler output to every start). CPU: `foreach`
    (multi-tensor ops; the same arithmetic as the per-parameter loop). DeepSpeed 0.19.8 passes
    these keys through to `torch.optim.AdamW` when `torch_adam` is set (it pops `foreach`
    and hands it on; `fused` goes with the other params)."""
    return {"fused": True} if cuda else {"foreach": True}
