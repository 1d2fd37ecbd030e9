"""Checkpoint mechanics: DeepSpeed engine state + our client state, a pointer, keep-last-k.

    <dir>/step_00000100/          DeepSpeed's files (model, ZeRO optimizer partitions, lr
                                  schedule, client state) + rng_rank<r>.pt per rank
    <dir>/latest_complete         tag of the newest save that every rank finished

The pointer is written (atomically) by rank 0 only after a barrier that every rank reaches once
its own files are on disk, so a save killed midway is never pointed at: resume takes the previous
complete one. DeepSpeed's own `latest` file is not written (save_latest=False) and not read.
Policy (when to save) is the trainer's; this module only saves, loads and prunes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mop.errors import DataError
from mop.fileio import atomic_path, atomic_write_text

POINTER = "latest_complete"
LAYOUT = "layout.json"  # {"dp", "tp", "ep"} of the run that wrote a save


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
    engine,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict,
    rank: int,
    keep_last: int,
    expert_ranks: tuple[int, int] | None = None,
    layout: dict[str, int] | None = None,
) -> str:
    """Collective: every rank must call it. Returns the tag.

    `expert_ranks` = (ep_rank, expert_dp_rank) under expert parallelism: each rank also writes
    its expert shard (DeepSpeed's module file holds rank 0's experts only). `layout` (dp, tp,
    ep) goes to `layout.json`, so a resume can refuse a layout it cannot load in one line."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if layout is not None and rank == 0:
        atomic_write_text(ckpt_dir / tag / LAYOUT, json.dumps(layout, sort_keys=True) + "\n")
    with atomic_path(ckpt_dir / tag / f"rng_rank{rank}.pt") as tmp:
        torch.save(rng_state(), tmp)
    if expert_ranks is not None:
        from pretrain.parallel.expert import save_expert_shard

        save_expert_shard(
            ckpt_dir / tag / f"expert_shard_rank{rank}.pt", engine.module, *expert_ranks
        )
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


# DeepSpeed names ZeRO optimizer partitions `zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt`,
# with a `bf16_` prefix when the run trained in bf16 (engine._get_zero_ckpt_prefix).
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
    zero = engine.optimizer
    opt = zero.optimizer  # the torch AdamW over this rank's flat fp32 partitions
    for group, step, saved in zip(opt.param_groups, steps, saved_groups):
        # lr (set by the schedule after each step), betas, weight decay as saved.
        group.update({k: v for k, v in saved.items() if k != "params"})
        for flat in group["params"]:
            # Adam's state is created lazily by its first step: create it now, then let ZeRO
            # link each parameter's fragment of it (as its own first step would).
            st = opt.state[flat]
            st["step"] = step.clone() if torch.is_tensor(step) else step
            st.setdefault("exp_avg", torch.zeros_like(flat))
            st.setdefault("exp_avg_sq", torch.zeros_like(flat))
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        if name not in full:
            raise DataError(f"checkpoint {ckpt_dir / tag} has no optimizer state for {name}")
        safe_set_full_fp32_param(p, full[name]["fp32"].view_as(p))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, full[name][key].view_as(p), key)
    zero.update_lp_params()  # model weights from the restored fp32 masters
    return client


def load(
    engine,
    ckpt_dir: str | Path,
    rank: int,
    dp: int = 1,
    tp_rank: int = 0,
    ep: int = 1,
    ep_rank: int = 0,
) -> Loaded | None:
    """Load the newest complete save into `engine` (collective); None when there is none.
    A save from another data-parallel size (ZeRO 1/2, same tp and ep) is resharded (module
    docstring)."""
    tag = read_pointer(ckpt_dir)
    if tag is None:
        return None
    ckpt_dir = Path(ckpt_dir)
    saved_dp, saved_tp = saved_sizes(ckpt_dir / tag)
    layout_file = ckpt_dir / tag / LAYOUT
    saved_ep = json.loads(layout_file.read_text())["ep"] if layout_file.is_file() else None
    if saved_ep is not None and saved_ep != ep:
        raise DataError(
            f"checkpoint {ckpt_dir / tag} was saved with expert_parallel={saved_ep}; resume "
            f"with the same expert_parallel (now {ep})"
        )
    tp = engine.mp_world_size if hasattr(engine, "mp_world_size") else 1
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
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    if expert_parallel:
        from pretrain.parallel.expert import restore_expert_weights_after_load

        # DeepSpeed wrote the module weights from rank 0 only: put each rank's own experts back.
        restore_expert_weights_after_load(engine)
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    # A rank that did not exist in the saved run (resume on more ranks) keeps its seeded state.
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return Loaded(tag=tag, client_state=client)
