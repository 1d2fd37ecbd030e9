"""The DeepSpeed config dict, generated from `TrainConfig` (nobody keeps a second JSON)."""

from __future__ import annotations

from typing import Any

from pretrain.config import DerivedSizes, TrainConfig


def deepspeed_config(cfg: TrainConfig, sizes: DerivedSizes, precision: str) -> dict[str, Any]:
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
                **adamw_kernel(),
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
        ds.update(bf16_gradient_dtypes(cfg.zero_stage))
    return ds


def bf16_gradient_dtypes(zero_stage: int) -> dict[str, Any]:
    """Where bf16 gradients are summed in fp32 (DeepSpeed 0.19.8 sums in the model's dtype
    unless told), path by path:

    - the data-parallel and expert-data-parallel reductions (ZeRO's buckets, every stage):
      `communication_data_type: fp32`. A bf16 ring all-reduce rounds after each of the dp - 1
      additions, so the error of the mean grows with the number of ranks (63 roundings at dp
      64); in fp32 the mean is rounded once. Cost: twice the bytes of each reduction.
    - the micro-batch accumulation: fp32 with ZeRO 2 (`data_types.grad_accum_dtype`: ZeRO
      accumulates each micro-batch's reduced gradient into an fp32 partition, 1/dp of the
      model). ZeRO 0 and 1 keep it in bf16: there DeepSpeed answers fp32 accumulation by
      switching to its BF16_Optimizer (ZeRO 1) or refusing (ZeRO 0), and the BF16_Optimizer's
      state layout is not the one our checkpoint, resharding and expert-parallel code reads
      (pretrain.deepspeed_compat). With ZeRO 1 the `batch.grad_accum` micro-batch gradients
      are summed in bf16 in `.grad` before the (fp32) reduction; pick zero_stage=2 when
      grad_accum is large.
    - the tensor-parallel sum of replicated weights' gradients: fp32 in
      pretrain.parallel.mappings.all_reduce_grad_hook (not a DeepSpeed setting)."""
    out: dict[str, Any] = {"communication_data_type": "fp32"}
    if zero_stage == 2:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def adamw_kernel() -> dict[str, bool]:
    """How torch's AdamW updates all parameters at once instead of one at a time: `fused`, on
    CUDA and on CPU alike.

    One pass over each element (parameter, gradient, both moments read once, written once).
    No JIT build, unlike DeepSpeed's FusedAdam, whose op build added tens of seconds and
    compiler output to every start. On a CPU the multi-tensor `foreach` path it replaces ran
    about eight passes with full-size temporaries over ZeRO's flat fp32 partition: 220 ms
    against 40 ms a step for the 38.9M parameters of the 16-expert CPU profile, most of that
    step's gap to the transformers loop (bench/RESULTS.md). The update is the same formula;
    its last-bit rounding differs from foreach's (at most ~2e-7 on unit-scale weights after a
    few steps), so fp32 CPU runs do not repeat, bit for bit, those of commits before the
    switch; a run still repeats itself, and data/tensor/expert parallel still match one
    process (an elementwise kernel does not depend on how ZeRO partitions the tensor).
    DeepSpeed 0.19.8 hands `fused` to `torch.optim.AdamW` when `torch_adam` is set."""
    return {"fused": True}
