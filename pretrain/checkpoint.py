"""Checkpoint mechanics: DeepSpeed engine state + our client state, a pointer, keep-last-k.

    <dir>/step_00000100/          DeepSpeed's files (model, ZeRO optimizer partitions, lr
                                  schedule, client state) + rng_rank<r>.pt per rank
    <dir>/latest_complete         tag of the newest save that every rank finished

The pointer is written (atomically) by rank 0 only after a barrier that every rank reaches once
its own files are on disk, so a save killed midway is never pointed at: resume takes the previous
complete one. DeepSpeed's own `latest` file is not written (save_latest=False) and not read.
Policy (when to save) is the trainer's; this module only saves, loads and prunes.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mop.fileio import atomic_path, atomic_write_text

POINTER = "latest_complete"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def read_pointer(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / POINTER
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag or None


def save(
    engine, ckpt_dir: str | Path, step: int, client_state: dict, rank: int, keep_last: int
) -> str:
    """Collective: every rank must call it. Returns the tag."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    with atomic_path(ckpt_dir / tag / f"rng_rank{rank}.pt") as tmp:
        torch.save(rng_state(), tmp)
    _barrier()  # every rank's files are on disk before the pointer moves
    if rank == 0:
        atomic_write_text(ckpt_dir / POINTER, tag + "\n")
        prune(ckpt_dir, keep_last)
    _barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete saves; delete older ones and any half-written save
    (a tag directory not covered by the pointer, left by a kill during a save)."""
    current = read_pointer(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
    if current is None:
        return
    complete = [t for t in tags if t <= current]
    keep = set(complete[-keep_last:])
    for t in tags:
        if t not in keep:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


@dataclass
class Loaded:
    tag: str
    client_state: dict


def load(engine, ckpt_dir: str | Path, rank: int) -> Loaded | None:
    """Load the newest complete save into `engine` (collective); None when there is none."""
    tag = read_pointer(ckpt_dir)
    if tag is None:
        return None
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    # A rank that did not exist in the saved run (resume on more ranks) keeps its seeded state.
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return Loaded(tag=tag, client_state=client)
