"""Every use of DeepSpeed's private internals, in one place (pinned: `deepspeed==` in
requirements.txt).

The rest of the project talks to DeepSpeed through its public API: `deepspeed.initialize`, the
engine's forward/backward/step/save_checkpoint/load_checkpoint and getters,
`deepspeed.utils.safe_set_full_*`, `zero_to_fp32`. What that API does not offer lives here, one
function per need. `INTERNALS` lists every private name these functions touch, and
tests/pretrain/test_deepspeed_compat.py checks each against the installed DeepSpeed: an upgrade
that renames or removes one fails there, by name, instead of deep inside a multi-rank run.

Callers import DeepSpeed lazily (it reads the environment at import time: see pretrain.launch),
so every function here imports what it needs inside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# (module or class, attribute) pairs this file relies on. Class entries name either a class
# attribute/method or an instance attribute its source assigns (`self.<name> =`).
INTERNALS: tuple[tuple[str, str], ...] = (
    # expert parallel: our process groups in DeepSpeed's registry
    ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP"),
    ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP"),
    ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP_RANKS"),
    ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP_RANKS"),
    # expert parallel: the marker layer the engine looks for (isinstance + these attributes)
    ("deepspeed.moe.layer.MoE", "set_deepspeed_parallelism"),
    ("deepspeed.moe.layer.MoE", "num_experts"),
    ("deepspeed.moe.layer.MoE", "ep_size"),
    ("deepspeed.moe.layer.MoE", "expert_group_name"),
    ("deepspeed.moe.layer.MoE", "num_local_experts"),
    ("deepspeed.moe.utils", "split_params_into_different_moe_groups_for_optimizer"),
    # ZeRO 1/2 optimizer state (expert restore after load, resharded resume)
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "is_moe_param_group"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "real_dp_process_group"),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "parallel_partitioned_bit16_groups",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "single_partition_of_fp32_groups",
    ),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "optimizer"),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_hp_optimizer_states_linked",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_lazy_init_hp_params_optimizer_state",
    ),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "update_lp_params"),
    # the engine: stage-0 grad norm, skipped steps, model-parallel size
    ("deepspeed.runtime.engine.DeepSpeedEngine", "clip_fp32_gradients"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "_global_grad_norm"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "skipped_steps"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "mp_world_size"),
    ("deepspeed.runtime.utils", "clip_grad_norm_"),
)


# Expert parallel ------------------------------------------------------------------------------
def register_expert_groups(name: str, ep_group, expert_dp_group) -> None:
    """Put OUR expert groups into DeepSpeed's registry under `name`, so the engine and ZeRO
    never build their own (DeepSpeed's own layout would ignore the tensor-parallel placement
    of our mesh). `groups._get_max_expert_size` parses the size out of `name` (ep_size_<ep>)."""
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_dp_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert_dp_group)


def moe_marker(num_experts: int, ep: int, group_name: str) -> nn.Module:
    """A parameter-free `deepspeed.moe.layer.MoE` instance: the engine switches its MoE
    handling on (expert dp groups in ZeRO, expert-aware broadcast) only when it finds one."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # skip DeepSpeed's layer construction on purpose
            self.num_experts = num_experts
            self.ep_size = ep
            self.expert_group_name = group_name
            # 0: DeepSpeed's per-expert checkpoint files stay empty (our expert shards live in
            # the module state + ZeRO optimizer partitions; see pretrain.parallel.expert).
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False):
            pass  # the groups are ours, registered by register_expert_groups

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeed MoE marker is not a layer")

    return DeepSpeedMoEMarker()


def split_moe_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each optimizer group split into a dense group and a `moe=True` group of the parameters
    tagged `allreduce=False` + `group_name` (reduced over that expert-data-parallel group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    # list(): DeepSpeed's splitter walks each group's params twice (a generator would be empty).
    named = [
        {"name": f"group{i}", **g, "params": list(g["params"])} for i, g in enumerate(param_groups)
    ]
    # max_group_size=None: no further splitting by size (one moe group per base group).
    return split_params_into_different_moe_groups_for_optimizer(named, max_group_size=None)


@torch.no_grad()
def restore_expert_partitions(engine) -> None:
    """Copy each rank's ZeRO 1/2 fp32 master partition of the expert groups into the module
    weights and re-gather the partitions inside each expert-data-parallel group (what ZeRO
    would do only at the next step, after a forward with the wrong experts)."""
    opt = engine.optimizer
    for i, is_moe in enumerate(getattr(opt, "is_moe_param_group", [])):
        if not is_moe:
            continue
        group = opt.real_dp_process_group[i]
        parts = opt.parallel_partitioned_bit16_groups[i]  # views into the module's flat buffer
        mine = parts[dist.get_rank(group=group)]
        mine.copy_(opt.single_partition_of_fp32_groups[i].to(mine.dtype))
        if len(parts) > 1:
            dist.all_gather(list(parts), mine.clone(), group=group)


# The training step ------------------------------------------------------------------------------
def keep_stage0_grad_norm(engine) -> None:
    """fp32 without ZeRO: DeepSpeed clips with `clip_grad_norm_` but drops the global norm it
    computed (get_global_grad_norm() stays None); keep it, so grad_norm is logged on every
    path. (The ZeRO and bf16 optimizers record theirs.)"""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_norm() -> None:
        norm = clip_grad_norm_(
            parameters=engine.module.parameters(),
            max_norm=engine.gradient_clipping(),
            mpu=engine.mpu,
        )
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_keep_norm


def step_without_update(engine) -> None:
    """ZeRO stage 0 has no overflow check: a plain optimizer would apply NaN gradients. Zero
    the gradients and let DeepSpeed close the accumulation window with the optimizer's and the
    lr schedule's step switched off, as the ZeRO optimizers do when they skip a step."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    # torch may already hold a wrapped `step` on the instance (lr schedulers patch the
    # optimizer's): keep whatever is there and put exactly that back.
    saved = [(obj, obj.__dict__.get("step")) for obj in (engine.optimizer, engine.lr_scheduler)]
    for obj, _ in saved:
        obj.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        for obj, original in saved:
            if original is None:
                del obj.step
            else:
                obj.step = original
    engine.skipped_steps += 1


# Checkpoints ------------------------------------------------------------------------------------
def model_parallel_size(engine) -> int:
    """The tensor-parallel size the engine was built with (1 without an mpu)."""
    return int(engine.mp_world_size)


def init_zero_adam_state(engine, steps: list, saved_groups: list[dict[str, Any]]) -> None:
    """Before a resharded resume writes the full optimizer state: give the ZeRO 1/2 inner AdamW
    each group's saved hyperparameters and step, create its (lazily built) moment buffers, and
    let ZeRO link each parameter's fragment of them (as its own first step would)."""
    zero = engine.optimizer
    opt = zero.optimizer  # the torch AdamW over this rank's flat fp32 partitions
    for group, step, saved in zip(opt.param_groups, steps, saved_groups):
        # lr (set by the schedule after each step), betas, weight decay as saved.
        group.update({k: v for k, v in saved.items() if k != "params"})
        for flat in group["params"]:
            st = opt.state[flat]
            st["step"] = step.clone() if torch.is_tensor(step) else step
            st.setdefault("exp_avg", torch.zeros_like(flat))
            st.setdefault("exp_avg_sq", torch.zeros_like(flat))
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def copy_masters_to_model(engine) -> None:
    """The module's (bf16 or fp32) weights from the restored ZeRO fp32 masters."""
    engine.optimizer.update_lp_params()
