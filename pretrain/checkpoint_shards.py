"""Where this rank's ZeRO 1/2 optimizer state sits in the plain model's tensors, as the
ShardedTensors torch.distributed.checkpoint (DCP) saves and loads (pretrain/checkpoint.py).

Each parameter of the parallel model is one block of the plain (single-process) parameter of
the same name: a tensor-parallel layer holds the chunk tp_rank of `partition_dim`, an
expert-parallel layer the rows of experts ep_rank x E/ep.., every other parameter all of it
(pretrain/parallel/). ZeRO 1/2 then gives each data-parallel rank one contiguous range of the
flattened local parameter: DeepSpeed's hp fragment, whose fp32 master and Adam moments are
views into the rank's flat partition (deepspeed_compat.zero_fragments). A contiguous range of
a row-major tensor is a few boxes (a partial row, whole rows, a partial row, recursively: at
most 2 x ndim - 1), so this rank's share of each plain tensor is a list of boxes in the plain
tensor's coordinates, and DCP does the rest:

- save: each box is written once, by one of the ranks that hold it (DCP deduplicates the
  replicas of tensor-parallel-replicated parameters);
- load, in any layout: DCP reads for each box of the new layout the overlapping parts of the
  boxes that were saved, straight into the new optimizer's partition (no full copy);
- a single process (eval, export) asks for the whole plain tensor and gets it the same way.

The boxes of every rank are needed to describe one ShardedTensor (its metadata must cover the
whole tensor): one `all_gather_object` of the box lists per layout, cached by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.api import ShardedTensorBase
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

from mop.errors import DataError
from pretrain import deepspeed_compat

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # per parameter; fp32 is the master weight


def key_of(name: str, state: str) -> str:
    """The DCP key of one parameter's state (`embed.weight/fp32`)."""
    return f"{name}/{state}"


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def flat_range_boxes(shape: tuple[int, ...], start: int, numel: int) -> list[tuple[Box, int]]:
    """The boxes of a row-major tensor of `shape` covering flat elements [start, start+numel),
    in order, each with the flat index of its first element relative to `start`."""
    out: list[tuple[Box, int]] = []

    def split(dims: tuple[int, ...], prefix: tuple[int, ...], lo: int, n: int, at: int) -> None:
        if n == 0:
            return
        ones = (1,) * len(prefix)
        if len(dims) == 1:
            out.append(((prefix + (lo,), ones + (n,)), at))
            return
        inner = prod(dims[1:])
        row, rest = divmod(lo, inner)
        if rest:  # a partial first row
            k = min(n, inner - rest)
            split(dims[1:], prefix + (row,), rest, k, at)
            lo, n, at, row = lo + k, n - k, at + k, row + 1
        if whole := n // inner:  # whole rows
            zeros = (0,) * (len(dims) - 1)
            out.append(((prefix + (row,) + zeros, ones + (whole,) + dims[1:]), at))
            lo, n, at, row = lo + whole * inner, n - whole * inner, at + whole * inner, row + whole
        if n:  # a partial last row
            split(dims[1:], prefix + (row,), 0, n, at)

    if shape == ():
        return [(((), ()), 0)] if numel else []
    split(tuple(shape), (), start, numel, 0)
    return out


def plain_placement(p: torch.Tensor, tp_rank: int, tp: int, ep_rank: int, ep: int):
    """(shape of the plain parameter, offset of this rank's local block in it)."""
    shape, offset = list(p.shape), [0] * p.dim()
    if getattr(p, "tensor_model_parallel", False) and tp > 1:
        dim = int(p.partition_dim)
        offset[dim] = tp_rank * shape[dim]
        shape[dim] *= tp
    if getattr(p, "allreduce", True) is False and ep > 1:  # an expert shard (rows of experts)
        offset[0] = ep_rank * shape[0]
        shape[0] *= ep
    return tuple(shape), tuple(offset)


@dataclass
class Fragment:
    """This rank's share of one parameter: its boxes in the plain tensor and, for each state
    key, the 1-D view of the optimizer's elements (box i starts at views[k][starts[i]])."""

    name: str
    shape: tuple[int, ...]  # the plain parameter's
    boxes: list[Box]
    starts: list[int]
    views: dict[str, torch.Tensor] = field(repr=False)

    @property
    def numel(self) -> int:
        return sum(prod(s) for _, s in self.boxes)


def local_fragments(engine, mesh) -> list[Fragment]:
    """This rank's fragments of every trainable parameter of a ZeRO 1/2 engine."""
    out = []
    for name, p, start, numel, views in deepspeed_compat.zero_fragments(engine):
        shape, offset = plain_placement(p, mesh.tp_rank, mesh.tp, mesh.ep_rank, mesh.ep)
        boxes, starts = [], []
        for (off, size), at in flat_range_boxes(tuple(p.shape), start, numel):
            boxes.append((tuple(o + b for o, b in zip(off, offset)), size))
            starts.append(at)
        out.append(Fragment(name, shape, boxes, starts, views))
    return out


Layout = dict[str, tuple[tuple[int, ...], list[tuple[Box, int]]]]  # name -> (shape, boxes+rank)


def gather_layout(fragments: list[Fragment], group=None) -> Layout:
    """Every rank's boxes of every parameter (collective over `group`), each box once (the
    lowest rank holding it). Raises when the boxes do not cover a parameter exactly."""
    mine = [(f.name, f.shape, f.boxes) for f in fragments]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
    else:
        every = [mine]
    layout: Layout = {}
    for rank, entries in enumerate(every):
        for name, shape, boxes in entries:
            shape0, known = layout.setdefault(name, (tuple(shape), []))
            if tuple(shape) != shape0:
                raise RuntimeError(f"ranks disagree on the shape of {name}: {shape0} vs {shape}")
            seen = {b for b, _ in known}
            known.extend(
                (tuple(map(tuple, b)), rank) for b in boxes if tuple(map(tuple, b)) not in seen
            )
    for name, (shape, boxes) in layout.items():
        covered = sum(prod(s) for (_, s), _ in boxes)
        if covered != prod(shape):
            raise RuntimeError(
                f"the ranks' ZeRO fragments of {name} cover {covered} of {prod(shape)}"
            )
    return layout


def sharded(fragment: Fragment, state: str, source: torch.Tensor, layout: Layout, rank: int):
    """The ShardedTensor of one parameter's `state` whose local shards are views of `source`
    (this rank's 1-D elements of that state, e.g. the live view or a host copy of it)."""
    shape, boxes = layout[fragment.name]
    meta = ShardedTensorMetadata(
        shards_metadata=[
            ShardMetadata(list(off), list(size), placement=f"rank:{r}/cpu")
            for (off, size), r in boxes
        ],
        size=torch.Size(shape),
        tensor_properties=TensorProperties(dtype=source.dtype),
    )
    local = [
        Shard(
            source.narrow(0, at, prod(size)).view(size),
            ShardMetadata(list(off), list(size), placement=f"rank:{rank}/cpu"),
        )
        for (off, size), at in zip(fragment.boxes, fragment.starts)
    ]
    # No collective and no cross-rank check: the metadata is the gathered layout. The base
    # class's constructor sets no process group, which ShardedTensor's ops (size(), asked by
    # DCP's load planner) pass along unused.
    st = ShardedTensorBase._init_from_local_shards_and_global_metadata(local, meta)
    st._process_group = None
    return st


def sharded_state(
    fragments: list[Fragment], sources: list[dict[str, torch.Tensor]], layout: Layout, rank: int
) -> dict[str, ShardedTensor]:
    """The DCP state of this rank: one ShardedTensor per (parameter, state key)."""
    return {
        key_of(f.name, k): sharded(f, k, src[k], layout, rank)
        for f, src in zip(fragments, sources)
        for k in STATE_KEYS
    }


def check_saved_shapes(metadata, fragments: list[Fragment], where) -> None:
    """One line when the save lacks a parameter or holds it with another shape (another model)."""
    saved = metadata.state_dict_metadata
    for f in fragments:
        key = key_of(f.name, "fp32")
        if key not in saved:
            raise DataError(f"checkpoint {where} has no state for parameter {f.name}")
        if tuple(saved[key].size) != tuple(f.shape):
            raise DataError(
                f"checkpoint {where} holds {f.name} with shape {tuple(saved[key].size)}, this "
                f"model has {tuple(f.shape)} (another model config?)"
            )
