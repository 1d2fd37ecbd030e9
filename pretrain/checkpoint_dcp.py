"""The layout-free save (format 2, ZeRO 1/2): the optimizer state through
torch.distributed.checkpoint, the rest in two small files (pretrain/checkpoint.py).

    step_X/dcp/.metadata, dcp/__<rank>_0.distcp   per parameter of the PLAIN model: the fp32
                                                 master and Adam's two moments, as boxes of
                                                 the plain tensor (pretrain/checkpoint_shards)
    step_X/state.pt                              rank 0: the client state, the lr schedule's
                                                 position and lr, Adam's step, DeepSpeed's
                                                 step counters
    step_X/rng_rank<r>.pt                        each rank's RNG streams

The module weights are not saved: under ZeRO 1/2 they are the fp32 masters (cast to bf16 for
a bf16 run, exactly as DeepSpeed's `update_lp_params` casts them), rebuilt on load.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.staging import AsyncStager

from mop.errors import DataError
from mop.fileio import atomic_path
from pretrain import deepspeed_compat
from pretrain.checkpoint_shards import (
    STATE_KEYS,
    Fragment,
    check_saved_shapes,
    key_of,
    sharded_state,
)

# ShardedTensor is the DCP type that holds arbitrary boxes (DTensor only holds even splits of a
# device mesh, not ZeRO's flat fragments); torch warns on each use that it is being phased
# out: once per tensor per save, which would flood the logs. DCP's note that a single process
# loads without a process group (eval) is what is meant too.
warnings.filterwarnings(
    "ignore", "Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning
)
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")

DCP_DIR = "dcp"
STATE_FILE = "state.pt"
FORMAT = 2


class AlreadyStaged(AsyncStager):
    """DCP's stager for a state whose tensors are already host copies (`stage_to_host`):
    DCP's default stager does not copy ShardedTensors, so the copy is ours and this passes
    the state through."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def stage_to_host(
    fragments: list[Fragment], reuse: list[dict[str, torch.Tensor]] | None
) -> list[dict[str, torch.Tensor]]:
    """A host copy of this rank's optimizer state (the only part of a save the training loop
    waits for). On CUDA into pinned buffers, kept for the next save (one save is in flight at
    a time, so the previous copy is free once its write completed)."""
    out = []
    for i, f in enumerate(fragments):
        bufs = {}
        for k in STATE_KEYS:
            view = f.views[k]
            old = reuse[i][k] if reuse and len(reuse) == len(fragments) else None
            if old is None or old.shape != view.shape or old.dtype != view.dtype:
                old = torch.empty(
                    view.shape, dtype=view.dtype, device="cpu", pin_memory=view.is_cuda
                )
            old.copy_(view.detach(), non_blocking=view.is_cuda)
            bufs[k] = old
        out.append(bufs)
    if any(f.views["fp32"].is_cuda for f in fragments):
        torch.cuda.synchronize()
    return out


def trainer_state(engine, client_state: dict) -> dict[str, Any]:
    """What state.pt holds: everything but the tensors (rank 0 writes it)."""
    sched = engine.lr_scheduler
    lrs = {float(g["lr"]) for g in engine.optimizer.param_groups}
    if len(lrs) != 1:
        raise RuntimeError(f"optimizer groups with different lrs {sorted(lrs)}: not resumable")
    steps = set(deepspeed_compat.zero_adam_steps(engine))
    return {
        "format": FORMAT,
        "client": client_state,
        "lr": lrs.pop(),
        "adam_step": max(steps),  # every group steps together
        "schedule": {"last_epoch": sched.last_epoch, "_step_count": sched._step_count}
        if sched is not None
        else None,
        "engine": deepspeed_compat.engine_counters(engine),
    }


def write_small_file(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def start_write(tag_dir: Path, fragments, staged, layout, rank: int, group, use_async: bool) -> Any:
    """DCP's write of the staged state: a future (async) or None once written (sync)."""
    state = sharded_state(fragments, staged, layout, rank)
    writer = FileSystemWriter(tag_dir / DCP_DIR, thread_count=1, sync_files=True)
    if use_async:
        return dcp.async_save(
            state, storage_writer=writer, process_group=group, async_stager=AlreadyStaged()
        )
    dcp.save(state, storage_writer=writer, process_group=group)
    return None


def own_files(tag_dir: Path, rank: int) -> list[str]:
    """The DCP files this rank wrote (its own view of its own files)."""
    names = [f"{DCP_DIR}/{p.name}" for p in (tag_dir / DCP_DIR).glob(f"__{rank}_*.distcp")]
    if rank == 0:
        names.append(f"{DCP_DIR}/.metadata")
    return names


def load(engine, fragments, layout, tag_dir: Path, mesh, group) -> tuple[dict, float]:
    """Fill the engine's optimizer state from a format-2 save of any layout (collective);
    (the client state, seconds spent in DCP's read)."""
    state_file = tag_dir / STATE_FILE
    saved = torch.load(state_file, map_location="cpu", weights_only=False)
    metadata = FileSystemReader(tag_dir / DCP_DIR).read_metadata()
    check_saved_shapes(metadata, fragments, tag_dir)
    zero = engine.optimizer
    steps = [saved["adam_step"]] * len(zero.optimizer.param_groups)
    deepspeed_compat.init_zero_adam_state(engine, steps, None)
    # The views changed when init_zero_adam_state linked fresh moment buffers: rebuild them.
    live = {f.name: f for f in _refresh(engine, mesh, fragments)}
    t0 = time.perf_counter()
    target = sharded_state(list(live.values()), [f.views for f in live.values()], layout, mesh.rank)
    dcp.load(target, storage_reader=FileSystemReader(tag_dir / DCP_DIR), process_group=group)
    seconds = time.perf_counter() - t0
    deepspeed_compat.copy_masters_to_model(engine)
    for g in zero.param_groups:
        g["lr"] = saved["lr"]
    sched = engine.lr_scheduler
    if sched is not None and saved["schedule"] is not None:
        sched.last_epoch = saved["schedule"]["last_epoch"]
        sched._step_count = saved["schedule"]["_step_count"]
        sched._last_lr = [saved["lr"]] * len(zero.param_groups)
    deepspeed_compat.set_engine_counters(engine, saved["engine"])
    return saved["client"], seconds


def _refresh(engine, mesh, fragments):
    from pretrain.checkpoint_shards import local_fragments

    fresh = local_fragments(engine, mesh)
    if [(f.name, f.boxes) for f in fresh] != [(f.name, f.boxes) for f in fragments]:
        raise RuntimeError("the ZeRO partitioning changed between two looks at it")
    return fresh


def read_plain_weights(
    tag_dir: Path, model: torch.nn.Module, precision: str
) -> dict[str, torch.Tensor]:
    """One process: the plain model's weights (fp32 masters) from a format-2 save of any
    layout, rounded through bf16 when the run trained in bf16 (the weights its forward used).
    Reads only the masters' bytes, each stored box once."""
    metadata = FileSystemReader(tag_dir / DCP_DIR).read_metadata()
    wanted = {}
    for name, p in model.named_parameters():
        key = key_of(name, "fp32")
        if key not in metadata.state_dict_metadata:
            raise DataError(f"checkpoint {tag_dir} has no weights for {name}")
        wanted[key] = torch.empty(p.shape, dtype=torch.float32)
    dcp.load(wanted, storage_reader=FileSystemReader(tag_dir / DCP_DIR), no_dist=True)
    out = {k[: -len("/fp32")]: v for k, v in wanted.items()}
    if precision == "bf16":
        out = {k: v.to(torch.bfloat16).float() for k, v in out.items()}
    return out
