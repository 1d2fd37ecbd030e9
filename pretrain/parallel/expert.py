"""Expert parallelism (EP) for the dropless top-k MoE layer, applied to a plain model from outside.

Layout. The `ep` ranks of one `mesh.ep_group` share one copy of the experts: rank `ep_rank`
owns experts `[ep_rank*E/ep, (ep_rank+1)*E/ep)`, i.e. those rows of `w1`, `v1`, `w2`
(megablocks GLU layout, `[E*f, d]` -> `[E/ep*f, d]`). Parameter names do not change. The router
stays replicated (it is data parallel like every non-expert weight). Ranks holding the same
shard form `mesh.expert_dp_group` (dp/ep ranks); expert gradients are reduced there only.

Forward of one layer (dropless, no capacity factor):
  route the local tokens -> sort the N*k assignments by expert -> all_to_all the per-expert
  counts -> all_to_all the token rows to the owners (variable splits) -> regroup by local expert
  -> run the local experts (`local_expert_gemm`: grouped_gemm's gmm with moe.backend=megablocks,
  else the torch backend's grouped GEMM on CUDA bf16 or its loop) -> all_to_all
  back -> weight and scatter-add into the token order. Both all_to_alls are autograd-aware:
  the backward of one is the reverse exchange, so expert weight gradients arrive already summed
  over the ep ranks of the group.

Aux losses are computed on each rank's LOCAL tokens: z-loss is a mean (its average over ranks
equals the global one for equal token counts), but the load-balancing loss E*sum f_e*P_e is a
product of two means, so the per-rank value averaged over ranks differs from the value on the
global batch (the same holds for plain data parallelism and for DeepSpeed/Megatron MoE, which
also balance per micro-batch). Expert-load statistics are also per rank.

Prerequisite: every rank builds the model from the same seed (as `python -m pretrain` does), so
the full expert weights are identical before `apply_expert_parallel` slices them.

Gradient semantics (what any optimizer wrapper must do): with per-rank losses L_r and the
global loss L = mean_r L_r over the dp ranks,
  - non-expert grads: all-reduce SUM over the dp group, divide by dp (ordinary data parallel);
  - expert grads: all-reduce SUM over `expert_dp_group`, divide by dp (NOT by its size: the
    all_to_all backward has already summed the ep ranks' contributions).
DeepSpeed ZeRO 1/2 does exactly this for params with `allreduce=False` + `group_name` in a
param group marked `moe=True` (it reduces them over `expert_data_parallel_group[group_name]`,
scaled by the full dp size).

What the trainer must do (DeepSpeed path), in this order:
  1. `model = apply_expert_parallel(model, mesh)` before tensor parallel and activation
     checkpointing (`pretrain.parallel.parallelize` order) -- needs mesh.ep, mesh.ep_rank,
     mesh.ep_group, mesh.expert_dp_group.
  2. `groups = prepare_expert_parallel_for_deepspeed(model, mesh, param_groups(model))`
     (AFTER `deepspeed` is importable/initialised env-wise, BEFORE `deepspeed.initialize`).
     It registers our groups in DeepSpeed's `deepspeed.utils.groups` under the name
     `ep_size_{ep}`, attaches a parameter-free marker module so the engine switches its MoE
     handling on, and returns the optimizer groups split into dense and `moe=True` groups.
  3. `deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg, ...)`.
     Tested: ZeRO stage 1 and 2 (fp32, gloo, 2 ranks). ZeRO-3 is not tested.
  4. After every `engine.load_checkpoint(...)` (pretrain/checkpoint.load; optimizer states
     must be loaded, as they are there): `restore_expert_weights_after_load(engine)` on every
     rank. DeepSpeed writes the module file from dp rank 0 only, so the load leaves rank 0's
     expert shards in every rank's module; each rank's own shard is in its ZeRO optimizer file,
     and this copies it back before the next forward.
  For export/consolidation: `gather_expert_weights(model, mesh)` (collective) returns a state
  dict of full tensors that loads into the single-process model.
Gradient clipping: ZeRO 1/2 sum each rank's squared partition norm over the FULL dp group, so
every expert shard counts exactly once and the clipped global norm equals the single-process
one (tests/pretrain/test_parallel_equivalence.py runs EP=2 with clipping active; bf16 too in
test_bf16_cpu.py). ZeRO stage 0 is refused with ep > 1 (its checkpoints keep rank 0's experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mop.errors import ConfigError, DataError
from pretrain.model.moe import MoE
from pretrain.model.moe_backends import (
    _expert_loop,
    compute_dtype,
    dispatch_combine,
    run_local_experts,
)
from pretrain.model.router import Routing
from pretrain.parallel.modules import replace_module

EXPERT_PARAM_NAMES = ("w1", "v1", "w2")


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of size ep (`groups._get_max_expert_size` parses it)."""
    return f"ep_size_{ep}"


def is_expert_param(p: Tensor) -> bool:
    """Same test as deepspeed.moe.utils.is_moe_param."""
    return getattr(p, "allreduce", True) is False


# Autograd-aware all-to-all ---------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward = the reverse exchange. (torch's own
    torch.distributed.nn.functional.all_to_all_single exists but is deprecated.)"""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    """Rows x[sum(send[:j]) : sum(send[:j+1])] go to rank j of `group`; returns the rows
    received, ordered by source rank (recv[j] rows from rank j)."""
    return _AllToAll.apply(x, send, recv, group)


# The expert-parallel layer ---------------------------------------------------------------------
@dataclass
class EPInfo:
    size: int
    rank: int
    group: Any  # torch.distributed ProcessGroup
    num_local_experts: int


class ExpertParallelMoE(MoE):
    """An `MoE` layer holding only this rank's experts; `apply_expert_parallel` swaps it in for
    each MoE layer. Routing, aux losses and parameter names are those of `MoE` (the router is
    the plain layer's own module); only `run_experts` differs: the all-to-all exchange."""

    def __init__(self, layer: MoE, ep: EPInfo) -> None:
        # MoE's constructor on the meta device: the layer's structure without allocating the
        # full experts a second time; the router and this rank's expert rows are then adopted
        # from `layer` (same registration order, so parameter order is unchanged).
        with torch.device("meta"):
            super().__init__(layer.d_model, layer.cfg, layer.ffn_hidden)
        self.router = layer.router
        self.ep = ep
        n = ep.num_local_experts * layer.ffn_hidden
        for pname in EXPERT_PARAM_NAMES:
            full = getattr(layer, pname)
            rows = full.detach()[ep.rank * n : (ep.rank + 1) * n]
            shard = nn.Parameter(rows.clone(), requires_grad=full.requires_grad)
            shard.allreduce = False
            shard.group_name = expert_group_name(ep.size)
            setattr(self, pname, shard)
        self.train(layer.training)

    def expert_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views [E/ep, f, d] of the LOCAL experts."""
        shape = (self.ep.num_local_experts, self.ffn_hidden, self.d_model)
        return self.w1.view(shape), self.v1.view(shape), self.w2.view(shape)

    def run_experts(self, flat: Tensor, routing: Routing) -> Tensor:
        # dispatch_combine sorts the assignments by global expert id, which groups them by
        # destination rank in the order the single-process torch backend uses.
        return dispatch_combine(flat, routing, lambda xs: self._exchange(xs, routing))

    def _exchange(self, xs: Tensor, routing: Routing) -> Tensor:
        """Rows grouped by global expert -> their expert outputs, in the same order, computed
        by the ranks that own the experts."""
        ep, local = self.ep, self.ep.num_local_experts
        counts = routing.tokens_per_expert  # [E]
        # recv_counts[j*local + e]: assignments rank j sends to my local expert e.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=ep.group)
        by_src = recv_counts.view(ep.size, local)
        # ONE device-to-host read per layer for every size on the host: the exchange's send
        # and receive splits and the local experts' group sizes (gmm and the loop take them
        # there). Under activation checkpointing the recomputed forward reads them again.
        sizes = torch.cat((counts.view(ep.size, local).sum(1), by_src.sum(1), by_src.sum(0)))
        host = sizes.tolist()
        send, recv, local_counts = host[: ep.size], host[ep.size : 2 * ep.size], host[2 * ep.size :]
        xr = all_to_all(xs, send, recv, ep.group)  # [M, d], source-major
        # Regroup source-major -> local-expert-major (stable: source order kept inside).
        local_id = torch.repeat_interleave(
            torch.arange(local, device=xr.device).repeat(ep.size),
            by_src.flatten(),
            output_size=xr.shape[0],  # known on the host: no second read of the counts
        )
        perm = torch.argsort(local_id, stable=True)
        yr = self._local_experts(xr[perm], by_src.sum(0), local_counts)
        back = torch.empty_like(yr).index_copy(0, perm, yr)  # undo the regrouping
        return all_to_all(back, recv, send, ep.group)  # rows in the sender's order again

    def _local_experts(
        self, xs: Tensor, tokens_per_expert: Tensor, host_counts: list[int]
    ) -> Tensor:
        w1, v1, w2 = self.expert_weights()
        run = local_expert_gemm(self, xs)
        return run(xs, tokens_per_expert, w1, v1, w2, host_counts)


def local_expert_gemm(layer: MoE, xs: Tensor):
    """The function that runs this rank's local experts on `xs` (grouped by local expert):
    with moe.backend=megablocks on CUDA bf16, grouped_gemm's `gmm`, the kernel megablocks'
    own grouped MLP runs; else the torch backend's (torch._grouped_mm where it applies, its
    loop otherwise). All take (xs, tokens_per_expert, w1, v1, w2, host_counts) with weight
    views [E_local, f, d] and the group sizes also as a host list (read once, see _exchange)."""
    cuda_bf16 = xs.is_cuda and compute_dtype(xs) == torch.bfloat16
    if layer._megablocks is not None and cuda_bf16 and xs.shape[0] > 0:
        return _gmm_experts
    if layer.cfg.grouped_mm:
        return _torch_experts
    return _loop_experts


def _gmm_experts(
    xs: Tensor,
    tokens_per_expert: Tensor,
    w1: Tensor,
    v1: Tensor,
    w2: Tensor,
    host_counts: list[int] | None = None,
    gmm=None,
) -> Tensor:
    """SwiGLU experts through grouped_gemm's gmm (megablocks' GroupedGLU does the same:
    x @ w1[e].T and x @ v1[e].T, then h @ w2[e]). gmm takes the group sizes on the host."""
    if gmm is None:
        from grouped_gemm.ops import gmm
    dtype = compute_dtype(xs)
    x = xs.to(dtype)
    sizes = (
        torch.tensor(host_counts, dtype=torch.int64)
        if host_counts is not None
        else tokens_per_expert.cpu()
    )
    h = F.silu(gmm(x, w1.to(dtype), sizes, trans_b=True)) * gmm(
        x, v1.to(dtype), sizes, trans_b=True
    )
    return gmm(h, w2.to(dtype), sizes)


def _torch_experts(
    xs: Tensor,
    tokens_per_expert: Tensor,
    w1: Tensor,
    v1: Tensor,
    w2: Tensor,
    host_counts: list[int] | None = None,
) -> Tensor:
    """The torch backend: torch._grouped_mm where it applies, else its loop."""
    return run_local_experts(xs, tokens_per_expert, w1, v1, w2, host_counts=host_counts)


def _loop_experts(
    xs: Tensor,
    tokens_per_expert: Tensor,
    w1: Tensor,
    v1: Tensor,
    w2: Tensor,
    host_counts: list[int] | None = None,
) -> Tensor:
    """The per-expert loop (moe.grouped_mm=false)."""
    counts = host_counts if host_counts is not None else tokens_per_expert.tolist()
    return _expert_loop(xs, counts, w1, v1, w2)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, mesh) -> nn.Module:
    """Swap every MoE layer for an `ExpertParallelMoE` holding this rank's experts of
    `mesh.ep_group`, in place; returns the model (a new layer when `model` is one MoE layer).

    Expert Parameters hold this rank's rows (same names) and are tagged `allreduce=False`,
    `group_name='ep_size_{ep}'` (DeepSpeed's MoE convention; see `is_expert_param`). Build
    any optimizer AFTER this call."""
    ep = mesh.ep
    if ep == 1:
        return model
    layers = _moe_layers(model)
    if not layers:
        raise ConfigError(f"expert_parallel={ep} but the model has no MoE layer")
    for name, layer in layers:
        if layer.num_experts % ep:
            raise ConfigError(
                f"expert_parallel={ep} must divide num_experts={layer.num_experts} ({name})"
            )
        info = EPInfo(ep, mesh.ep_rank, mesh.ep_group, layer.num_experts // ep)
        if not name:  # the model is one MoE layer (tests): its replacement is the result
            return ExpertParallelMoE(layer, info)
        replace_module(model, name, ExpertParallelMoE(layer, info))
    return model


# Checkpoint consolidation / export -------------------------------------------------------------
@torch.no_grad()
def gather_expert_weights(model: nn.Module, mesh) -> dict[str, Tensor]:
    """The model's state dict with every expert shard replaced by the full [E*f, d] tensor
    (all_gather over the ep group: collective, call on every rank). Loads into the
    single-process model (`build_model(cfg).load_state_dict(...)`)."""
    state = dict(model.state_dict())
    for name, layer in _moe_layers(model):
        if not isinstance(layer, ExpertParallelMoE):
            continue
        prefix = f"{name}." if name else ""
        for pname in EXPERT_PARAM_NAMES:
            shard = getattr(layer, pname).detach().contiguous()
            parts = [torch.empty_like(shard) for _ in range(layer.ep.size)]
            dist.all_gather(parts, shard, group=layer.ep.group)
            state[prefix + pname] = torch.cat(parts)
    return state


# DeepSpeed integration (its private internals are in pretrain.deepspeed_compat) ---------------
def prepare_expert_parallel_for_deepspeed(
    model: nn.Module, mesh, param_groups: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Make `deepspeed.initialize` treat our expert shards as MoE params; returns the optimizer
    groups to pass as `model_parameters` (each base group split into a dense group and a
    `moe=True` group reduced over `mesh.expert_dp_group`). No-op split when ep == 1."""
    if mesh.ep == 1:
        return param_groups
    from pretrain import deepspeed_compat

    name = expert_group_name(mesh.ep)
    deepspeed_compat.register_expert_groups(name, mesh.ep_group, mesh.expert_dp_group)
    if "_deepspeed_moe_marker" not in model._modules:
        num_experts = _moe_layers(model)[0][1].num_experts
        marker = deepspeed_compat.moe_marker(num_experts, mesh.ep, name)
        model.add_module("_deepspeed_moe_marker", marker)
    return deepspeed_compat.split_moe_param_groups(param_groups)


def restore_expert_weights_after_load(engine) -> None:
    """Call on every rank right after `engine.load_checkpoint(...)` (ZeRO 1/2).

    DeepSpeed writes the module weights from dp rank 0 only, so after a load every rank holds
    rank 0's expert shards in the module, while each rank's ZeRO fp32 master partition (loaded
    from its own optimizer file) is right. ZeRO would copy the masters back only at the next
    step, after a forward with the wrong experts; this does that copy now (and re-gathers the
    partitions inside each expert dp group)."""
    from pretrain import deepspeed_compat

    deepspeed_compat.restore_expert_partitions(engine)


# Expert shards on disk (saves before the layout-free format) -----------------------------------
EXPERT_SHARD_GLOB = "expert_shard_rank*.pt"


def expert_shard_files(tag_dir: str | Path, layout: dict[str, Any]) -> list[Path]:
    """The files of ONE replica of the experts, in ep-rank order: those of tp rank 0 and
    expert-data-parallel rank 0 (the other dp/ep - 1 replicas hold the same tensors). Rank r
    sits at dp_rank = r // tp, ep_rank = dp_rank % ep, expert_dp_rank = dp_rank // ep
    (pretrain/parallel/mesh.py), so replica 0's ep rank e is global rank e x tp."""
    tp, ep = int(layout.get("tp") or 1), int(layout.get("ep") or 1)
    return [Path(tag_dir) / f"expert_shard_rank{e * tp}.pt" for e in range(ep)]


def merge_expert_shards(tag_dir: str | Path, layout: dict[str, Any]) -> dict[str, Tensor]:
    """Full expert tensors of an older expert-parallel save (format 1, which wrote one expert
    file per rank of tp rank 0): one replica's shards, each read once, concatenated in
    ep-rank order (experts are contiguous row blocks of [E*f, d])."""
    files = expert_shard_files(tag_dir, layout)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{tag_dir}: expert shard files are missing ({', '.join(missing)})")
    replica = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    if [(s["ep_rank"], s["expert_dp_rank"]) for s in replica] != [
        (e, 0) for e in range(len(files))
    ]:
        raise DataError(f"{tag_dir}: expert shard files do not match its layout.json")
    names = replica[0]["tensors"].keys()
    return {n: torch.cat([s["tensors"][n] for s in replica], dim=0) for n in names}
