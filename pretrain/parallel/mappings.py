"""Collectives of tensor/sequence parallel as autograd functions (Megatron `mappings.py`).

Every tp rank runs the same graph on the same (replicated) loss; each function's backward is the
transpose of its forward, so gradients come out as the single-process gradients:

    gather_seq          fwd all-gather along the sequence      bwd reduce-scatter (sum)
    reduce_scatter_seq  fwd reduce-scatter along the sequence  bwd all-gather
    mean_over_tp        fwd all-reduce / tp                     bwd grad / tp (no comm)

The sequence is dim 1 of [B, T, ...]. gloo and NCCL both provide all_gather and
reduce_scatter_tensor (the latter on dim 0, so the sequence is moved to the front).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed reduce_scatter_tensor (deprecated there); older torch has only that name.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_seq(x: Tensor, group) -> Tensor:
    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: Tensor, group) -> Tensor:
    n = dist.get_world_size(group)
    front = x.transpose(0, 1).contiguous()  # [T, B, ...]
    out = front.new_empty((front.shape[0] // n, *front.shape[1:]))
    _REDUCE_SCATTER(out, front, group=group)
    return out.transpose(0, 1).contiguous()


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    # The mirror image of _GatherSeq: each one's backward is the other's forward.
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather_seq(grad, ctx.group), None


class _MeanOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.n = dist.get_world_size(group)
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out / ctx.n

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The replicated loss is back-propagated once per rank; rank r's own term gets 1/tp.
        return grad / ctx.n, None


def gather_seq(x: Tensor, group) -> Tensor:
    """[B, T/tp, ...] sequence slice -> [B, T, ...] full sequence."""
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: Tensor, group) -> Tensor:
    """[B, T, ...] partial sums -> [B, T/tp, ...] this rank's slice of their sum."""
    return _ReduceScatterSeq.apply(x, group)


def mean_over_tp(x: Tensor, group) -> Tensor:
    """Average a per-rank value (e.g. an aux loss of a sequence slice) over the tp group."""
    return _MeanOverTP.apply(x, group)


def all_reduce_grad_hook(group):
    """A tensor hook that sums a replicated parameter's gradient over the tp group.

    With sequence parallel each rank sees a slice of the sequence, so the gradient of a
    replicated weight (norms, MoE experts) is a partial sum; the hook runs before the gradient
    is accumulated into `.grad`, i.e. before DeepSpeed's ZeRO reduction hooks read it. The sum
    is taken in fp32 and rounded to the gradient's dtype once (as Megatron sums into fp32 main
    grads): a bf16 all-reduce would round after each of the tp - 1 additions. Cost: twice the
    bytes on the tp link for these weights (the experts of an MoE under tp are among them)."""

    def hook(grad: Tensor) -> Tensor:
        summed = grad.to(torch.float32, copy=True)  # a copy: the hook must not change `grad`
        dist.all_reduce(summed, group=group)
        return summed.to(grad.dtype)

    return hook
