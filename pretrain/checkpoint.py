"""Checkpoints: what a save holds, in which order it becomes the resume point, how a resume in
another layout finds its state, and how a save runs beside training. The one API:

    target = Target(engine, mesh, ckpt_dir, async_save=True)   # one per run (it holds state)
    save(target, step, client_state, keep_last) -> tag   # collective; returns once the loop
                                                          # may go on (async: host copy made)
    poll(target) -> [SaveResult]                          # saves completed since (no wait)
    wait(target) -> SaveResult | None                     # block until the save in flight is
                                                          # complete (before exit, a rollback)
    select(target) -> tag | None                          # the newest intact complete save
    load(target) -> Loaded | None                         # wait, select, load it (any layout)

`load` always waits for a save in flight first, so "load the newest intact save" (a rollback
after a loss spike) sees the newest save that completed. Anything picklable in the client
state (e.g. skipped sample ranges) comes back in `Loaded.client_state`, whatever the layout.

On disk:

    <dir>/step_00000100/          one save (formats below), layout.json (format, dp, tp, ep,
                                  ZeRO stage, precision), integrity.json (checkpoint_record)
    <dir>/latest_complete         tag of the newest save that every rank finished

Format 2, layout-free (every ZeRO 1/2 save): torch.distributed.checkpoint (DCP) holds, per
parameter of the plain single-process model, the fp32 master and Adam's moments as boxes of
the plain tensor (pretrain/checkpoint_shards.py, pretrain/checkpoint_dcp.py); state.pt the
client state, the schedule and DeepSpeed's counters; rng_rank<r>.pt each rank's RNG streams.
A resume in ANY layout (data, tensor and expert parallel sizes, ZeRO 1 or 2, fp32 or bf16)
builds its engine as usual and lets DCP read, for each of its own ZeRO fragments, the
overlapping parts of the saved boxes straight into its optimizer partition; the module weights
follow from the masters. Eval and export read the masters of any layout in one process.

Why DCP, not DeepSpeed's universal checkpoint or a converter of our own: DeepSpeed's
`ds_to_universal` is an offline pass (a second full copy of the optimizer state on disk, in a
separate job) driven by Megatron-DeepSpeed's `universal_checkpoint_info` patterns, and it
merges expert state per DeepSpeed's own expert layout, not our expert-data-parallel groups;
the load side (`load_universal`) must be chosen before the engine is built. DCP reshards on
load by itself (overlap of saved and wanted boxes), reads only what each rank needs (no full
copy per rank), writes each replicated box once, and has the asynchronous save this module
uses (`async_save`). What remains ours is the description of where ZeRO's flat fragments sit
in the plain tensors, which neither library knows about our layer types.

Format 1, DeepSpeed's own files (pretrain/checkpoint_engine_format.py): written for ZeRO 0
and 3, and by every run before format 2; resumed in its own layout (the data-parallel size
may change for ZeRO 1/2), any other layout refused in one line.

Order of a save: the state is copied to host memory (the loop waits for this part alone,
`checkpoint_blocking_s`); DCP writes the files (in the background with async_save, the default
for format 2); every rank checksums the files it wrote and the entries are gathered over the
process group; rank 0 writes `integrity.json`, then moves the pointer (atomically) and prunes
(`checkpoint_total_s`). A save killed at any point before the pointer moved is never pointed
at: resume takes the previous complete one. One save is in flight at a time
(pretrain/checkpoint_async.py says what happens when the next comes first), and every
collective of a save runs on the checkpoint's own gloo group. DeepSpeed's own `latest` file is
not written (save_latest=False) and not read. Policy (when to save) is the trainer's
CheckpointCallback; this module saves, checks, loads and prunes.

Damaged saves: `load` checks the save it is about to use (every file present with its recorded
size and checksum) before loading anything. A damaged save is renamed `step_X.damaged-<n>`
(never deleted; prune does not touch it), one line on stderr says which and how, and the next
older save is tried; a pointer that holds garbage or names a missing step is moved aside the
same way (`latest_complete.damaged-<n>`) and the newest save with an intact record is used.
When nothing intact is left: DamagedStateError (exit 66, which slurm/train.sbatch does not
requeue). A save from before records existed (no integrity.json) loads as before, with a note.
A checkpoint directory that is not one shared view for all ranks is said in one line at save
time, and refused in one line at resume (never taken for damage). Eval and export run the same
check (`check_save`).

RNG: each rank saves and restores its Python, NumPy, torch CPU and current-GPU streams (only
the device it trains on: a resume may see fewer GPUs). The sample order is a pure function of
the consumed-sample count, so with the same global batch a resumed run sees the same samples.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from mop.errors import DamagedStateError, DataError
from mop.fileio import atomic_write_text
from pretrain import checkpoint_dcp, checkpoint_engine_format, checkpoint_record
from pretrain.checkpoint_async import BackgroundSave, SaveResult
from pretrain.checkpoint_engine_format import optim_partition_files, saved_sizes
from pretrain.checkpoint_record import RECORD, has_record

if TYPE_CHECKING:
    from pretrain.parallel import Mesh

__all__ = [
    "POINTER",
    "Loaded",
    "SaveResult",
    "Target",
    "check_save",
    "load",
    "optim_partition_files",
    "poll",
    "save",
    "saved_sizes",
    "select",
    "wait",
]

POINTER = "latest_complete"
LAYOUT = "layout.json"  # {"format", "dp", "tp", "ep", "zero_stage", "precision"} of a save
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


class Target:
    """What a save writes and a load fills: the DeepSpeed engine, where this process sits in
    the mesh, the checkpoint directory; and the state saves keep between calls (the
    checkpoint's gloo group, the save in flight, the host buffers of the last copy)."""

    def __init__(self, engine: Any, mesh: Mesh, ckpt_dir: str | Path, async_save: bool = True):
        self.engine, self.mesh, self.ckpt_dir = engine, mesh, Path(ckpt_dir)
        self.async_save = async_save
        self.saves = BackgroundSave()
        self._group: Any = None
        self._shards: tuple[list, dict] | None = None  # (fragments, gathered layout)
        self._staged: list | None = None
        self.said_unshared = False

    @property
    def layout_free(self) -> bool:
        """Format 2 (ZeRO 1/2); ZeRO 0/3 saves are DeepSpeed's own files."""
        return self.engine.zero_optimization_stage() in (1, 2)

    @property
    def precision(self) -> str:
        return "bf16" if self.engine.bfloat16_enabled() else "fp32"

    @property
    def group(self) -> Any:
        """The checkpoint's own gloo group (created at the first save or load: collective)."""
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def shards(self, refresh: bool = False) -> tuple[list, dict]:
        """This rank's ZeRO fragments and every rank's boxes (collective when computed)."""
        from pretrain.checkpoint_shards import gather_layout, local_fragments

        if self._shards is None or refresh:
            fragments = local_fragments(self.engine, self.mesh)
            self._shards = (fragments, gather_layout(fragments, self.group))
        return self._shards

    def layout(self) -> dict[str, Any]:
        m, stage = self.mesh, self.engine.zero_optimization_stage()
        return {
            "format": checkpoint_dcp.FORMAT if self.layout_free else 1,
            "dp": m.dp,
            "tp": m.tp,
            "ep": m.ep,
            "zero_stage": stage,
            "precision": self.precision,
        }


def rng_state() -> dict[str, Any]:
    """This process's RNG streams; on a GPU only the current device's (a resume may see
    fewer GPUs than this process did)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        # Saves before: every visible device's state; this rank trained on its current device.
        device = torch.cuda.current_device()
        cuda = cuda[device] if device < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def read_pointer(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / POINTER
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8", errors="replace").strip()
    return tag or None


def _move_pointer(ckpt_dir: Path, tag: str) -> None:
    atomic_write_text(ckpt_dir / POINTER, tag + "\n")


def saved_layout(tag_dir: Path) -> dict[str, Any]:
    """The layout a save was written in: layout.json, or for the oldest saves (none) the
    sizes DeepSpeed's file names tell."""
    f = tag_dir / LAYOUT
    layout = json.loads(f.read_text()) if f.is_file() else {}
    layout.setdefault("format", 1)
    if "dp" not in layout or "tp" not in layout:
        dp, tp = saved_sizes(tag_dir)
        layout.setdefault("dp", dp)
        layout.setdefault("tp", tp)
    return layout


def describe(layout: dict[str, Any]) -> str:
    return f"tp {layout.get('tp') or 1}, ep {layout.get('ep') or 1}, dp {layout.get('dp') or 1}"


# Saving -------------------------------------------------------------------------------------


def save(target: Target, step: int, client_state: dict, keep_last: int) -> str:
    """Collective: every rank must call it. Returns the tag once the loop may go on (after the
    host copy with async_save; after the pointer moved otherwise). Waits for the previous
    save first (one in flight)."""
    t_wait = time.perf_counter()
    wait(target)
    m, ckpt_dir = target.mesh, target.ckpt_dir
    tag = tag_of(step)
    tag_dir = ckpt_dir / tag
    t0 = time.perf_counter()
    result = SaveResult(tag=tag, step=step, path=tag_dir, waited_s=t0 - t_wait)
    group = target.group
    if m.rank == 0:
        # What an interrupted save of this step left (never the pointed-at save: saves only
        # move forward) must not mix with the files written now.
        if tag_dir.is_dir() and read_pointer(ckpt_dir) != tag:
            shutil.rmtree(tag_dir)
        (tag_dir / RECORD).unlink(missing_ok=True)
    _barrier(group)
    tag_dir.mkdir(parents=True, exist_ok=True)  # each rank: its view may be its own
    layout = target.layout()
    rng = rng_state()
    if target.layout_free:
        fragments, boxes = target.shards()
        target._staged = checkpoint_dcp.stage_to_host(fragments, target._staged)
        state = checkpoint_dcp.trainer_state(target.engine, client_state) if m.rank == 0 else None
        use_async = target.async_save
        future = checkpoint_dcp.start_write(
            tag_dir, fragments, target._staged, boxes, m.rank, group, use_async
        )

        def finish() -> None:
            if future is not None:
                future.result()
            mine = _write_small_files(tag_dir, m.rank, layout, rng, state)
            _commit(target, tag_dir, mine + checkpoint_dcp.own_files(tag_dir, m.rank), keep_last)

        if use_async:
            result.blocking_s = time.perf_counter() - t0 + result.waited_s
            target.saves.start(result, finish, t0)
        else:
            target.saves.run_inline(result, finish, t0)
        return tag

    # DeepSpeed's own files (ZeRO 0/3): synchronous.
    def finish_engine_format() -> None:
        written = checkpoint_engine_format.save(target.engine, ckpt_dir, tag, client_state)
        mine = _write_small_files(tag_dir, m.rank, layout, rng, None)
        _commit(target, tag_dir, mine + written, keep_last)

    target.saves.run_inline(result, finish_engine_format, t0)
    return tag


def _write_small_files(tag_dir: Path, rank: int, layout: dict, rng: dict, state) -> list[str]:
    names = [f"rng_rank{rank}.pt"]
    checkpoint_dcp.write_small_file(tag_dir / names[0], rng)
    if rank == 0:
        atomic_write_text(tag_dir / LAYOUT, json.dumps(layout, sort_keys=True) + "\n")
        names.append(LAYOUT)
        if state is not None:
            checkpoint_dcp.write_small_file(tag_dir / checkpoint_dcp.STATE_FILE, state)
            names.append(checkpoint_dcp.STATE_FILE)
    return names


def _commit(target: Target, tag_dir: Path, mine: list[str], keep_last: int) -> None:
    """Every rank's record entries, gathered over the group; rank 0 writes the record, moves
    the pointer, prunes. Runs once every rank's files are written (its own: each rank calls
    this after its writes returned)."""
    m, group = target.mesh, target.group
    try:
        part: Any = checkpoint_record.entries(tag_dir, mine)
    except OSError as exc:  # reported to every rank: nobody waits on a rank that gave up
        part = f"rank {m.rank}: {exc}"
    parts = _gather(part, group, m.world_size)
    failed = [p for p in parts if isinstance(p, str)]
    if failed:
        raise RuntimeError(f"checkpoint {tag_dir} was not completed: {failed[0]}")
    if m.rank == 0:
        files: dict[str, dict] = {}
        for p in parts:
            files.update(p)
        # Files no rank claimed, in rank 0's view (DeepSpeed's recovery script, for one).
        others = [n for n in checkpoint_record.saved_files(tag_dir) if n not in files]
        files.update(checkpoint_record.entries(tag_dir, others))
        unseen = checkpoint_record.unseen(tag_dir, files)
        if unseen and not target.said_unshared:
            target.said_unshared = True
            _say(
                m,
                f"warning: checkpoint.dir {target.ckpt_dir} is not shared by all ranks (rank 0 "
                f"does not see {unseen[0]}, {len(unseen)} files in all): a resume in another "
                "layout, eval and export need one directory every rank sees",
            )
        checkpoint_record.write_record(tag_dir, files, shared=not unseen)
        _move_pointer(target.ckpt_dir, tag_dir.name)  # last: the record covers what it names
        prune(target.ckpt_dir, keep_last)
    _barrier(group)


def _gather(obj: Any, group: Any, world: int) -> list[Any]:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def poll(target: Target) -> list[SaveResult]:
    """Saves completed since the last call (no wait); raises a background save's error."""
    return target.saves.poll()


def wait(target: Target) -> SaveResult | None:
    """Block until the save in flight (if any) is complete; raises its error."""
    done = target.saves.wait()
    if done is not None and done.error is not None:
        target.saves.poll()  # raises it (once)
    return done


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


def move_aside(path: Path, label: str = "damaged") -> Path:
    """Rename a damaged save (or pointer) to `<name>.<label>-<n>`, the first free n."""
    n = 1
    while (dest := path.with_name(f"{path.name}.{label}-{n}")).exists():
        n += 1
    path.rename(dest)
    return dest


def set_aside_after(target: Target, step: int, label: str) -> str | None:
    """Collective: rename every save newer than `step` to `<tag>.<label>-<n>` (never deleted)
    and point `latest_complete` at the newest complete save left, whose tag is returned; a load
    then checks and uses it. With no complete save of `step` or older nothing is moved and the
    pointer's tag is returned (None: no save). The spike rollback's way back (pretrain/spike.py)."""
    ckpt_dir, m = Path(target.ckpt_dir), target.mesh
    wait(target)  # a save in flight would move the pointer after this
    current = read_pointer(ckpt_dir)
    newest = step_of(current) if current is not None and is_tag(current) else None
    tags = list_tags(ckpt_dir)
    _barrier()  # every rank has looked before rank 0 renames anything
    keep = [t for t in tags if step_of(t) <= step and (newest is None or step_of(t) <= newest)]
    if not keep:
        return current if newest is not None else None
    if m.rank == 0:
        for t in tags:
            if step_of(t) > step:
                move_aside(ckpt_dir / t, label)
        _move_pointer(ckpt_dir, keep[-1])
    _barrier()
    return keep[-1]


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


def _problem_on_any_rank(tag_dir: Path, mesh: Mesh, group: Any = None) -> str | None:
    """Collective check: each rank checksums its share; the first problem any rank found.
    A file that rank 0 sees and another rank does not is no damage: the directory is not
    shared (refused in one line)."""
    why = checkpoint_record.problem(tag_dir, mesh.rank, mesh.world_size)
    views = _gather((why, checkpoint_record.saved_unshared(tag_dir)), group, mesh.world_size)
    found = [w for w, _ in views]
    missing = [(r, w) for r, w in enumerate(found) if w and w.startswith("missing file")]
    if missing and (found[0] is None or any(unshared for _, unshared in views)):
        rank, w = missing[0]
        raise DataError(
            f"checkpoint {tag_dir}: rank {rank} does not see all of its files ({w}): it was "
            "written into a directory not shared by all ranks; checkpoint.dir must be one "
            "directory every rank sees (a shared file system), not a node-local path"
        )
    return next((w for w in found if w), None)


def _view(view: tuple) -> str:
    has_pointer, text, tags = view
    pointer = f"pointer {text!r}" if has_pointer else "no pointer"
    return f"{pointer} and {len(tags)} saves" + (f" (newest {tags[-1]})" if tags else "")


def _say(mesh: Mesh, line: str) -> None:
    if mesh.rank == 0:
        print(line, file=sys.stderr, flush=True)


def select(target: Target) -> str | None:
    """Collective: the tag of the newest intact complete save (None: no pointer, a fresh
    start), after moving aside every damaged save newer than it (module docstring)."""
    ckpt_dir, m = Path(target.ckpt_dir), target.mesh
    wait(target)  # a save in flight may be about to move the pointer
    pointer = ckpt_dir / POINTER
    text = read_pointer(ckpt_dir)
    tags = list_tags(ckpt_dir)
    # Every rank decides from the same view, or none goes on (a node-local directory).
    views = _gather((pointer.is_file(), text, tags), target.group, m.world_size)
    if other := next((r for r, v in enumerate(views) if v != views[0]), None):
        raise DataError(
            f"checkpoint.dir {ckpt_dir} is not one directory for all ranks: rank 0 sees "
            f"{_view(views[0])}, rank {other} sees {_view(views[other])}; point "
            "checkpoint.dir at a file system every rank shares"
        )
    if not pointer.is_file():
        return None
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
        why = _problem_on_any_rank(tag_dir, m, target.group)
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
    saved: dict[str, Any] = field(default_factory=dict)  # layout.json of the save
    now: dict[str, Any] = field(default_factory=dict)  # this run's layout
    seconds: float = 0.0  # reading and placing the state

    @property
    def layout_changed(self) -> bool:
        return describe(self.saved) != describe(self.now)


def load(target: Target) -> Loaded | None:
    """Wait for a save in flight, then load the newest intact complete save into the engine
    (collective); None when there is none. The save is checked first (`select`). Format 2
    loads into any layout; format 1 in its own (module docstring)."""
    tag = select(target)
    if tag is None:
        return None
    engine, ckpt_dir, m = target.engine, target.ckpt_dir, target.mesh
    tag_dir = ckpt_dir / tag
    saved = saved_layout(tag_dir)
    t0 = time.perf_counter()
    if saved["format"] == checkpoint_dcp.FORMAT:
        if not target.layout_free:
            raise DataError(
                f"checkpoint {tag_dir} was saved with ZeRO {saved.get('zero_stage')} "
                f"(layout-free format); this run uses ZeRO {engine.zero_optimization_stage()}: "
                "resume it with zero_stage 1 or 2"
            )
        fragments, boxes = target.shards(refresh=True)
        client, _ = checkpoint_dcp.load(engine, fragments, boxes, tag_dir, m, target.group)
        target._shards = None  # the moment buffers were rebuilt: look again at the next save
    else:
        client = checkpoint_engine_format.load(engine, ckpt_dir, tag, m, saved)
    rng_file = tag_dir / f"rng_rank{m.rank}.pt"
    # A rank that did not exist in the saved run (resume on more ranks) keeps its seeded state.
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    _barrier(target.group)
    now = target.layout()
    return Loaded(tag, client, saved, now, time.perf_counter() - t0)
