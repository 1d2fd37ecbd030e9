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

import functools
import sys
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
    # ZeRO 1 in one data-parallel rank: the gradient hand-over (reduce_gradients_in_place)
    ("deepspeed.runtime.zero.stage_1_and_2", "GradPartitionBufferGroup"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "reduce_gradients"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "averaged_gradients"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "params_in_partition"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "partition_size"),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "grad_partition_insertion_offset",
    ),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "get_param_id"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "dp_process_group"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "partition_gradients"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "dtype"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "cpu_offload"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "overlap_comm"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "use_grad_accum_attribute"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "sequence_parallel_size"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "_is_muon_group"),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_use_compact_grad_partition_buffer",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_get_preflattened_grad_partition",
    ),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "_clear_param_grad_only"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "_release_ipg_buffers"),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_epilogue_ran_this_backward",
    ),
    # ZeRO 1/2: where each parameter's fp32 master and Adam moments sit in this rank's
    # partition (set on every lp parameter by mixed_precision_linkage.link_hp_params)
    ("deepspeed.utils.mixed_precision_linkage", "link_hp_params"),
    ("deepspeed.utils.tensor_fragment.tensor_fragment", "lp_fragment_address"),
    ("deepspeed.utils.tensor_fragment.tensor_fragment", "get_hp_fragment"),
    ("deepspeed.utils.tensor_fragment.tensor_fragment", "get_optim_state_fragment"),
    # the engine: stage-0 grad norm, skipped steps, model-parallel size
    ("deepspeed.runtime.engine.DeepSpeedEngine", "clip_fp32_gradients"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "_global_grad_norm"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "skipped_steps"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "mp_world_size"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "global_steps"),
    ("deepspeed.runtime.engine.DeepSpeedEngine", "global_samples"),
    # the engine-format save (ZeRO 0/3): the files each rank writes go through this object
    ("deepspeed.runtime.engine.DeepSpeedEngine", "checkpoint_engine"),
    ("deepspeed.runtime.utils", "clip_grad_norm_"),
    # start-up: Muon's module-level torch.compile decorators (defer_muon_compile)
    ("deepspeed.runtime.compiler", "compile"),
    ("deepspeed.runtime.zero.muon.muon_optimizer", "MuonWithAuxAdam"),
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


# Start-up ---------------------------------------------------------------------------------------
def defer_muon_compile() -> None:
    """Import DeepSpeed's Muon optimizer with its `torch.compile` decorators made lazy.

    DeepSpeed imports `deepspeed.runtime.zero.muon` while checking the optimizer in
    `deepspeed.initialize` and again in ZeRO's first gradient reduction (to test for Muon
    groups). That module decorates three functions with `torch.compile` at import time, and
    building the decorator imports torch's whole compiler stack (torch._inductor): 2.3 s of a
    13 s start-up on the 2-core machine, for a run that trains with AdamW and never calls them.
    Imported here first, each decorated function compiles at its first call instead (so a
    Muon run gets the same compiled functions), and later imports find the module loaded.
    Idempotent."""
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    import deepspeed.runtime.compiler as ds_compiler

    def lazy_compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    eager_compile = ds_compiler.compile
    ds_compiler.compile = lazy_compile
    try:
        __import__(name)
    except ImportError:  # DeepSpeed itself tolerates a missing Muon
        pass
    finally:
        ds_compiler.compile = eager_compile


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


def reduce_gradients_in_place(engine) -> bool:
    """ZeRO 1 with one data-parallel rank (every CPU run, a single GPU, tensor parallel alone):
    hand the gradients to the optimizer with one copy each instead of four passes.

    With dp = 1 the reduction is the identity, but DeepSpeed 0.19.8 still runs it: each
    gradient is copied into a 5e8-element bucket, the bucket is divided by the world size (1),
    copied again into a contiguous partition, and `step()` concatenates the per-parameter
    views of that partition into a third flat tensor. Here each gradient is copied once into a
    flat buffer kept for the run, laid out exactly as that concatenation (DeepSpeed's own
    insertion offsets, zero padding), and handed over as the "pre-flattened" gradient group
    `step()` takes as is (`GradPartitionBufferGroup`, the form DeepSpeed's compiled backward
    hands it). The optimizer then sees the same values in the same layout: the norm, the
    clipping and AdamW are DeepSpeed's, on the same numbers, so training is bitwise the same.
    The CPU profile's 16-expert MoE spent ~30 ms of a 716 ms step in the reduction and ~45 ms
    in the concatenation (bench/RESULTS.md).

    Applies only where all of that holds: ZeRO stage 1, every group's data-parallel size 1, no
    offload, no overlapped communication, no separate accumulation dtype, no Muon groups (their
    update is computed while flattening). Elsewhere DeepSpeed's path runs unchanged. Returns
    whether the fast path is on."""
    from deepspeed.runtime.zero.stage_1_and_2 import (
        DeepSpeedZeroOptimizer,
        GradPartitionBufferGroup,
    )

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer) or engine.zero_optimization_stage() != 1:
        return False
    groups = [opt.dp_process_group, *opt.real_dp_process_group]
    if any(dist.get_world_size(group=g) != 1 for g in groups) or opt.sequence_parallel_size != 1:
        return False
    if opt.partition_gradients or opt.cpu_offload or opt.overlap_comm:
        return False
    if opt.use_grad_accum_attribute:
        return False
    for i, params in enumerate(opt.params_in_partition):
        if opt._use_compact_grad_partition_buffer(i) or (params and opt._is_muon_group(params)):
            return False

    def padding(flat: torch.Tensor, start: int, end: int) -> torch.Tensor:
        pad = flat.narrow(0, start, end - start)
        pad._zero_padding = True  # left out of the norm, as DeepSpeed's padding is
        return pad

    # The layout once: per group a flat buffer kept for the run, the view of it each parameter's
    # gradient goes to, and the padding between and after them.
    layouts: list[tuple[GradPartitionBufferGroup, list, list[torch.Tensor]]] = []
    for i, params in enumerate(opt.params_in_partition):
        size = int(opt.partition_size[i])
        device = opt.single_partition_of_fp32_groups[i].device  # where the master lives
        flat = torch.zeros(size, dtype=opt.dtype, device=device)
        views: list[torch.Tensor] = []
        targets: list[tuple[nn.Parameter, torch.Tensor]] = []
        pads: list[torch.Tensor] = []
        end = 0
        for p in params:
            offset = int(opt.grad_partition_insertion_offset[i][0][opt.get_param_id(p)])
            if offset > end:
                pads.append(padding(flat, end, offset))
                views.append(pads[-1])
            targets.append((p, flat.narrow(0, offset, p.numel()).view(p.shape)))
            views.append(targets[-1][1])
            end = offset + p.numel()
        if end < size:
            pads.append(padding(flat, end, size))
            views.append(pads[-1])
        layouts.append((GradPartitionBufferGroup(views, flat), targets, pads))

    @torch.no_grad()
    def hand_over(pipeline_parallel: bool = False) -> None:
        for i, (group, targets, pads) in enumerate(layouts):
            for p, view in targets:
                if p.grad is None:  # a parameter the loss did not reach: DeepSpeed uses zeros
                    view.zero_()
                else:
                    view.copy_(p.grad)
            for pad in pads:  # zero as in DeepSpeed's fresh padding (the clip scaled it in place)
                pad.zero_()
            opt.averaged_gradients[i] = group
        # what DeepSpeed's epilogue leaves behind: no .grad, no bucket, the backward seen
        opt._clear_param_grad_only()
        opt._release_ipg_buffers()
        opt._epilogue_ran_this_backward = True

    opt.reduce_gradients = hand_over
    return True


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


ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def step_for_group(step: Any, group: dict[str, Any], param: torch.Tensor) -> Any:
    """Adam's `step` where torch's own `Optimizer.load_state_dict` puts it: on the parameter's
    device as float32 for fused and capturable groups (their kernels read it on the device:
    a host tensor there is an illegal memory access on CUDA), unchanged otherwise."""
    if not torch.is_tensor(step):
        step = torch.tensor(float(step), dtype=torch.float32)
    if group.get("fused") or group.get("capturable"):
        return step.to(dtype=torch.float32, device=param.device)
    return step.clone()


def init_zero_adam_state(engine, steps: list, saved_groups: list[dict[str, Any]] | None) -> None:
    """Before a resharded resume writes the optimizer state: give the ZeRO 1/2 inner AdamW
    each group's step (and, from a DeepSpeed-format save, its saved hyperparameters), create
    its (lazily built) moment buffers, and let ZeRO link each parameter's fragment of them (as
    its own first step would). `steps`: one per inner group."""
    zero = engine.optimizer
    opt = zero.optimizer  # the torch AdamW over this rank's flat fp32 partitions
    for i, (group, step) in enumerate(zip(opt.param_groups, steps, strict=True)):
        if saved_groups is not None:  # lr (set by the schedule), betas, weight decay as saved
            group.update({k: v for k, v in saved_groups[i].items() if k != "params"})
        for flat in group["params"]:
            st = opt.state[flat]
            st["step"] = step_for_group(step, group, flat)
            for key in ADAM_STATE_KEYS:
                st.setdefault(key, torch.zeros_like(flat))
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def zero_adam_steps(engine) -> list[float]:
    """The Adam step of each inner optimizer group (0 before the first update)."""
    opt = engine.optimizer.optimizer
    out = []
    for group in opt.param_groups:
        step = opt.state[group["params"][0]].get("step", 0) if group["params"] else 0
        out.append(float(step))
    return out


def zero_fragments(engine) -> list[tuple[str, torch.Tensor, int, int, dict[str, torch.Tensor]]]:
    """This rank's ZeRO 1/2 share of every trainable parameter: (name, parameter, start,
    numel, {"fp32" | "exp_avg" | "exp_avg_sq": 1-D view}) where start/numel locate the share
    in the flattened (tensor/expert-parallel local) parameter and the views are the fp32
    master's and the Adam moments' elements in this rank's flat partition (writing into a
    view writes the optimizer state). Parameters with no elements on this rank are left out.
    Before the first update (a save of step 0) the moments are created as zeros with step 0,
    which is what AdamW's own first step would start from."""
    opt = engine.optimizer.optimizer
    if any(not opt.state[flat] for g in opt.param_groups for flat in g["params"]):
        init_zero_adam_state(engine, [0] * len(opt.param_groups), None)
    # Link again: ZeRO links every group's fragments to the optimizer state right after the
    # FIRST group's first step, when the later groups' state does not exist yet, and never
    # again (their optim fragments stay empty). The links are views: relinking is cheap.
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = []
    for name, p in engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue
        address = mapping.lp_fragment_address
        views = {"fp32": mapping.get_hp_fragment()}
        for key in ADAM_STATE_KEYS:
            views[key] = mapping.get_optim_state_fragment(key)
        out.append((name, p, int(address.start), int(address.numel), views))
    return out


def engine_counters(engine) -> dict[str, int]:
    """The engine's own step counters (DeepSpeed restores them from its checkpoint files)."""
    return {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
    }


def set_engine_counters(engine, counters: dict[str, int]) -> None:
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])


def record_engine_writes(engine) -> list[str]:
    """Paths the engine's next `save_checkpoint` writes on this rank, filled as it writes
    (DeepSpeed writes every model and optimizer file through `engine.checkpoint_engine.save`);
    call `stop_recording_engine_writes(engine)` after the save."""
    ce = engine.checkpoint_engine
    written: list[str] = []
    original = ce.save

    def save(state_dict, path, *args, **kwargs):
        written.append(str(path))
        return original(state_dict, path, *args, **kwargs)

    ce.save = save  # on the instance: `stop_recording_engine_writes` uncovers the class's
    return written


def stop_recording_engine_writes(engine) -> None:
    engine.checkpoint_engine.__dict__.pop("save", None)


def copy_masters_to_model(engine) -> None:
    """The module's (bf16 or fp32) weights from the restored ZeRO fp32 masters."""
    engine.optimizer.update_lp_params()
