"""Checkpoint mechanics: DeepSpeed engine state + our client state, a record, a pointer,
keep-last-k, and the check that a save is intact before anything is loaded from it.

    <dir>/step_00000100/          DeepSpeed's files (model, ZeRO optimizer partitions, lr
                                  schedule, client state) + rng_rank<r>.pt per rank,
                                  layout.json, integrity.json (pretrain/checkpoint_record.py)
    <dir>/latest_complete         tag of the newest save that every rank finished

Order of a save: every rank writes its files; barrier; every rank checksums its share of the
save's files; barrier; rank 0 merges the shares into `integrity.json`, then moves the pointer
(atomically) and prunes. A save killed at any point before the pointer moved is never pointed
at: resume takes the previous complete one. DeepSpeed's own `latest` file is not written
(save_latest=False) and not read. Policy (when to save) is the trainer's CheckpointCallback;
this module only saves, checks, loads and prunes.

Damaged saves: `load` checks the save it is about to use (every file present with its recorded
size and checksum) before loading anything. A damaged save is renamed `step_X.damaged-<n>`
(never deleted; prune does not touch it), one line on stderr says which and how, and the next
older save is tried; a pointer that holds garbage or names a missing step is moved aside the
same way (`latest_complete.damaged-<n>`) and the newest save with an intact record is used.
When nothing intact is left: DamagedStateError (exit 66, which slurm/train.sbatch does not
requeue). A save from before records existed (no integrity.json) loads as before, with a note.
Eval and export run the same check (`check_save`).

Resume on another data-parallel size (same tensor-parallel size; ZeRO 1/2): DeepSpeed refuses
to load ZeRO optimizer partitions saved with another dp ("Automatic adjustment ... not
supported"), and its universal-checkpoint route needs an offline conversion plus Megatron's
`universal_checkpoint_info`. ZeRO 1/2 partitions are plain slices of one flat buffer per
param group, and each file lists where every parameter's fragment sits (`param_slice_mappings`),
so `_load_resharded` concatenates the saved fragments per parameter (fp32 master, Adam's
exp_avg / exp_avg_sq, step) and writes them into the new partitions through DeepSpeed's
`safe_set_full_*` API, after loading the module, lr schedule and client state with
`load_optimizer_states=False`. Each rank reads every saved partition of its tp rank once, so
it holds the full fp32 optimizer state briefly (3 x fp32 model size / tp): fine for a resize
event, not for every resume. The sample order is a pure function of the consumed-sample count,
so with the same global batch the resumed run sees the same samples. Under expert parallelism
(same `ep`) the expert groups are partitioned per expert shard over its expert-data-parallel
ranks; `full_optimizer_state` regathers each shard from the files of the ranks that held it.
A change of tp or ep is refused in one line (`layout.json` records dp, tp, ep of each save).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from mop.errors import DamagedStateError, DataError
from mop.fileio import atomic_path, atomic_write_text
from pretrain import checkpoint_record, deepspeed_compat
from pretrain.checkpoint_record import RECORD, has_record

if TYPE_CHECKING:
    from pretrain.parallel import Mesh

POINTER = "latest_complete"
LAYOUT = "layout.json"  # {"dp", "tp", "ep"} of the run that wrote a save
_TAG = re.compile(r"^step_(\d+)$")  # the one parser of save names (eval uses it too)


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def is_tag(name: str) -> bool:
    return _TAG.match(name) is not None


def step_of(tag: str) -> int:
    """The step of a save's tag `step_XXXXXXXX`."""
    m = _TAG.match(tag)
    if m is None:
        raise DataError(f"checkpoint tag {tag!r} is not of the form step_XXXXXXXX")
    return int(m.group(1))


def list_tags(ckpt_dir: str | Path) -> list[str]:
    """The saves of a checkpoint directory, oldest first (not the ones moved aside)."""
    found = [p.name for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and is_tag(p.name)]
    return sorted(found, key=step_of)


@dataclass(frozen=True)
class Target:
    """What a save writes and a load fills: the DeepSpeed engine, where this process sits in
    the mesh (rank, dp / tp / ep sizes and ranks), and the checkpoint directory."""

    engine: Any
    mesh: Mesh
    ckpt_dir: Path


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
    tag = path.read_text(encoding="utf-8", errors="replace").strip()
    return tag or None


def _move_pointer(ckpt_dir: Path, tag: str) -> None:
    atomic_write_text(ckpt_dir / POINTER, tag + "\n")


def save(target: Target, step: int, client_state: dict, keep_last: int) -> str:
    """Collective: every rank must call it. Returns the tag.

    Under expert parallelism each rank of tp rank 0 also writes its expert shard (DeepSpeed's
    module file holds rank 0's experts only). `layout.json` (dp, tp, ep) lets a resume refuse
    a layout it cannot load in one line."""
    m, ckpt_dir = target.mesh, Path(target.ckpt_dir)
    tag = tag_of(step)
    tag_dir = ckpt_dir / tag
    if m.rank == 0:
        # An earlier, interrupted save of this step may have left its record: it must not
        # describe the files written now (only rank 0 ever writes it, at the end).
        (tag_dir / RECORD).unlink(missing_ok=True)
    target.engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False
    )
    if m.rank == 0:
        layout = {"dp": m.dp, "tp": m.tp, "ep": m.ep}
        atomic_write_text(tag_dir / LAYOUT, json.dumps(layout, sort_keys=True) + "\n")
    with atomic_path(tag_dir / f"rng_rank{m.rank}.pt") as tmp:
        torch.save(rng_state(), tmp)
    if m.ep > 1 and m.tp_rank == 0:  # expert weights are replicated over tp
        from pretrain.parallel.expert import save_expert_shard

        save_expert_shard(
            tag_dir / f"expert_shard_rank{m.rank}.pt",
            target.engine.module,
            m.ep_rank,
            m.expert_dp_rank,
        )
    _barrier()  # every rank's files are on disk before they are recorded
    checkpoint_record.write_part(tag_dir, m.rank, m.world_size)
    _barrier()
    if m.rank == 0:
        checkpoint_record.merge_parts(tag_dir, m.world_size)
        _move_pointer(ckpt_dir, tag)  # last: the record covers every file it points at
        prune(ckpt_dir, keep_last)
    _barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete saves; delete older ones and any half-written save
    (a tag directory not covered by the pointer, left by a kill during a save). Saves moved
    aside as damaged are not tags and are never deleted."""
    current = read_pointer(ckpt_dir)
    if current is None or not is_tag(current):
        return
    tags = list_tags(ckpt_dir)
    complete = [t for t in tags if step_of(t) <= step_of(current)]
    keep = set(complete[-keep_last:])
    for t in tags:
        if t not in keep:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


# Checking ---------------------------------------------------------------------------------


def move_aside(path: Path) -> Path:
    """Rename a damaged save (or pointer) to `<name>.damaged-<n>`, the first free n."""
    n = 1
    while (dest := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    path.rename(dest)
    return dest


def check_save(tag_dir: str | Path, checksum: Callable[[str], bool] | None = None) -> bool:
    """Raise DamagedStateError (one line: which save, how) unless the save is intact; True
    when its record was checked, False for a save from before records existed (nothing to
    check against). `checksum(name)` limits the checksummed files (all are size-checked)."""
    tag_dir = Path(tag_dir)
    if tag_dir.is_dir() and not has_record(tag_dir):
        return False
    why = checkpoint_record.problem(tag_dir, checksum=checksum)
    if why is not None:
        raise DamagedStateError(f"checkpoint {tag_dir} is damaged: {why}")
    return True


def _problem_on_any_rank(tag_dir: Path, mesh: Mesh) -> str | None:
    """Collective check: each rank checksums its share; the first problem any rank found."""
    why = checkpoint_record.problem(tag_dir, mesh.rank, mesh.world_size)
    if mesh.world_size == 1 or not dist.is_initialized():
        return why
    found: list[str | None] = [None] * mesh.world_size
    dist.all_gather_object(found, why)
    return next((w for w in found if w), None)


def _say(mesh: Mesh, line: str) -> None:
    if mesh.rank == 0:
        print(line, file=sys.stderr, flush=True)


def select(target: Target) -> str | None:
    """Collective: the tag of the newest intact complete save (None: no pointer, a fresh
    start), after moving aside every damaged save newer than it (module docstring)."""
    ckpt_dir, m = Path(target.ckpt_dir), target.mesh
    pointer = ckpt_dir / POINTER
    if not pointer.is_file():
        return None
    text = read_pointer(ckpt_dir)
    tags = list_tags(ckpt_dir)
    _barrier()  # every rank has looked before rank 0 renames anything
    if text is not None and is_tag(text) and (ckpt_dir / text).is_dir():
        pointed: str | None = text
        candidates = [t for t in reversed(tags) if step_of(t) <= step_of(text)]
    else:
        pointed = None
        if text is None:
            how = "is empty"
        elif is_tag(text):
            how = f"names {text}, which does not exist"
        else:
            how = f"holds {text[:40]!r}, not a step tag"
        if m.rank == 0:
            moved = move_aside(pointer)
            _say(m, f"warning: checkpoint pointer {pointer} {how}: moved aside to {moved.name}")
        # Without the pointer only a recorded save is known to be complete.
        candidates = [t for t in reversed(tags) if has_record(ckpt_dir / t)]
    damaged = []
    chosen = None
    for tag in candidates:
        tag_dir = ckpt_dir / tag
        if not has_record(tag_dir):
            _say(
                m,
                f"note: checkpoint {tag_dir} has no {RECORD} (saved before saves were "
                "recorded): loading it unchecked",
            )
            chosen = tag
            break
        why = _problem_on_any_rank(tag_dir, m)
        if why is None:
            chosen = tag
            break
        if m.rank == 0:
            moved = move_aside(tag_dir)
            _say(
                m,
                f"warning: checkpoint {tag_dir} is damaged ({why}): moved aside to "
                f"{moved.name}; trying the next older save",
            )
        damaged.append(f"{tag} ({why})")
        _barrier()
    if chosen is None:
        what = "; ".join(damaged) if damaged else "no save with an integrity record"
        raise DamagedStateError(
            f"no intact checkpoint in {ckpt_dir}: {what}; damaged saves were renamed "
            "*.damaged-N (not deleted): restore one from a copy, or start afresh with "
            "checkpoint.resume=never or another checkpoint.dir"
        )
    if chosen != pointed and m.rank == 0:
        _move_pointer(ckpt_dir, chosen)
    _barrier()
    return chosen


# Loading ----------------------------------------------------------------------------------


@dataclass
class Loaded:
    tag: str
    client_state: dict


# DeepSpeed names ZeRO optimizer partitions `zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt`,
# with a `bf16_` prefix when the run trained in bf16 (tests/pretrain/test_deepspeed_compat.py).
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def optim_partition_files(tag_dir: str | Path, tp_rank: int) -> list[Path]:
    """This tp rank's ZeRO partition files (fp32 or bf16 run), in data-parallel rank order."""
    found = []
    for f in Path(tag_dir).iterdir():
        m = _OPTIM_FILE.match(f.name)
        if m and int(m.group(2)) == tp_rank:
            found.append((int(m.group(1)), f))
    return [f for _, f in sorted(found)]


def saved_sizes(tag_dir: str | Path) -> tuple[int, int]:
    """(dp, tp) of the run that wrote a DeepSpeed checkpoint directory (ZeRO 1/2)."""
    tag_dir = Path(tag_dir)
    tp = len(list(tag_dir.glob("mp_rank_*_model_states.pt")))
    return len(optim_partition_files(tag_dir, 0)), tp


def full_optimizer_state(
    tag_dir: str | Path, tp_rank: int, ep_rank: int = 0, ep: int = 1
) -> tuple[dict, list, list]:
    """Per-parameter full {'fp32', 'exp_avg', 'exp_avg_sq'}, each group's Adam step and its
    hyperparameters (the lr of the step being resumed lives there), from the ZeRO 1/2
    partitions of any dp size.

    Expert groups (`moe` in the saved param group) are partitioned over the expert-data-parallel
    ranks of one expert shard, not over all dp ranks: under expert parallelism the full state
    of this rank's shard `ep_rank` is the concatenation, in dp-rank order, of the files of the
    dp ranks with dp_rank % ep == ep_rank (pretrain.parallel.mesh layout)."""
    files = optim_partition_files(Path(tag_dir), tp_rank)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: list = []
    groups: list = []
    for dp_rank, f in enumerate(files):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if int(osd["zero_stage"]) not in (1, 2):
            raise DataError(f"{f}: resharding supports ZeRO 1/2 only (stage {osd['zero_stage']})")
        state = osd["base_optimizer_state"]["state"]
        steps = [state[g]["step"] for g in sorted(state)]
        groups = osd["base_optimizer_state"]["param_groups"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            if groups[g].get("moe"):
                saved_ep = len(files) // int(osd["partition_count"][g])
                if saved_ep != ep:
                    raise DataError(
                        f"checkpoint {tag_dir} was saved with expert_parallel={saved_ep}; "
                        f"resume with the same (now {ep})"
                    )
                if dp_rank % ep != ep_rank:
                    continue  # another expert shard
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g], **state[g]}
            for name, addr in mapping.items():
                per = pieces.setdefault(name, {k: [] for k in ("fp32", "exp_avg", "exp_avg_sq")})
                for key, parts in per.items():
                    parts.append(flat[key].narrow(0, addr.start, addr.numel))
    full = {n: {k: torch.cat(v) for k, v in per.items()} for n, per in pieces.items()}
    return full, steps, groups


def _load_resharded(engine, ckpt_dir: Path, tag: str, tp_rank: int, ep_rank: int, ep: int):
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=True
    )
    full, steps, saved_groups = full_optimizer_state(ckpt_dir / tag, tp_rank, ep_rank, ep)
    deepspeed_compat.init_zero_adam_state(engine, steps, saved_groups)
    for name, p in engine.module.named_parameters():
        if name not in full:
            raise DataError(f"checkpoint {ckpt_dir / tag} has no optimizer state for {name}")
        safe_set_full_fp32_param(p, full[name]["fp32"].view_as(p))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, full[name][key].view_as(p), key)
    deepspeed_compat.copy_masters_to_model(engine)
    return client


def load(target: Target) -> Loaded | None:
    """Load the newest intact complete save into the engine (collective); None when there is
    none. The save is checked first (`select`). A save from another data-parallel size (ZeRO
    1/2, same tp and ep) is resharded (module docstring)."""
    tag = select(target)
    if tag is None:
        return None
    engine, ckpt_dir, m = target.engine, Path(target.ckpt_dir), target.mesh
    dp, tp_rank, ep, ep_rank = m.dp, m.tp_rank, m.ep, m.ep_rank
    saved_dp, saved_tp = saved_sizes(ckpt_dir / tag)
    layout_file = ckpt_dir / tag / LAYOUT
    saved_ep = json.loads(layout_file.read_text())["ep"] if layout_file.is_file() else None
    if saved_ep is not None and saved_ep != ep:
        raise DataError(
            f"checkpoint {ckpt_dir / tag} was saved with expert_parallel={saved_ep}; resume "
            f"with the same expert_parallel (now {ep})"
        )
    tp = deepspeed_compat.model_parallel_size(engine)
    if saved_tp and saved_tp != tp:
        raise DataError(
            f"checkpoint {ckpt_dir / tag} was saved with tensor_parallel={saved_tp}; resume "
            f"with the same tensor_parallel (now {tp})"
        )
    from pretrain.parallel.expert import is_expert_param

    expert_parallel = any(is_expert_param(p) for p in engine.module.parameters())
    if saved_dp and saved_dp != dp:
        if engine.zero_optimization_stage() not in (1, 2):
            raise DataError(
                f"checkpoint {ckpt_dir / tag} was saved with {saved_dp} data-parallel ranks; "
                f"resharding to {dp} works for ZeRO 1/2 only (this run: stage "
                f"{engine.zero_optimization_stage()}); resume on {saved_dp} data-parallel ranks"
            )
        if saved_dp % ep:
            raise DataError(
                f"checkpoint {ckpt_dir / tag} was saved with {saved_dp} data-parallel ranks, "
                f"which expert_parallel={ep} does not divide"
            )
        client = _load_resharded(engine, ckpt_dir, tag, tp_rank, ep_rank, ep)
    else:
        _, client = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if expert_parallel:
        from pretrain.parallel.expert import restore_expert_weights_after_load

        # DeepSpeed wrote the module weights from rank 0 only: put each rank's own experts back.
        restore_expert_weights_after_load(engine)
    rng_file = ckpt_dir / tag / f"rng_rank{m.rank}.pt"
    # A rank that did not exist in the saved run (resume on more ranks) keeps its seeded state.
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return Loaded(tag=tag, client_state=client)
