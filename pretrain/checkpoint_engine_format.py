"""DeepSpeed's own checkpoint files (format 1): written for ZeRO 0 and 3, read for those and for
every save made before the layout-free format (pretrain/checkpoint.py).

    step_X/mp_rank_<tp>_model_states.pt             module weights (dp rank 0 of each tp rank)
    step_X/[bf16_]zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt   ZeRO partitions
    step_X/expert_shard_rank<r>.pt                   older expert-parallel saves: the experts
                                                     of rank r (DeepSpeed's module file holds
                                                     rank 0's only)

Such a save resumes in the layout it was written in. Only the data-parallel size may change,
and only for ZeRO 1/2: DeepSpeed refuses ZeRO partitions saved with another dp ("Automatic
adjustment ... not supported"), so `load_resharded_dp` concatenates the saved fragments per
parameter (`param_slice_mappings` in each file) and writes them into the new partitions
through DeepSpeed's `safe_set_full_*` API. Each rank then holds its tp rank's full fp32 state
briefly (3 x fp32 model / tp): fine for a rare event. A change of tp or ep is refused in one
line: those saves hold no record of how the weights were split beyond the file names.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mop.errors import DataError
from pretrain import deepspeed_compat

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


def save(engine, ckpt_dir: Path, tag: str, client_state: dict) -> list[str]:
    """DeepSpeed's save_checkpoint (collective); the names (relative to the save directory)
    of the files this rank wrote."""
    written = deepspeed_compat.record_engine_writes(engine)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    finally:
        deepspeed_compat.stop_recording_engine_writes(engine)
    tag_dir = (ckpt_dir / tag).resolve()
    return [Path(p).resolve().relative_to(tag_dir).as_posix() for p in written]


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


def load_resharded_dp(engine, ckpt_dir: Path, tag: str, tp_rank: int, ep_rank: int, ep: int):
    """A ZeRO 1/2 save of another data-parallel size (same tp and ep): the client state."""
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


def load(engine, ckpt_dir: Path, tag: str, mesh, saved: dict) -> dict:
    """Load a format-1 save into the engine (collective); its client state. `saved` is the
    save's layout (layout.json, or the sizes read from the file names for older saves)."""
    where = ckpt_dir / tag
    tp = deepspeed_compat.model_parallel_size(engine)
    saved_tp, saved_ep, saved_dp = saved.get("tp"), saved.get("ep"), saved.get("dp")
    if (saved_tp and saved_tp != tp) or (saved_ep is not None and saved_ep != mesh.ep):
        raise DataError(
            f"checkpoint {where} is in DeepSpeed's own format (saved before layout-free "
            f"checkpoints, or with ZeRO 0/3) with tensor_parallel={saved_tp or tp}, "
            f"expert_parallel={saved_ep or 1}; resume it with the same parallel.tensor_parallel "
            f"and parallel.expert_parallel (now {tp} and {mesh.ep}); only the data-parallel "
            "size may change for such a save"
        )
    stage = engine.zero_optimization_stage()
    if saved_dp and saved_dp != mesh.dp:
        if stage not in (1, 2):
            raise DataError(
                f"checkpoint {where} was saved with {saved_dp} data-parallel ranks; "
                f"resharding to {mesh.dp} works for ZeRO 1/2 only (this run: stage "
                f"{stage}); resume on {saved_dp} data-parallel ranks"
            )
        if saved_dp % mesh.ep:
            raise DataError(
                f"checkpoint {where} was saved with {saved_dp} data-parallel ranks, "
                f"which expert_parallel={mesh.ep} does not divide"
            )
        client = load_resharded_dp(engine, ckpt_dir, tag, mesh.tp_rank, mesh.ep_rank, mesh.ep)
    else:
        _, client = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {where}")
    if mesh.ep > 1:
        from pretrain.parallel.expert import restore_expert_weights_after_load

        # DeepSpeed wrote the module weights from rank 0 only: put each rank's own experts back.
        restore_expert_weights_after_load(engine)
    return client
