"""The doctor's checks of one train config on this machine: the process layout against the
visible GPUs, the GPU this process takes, free disk for the checkpoints, the data directory and
tokenizer, writable run and checkpoint directories, the save a restart would resume from, the
wandb mode. Each returns `Check` rows for `python -m pretrain.doctor` (pretrain/doctor.py).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mop.errors import UserError
from mop.progress import fmt_bytes
from pretrain.doctor_env import Check

SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


@dataclass(frozen=True)
class Layout:
    world: int
    per_node: int
    gpus_needed: int  # per node; 0 = a CPU run


def _slurm_tasks_per_node(value: str) -> int:
    """SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE look like '8', '8(x2)' or '8(x2),4'."""
    return int(value.split(",")[0].split("(")[0])


def slurm_gpus(env: dict[str, str]) -> int:
    """GPUs SLURM allocated on this node: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE hold a
    count ('8', 'h100:8'; '0' under --gpus-per-node=0), SLURM_JOB_GPUS / SLURM_STEP_GPUS
    a list of indices ('0,1')."""
    found = 0
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        count = env.get(key, "").split(",")[0].split(":")[-1].split("(")[0]
        if count.isdigit():
            found = max(found, int(count))
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if env.get(key):
            found = max(found, len(env[key].split(",")))
    return found


def layout_from(
    args: argparse.Namespace, env: dict[str, str], needs_gpu: bool, cuda: bool
) -> Layout:
    per_node = args.nproc_per_node
    if per_node is None:
        for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            if env.get(key):
                per_node = _slurm_tasks_per_node(env[key])
                break
    world = args.world_size
    if world is None:
        world = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or per_node or 1)
    per_node = min(per_node or world, world)
    gpu = args.device == "cuda" or (
        args.device == "auto" and (needs_gpu or cuda or slurm_gpus(env) > 0)
    )
    return Layout(world, per_node, per_node if gpu else 0)


def check_layout(cfg, layout: Layout, visible_gpus: int, node_gpus: int = 0) -> list[Check]:
    """`node_gpus`: GPUs SLURM allocated on this node (`slurm_gpus`); a process that sees
    fewer of them than that is one task of a step with per-task binding, which is fine."""
    from mop.errors import ConfigError
    from pretrain.config import derived_sizes
    from pretrain.parallel import build_mesh

    out = []
    try:
        sizes = derived_sizes(cfg, layout.world)
        mesh = build_mesh(cfg, layout.world, 0)
        out.append(
            Check(
                "layout",
                "ok",
                f"world {layout.world} (dp {mesh.dp}, tp {mesh.tp}, ep {mesh.ep}), "
                f"{layout.per_node} per node, global batch {sizes.global_batch}",
            )
        )
    except ConfigError as exc:
        out.append(
            Check(
                "layout",
                "fail",
                f"world {layout.world}: {exc}",
                "change the process count or parallel.*",
            )
        )
    if layout.gpus_needed == 0:
        out.append(Check("gpus", "ok", f"CPU run ({visible_gpus} GPU(s) visible)"))
    elif 0 < visible_gpus < node_gpus and node_gpus >= layout.gpus_needed:
        out.append(
            Check(
                "gpus",
                "ok",
                f"this task sees {visible_gpus} of the node's {node_gpus} GPUs (per-task "
                f"binding), {layout.gpus_needed} needed per node",
            )
        )
    elif visible_gpus < layout.gpus_needed:
        out.append(
            Check(
                "gpus",
                "fail",
                f"{visible_gpus} GPU(s) visible, the layout needs {layout.gpus_needed} on this "
                "node (one per process)",
                f"request --gpus-per-node={layout.gpus_needed} with "
                f"--ntasks-per-node={layout.gpus_needed}, or check nvidia-smi / "
                "CUDA_VISIBLE_DEVICES",
            )
        )
    else:
        out.append(
            Check("gpus", "ok", f"{visible_gpus} visible, {layout.gpus_needed} needed per node")
        )
    return out


def check_gpu_binding(layout: Layout, env: dict[str, str], visible: int) -> Check | None:
    """The GPU this process would train on (pretrain.launch.cuda_device_index), seen from the
    environment the doctor runs in. Run inside the job step (`srun python -m pretrain.doctor`)
    it checks each task's own view: under per-task binding (`--gpus-per-task=1`) a task sees
    one GPU, device 0, whatever its local rank. None for a CPU run or with no GPU visible (the
    `gpus` row reports that)."""
    if layout.gpus_needed == 0 or visible == 0:
        return None
    from pretrain.launch import cuda_device_index, dist_env

    local = dist_env(env).local_rank
    device = cuda_device_index(local, visible)
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    seen = f"{visible} visible" + (f", CUDA_VISIBLE_DEVICES={cvd}" if cvd else "")
    if visible >= layout.per_node:
        return Check("gpu binding", "ok", f"local rank {local} -> cuda:{device} ({seen})")
    if visible == 1:
        return Check(
            "gpu binding", "ok", f"local rank {local} -> cuda:0, its own GPU ({seen}: per task)"
        )
    if 0 < visible < slurm_gpus(env):  # this task's share of the node: several GPUs each
        return Check(
            "gpu binding",
            "warn",
            f"local rank {local} -> cuda:{device} of its {visible} GPUs ({seen}): "
            f"{visible - 1} of them stay idle",
            "bind one GPU per task (--gpus-per-task=1), or one task per GPU",
        )
    return Check(
        "gpu binding",
        "fail",
        f"{layout.per_node} processes on this node share {visible} GPUs ({seen}): local "
        f"ranks r and r + {visible} would take the same GPU (NCCL refuses that)",
        f"run at most {visible} tasks per node, or bind one GPU per task (--gpus-per-task=1)",
    )


def checkpoint_bytes(cfg, precision: str) -> int:
    """One checkpoint of this model, all ranks together. ZeRO 1/2 (the layout-free format,
    pretrain/checkpoint.py): fp32 master weights plus Adam's two fp32 moments, no module
    weights (they follow from the masters): 12 B/param. ZeRO 0/3 (DeepSpeed's own files):
    module weights (bf16 or fp32) too, and fp32 masters unless a plain fp32 optimizer steps
    the module weights themselves. Measured on the tiny CPU model (48K parameters, fp32
    ZeRO-1): 13.9 B/param with DCP's framing and the RNG file, within the 10% margin plus
    64 KB below."""
    from pretrain.model.accounting import model_size

    params = model_size(cfg.model, seq_len=cfg.data.seq_len).total_params
    if cfg.zero_stage in (1, 2):
        per_param = 12
    else:
        weights = 2 if precision == "bf16" else 4
        master = 4 if (precision == "bf16" or cfg.zero_stage >= 1) else 0
        per_param = weights + master + 8
    # + 10% and 64 KB for the RNG states, client state, config and the files' framing
    return int(params * per_param * 1.1) + 2**16


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk(cfg, precision: str, free_fn: Callable[[Path], int] | None = None) -> Check:
    where = _existing_ancestor(Path(cfg.checkpoint_dir))
    if not where.is_dir():
        return Check("disk", "skip", f"{where} is not a directory (see run dir)")
    one = checkpoint_bytes(cfg, precision)
    need = one * (cfg.checkpoint.keep_last + 1)  # keep_last kept + the one being written
    free = (free_fn or disk_free)(where)
    detail = (
        f"{fmt_bytes(free)} free at {where}; checkpoints need ~{fmt_bytes(need)} "
        f"({cfg.checkpoint.keep_last}+1 x {fmt_bytes(one)}, {precision}, ZeRO-{cfg.zero_stage})"
    )
    if free < need:
        return Check(
            "disk",
            "fail",
            detail,
            f"free {fmt_bytes(need - free)} at {where}, point checkpoint.dir at a larger "
            "filesystem, or lower checkpoint.keep_last",
        )
    return Check("disk", "ok", detail)


def check_writable(name: str, path: Path) -> Check:
    target = _existing_ancestor(path)
    if not target.is_dir():
        return Check(
            name,
            "fail",
            f"{path}: {target} is a file, not a directory",
            f"choose another {name.replace(' ', '_')} (or remove the file {target})",
        )
    try:
        with tempfile.TemporaryDirectory(dir=target, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check(
            name,
            "fail",
            f"{path}: cannot write in {target} ({exc.strerror})",
            f"fix the permissions of {target} or choose another directory",
        )
    state = "exists" if path.exists() else f"will be created under {target}"
    return Check(name, "ok", f"{path} ({state}, writable)")


def check_data(cfg, fast: bool) -> list[Check]:
    from data_prep.shards import check_shard_size, verify_shard
    from pretrain.data import open_manifest

    data_dir = Path(cfg.data.data_dir)
    try:
        manifest = open_manifest(cfg.data, cfg.model.vocab_size)
    except UserError as exc:
        return [Check("data", "fail", str(exc), "point data.data_dir at a merged data directory")]
    tok = manifest.get("tokenizer", {})
    records = list(manifest.get("shards", []))
    if (manifest.get("validation") or {}).get("path"):
        records.append(manifest["validation"])
    tokens = 0
    try:
        for rec in records:
            stem = data_dir / rec["path"]
            # the shard format's own O(1) check: an imported .bin may hold more than the
            # manifest's documents (its held-out tail) and another dtype than the tokenizer's
            check_shard_size(stem, rec)
            if not fast:
                verify_shard(stem, rec)
            tokens += rec["tokens"]
    except UserError as exc:
        return [
            Check(
                "data",
                "fail",
                str(exc),
                "re-run `python -m data_prep tokenize` then `merge` for that source, "
                "then `python -m data_prep verify`",
            )
        ]
    how = "sizes checked" if fast else "sha256 verified"
    out = [
        Check(
            "data",
            "ok",
            f"{data_dir}: {len(records)} shard(s), {tokens:,} tokens ({how}), vocab "
            f"{tok.get('vocab_size')} <= model.vocab_size {cfg.model.vocab_size}",
        )
    ]
    out.append(check_tokenizer_file(data_dir, tok.get("sha256")))
    return out


def check_tokenizer_file(data_dir: Path, manifest_sha: str | None) -> Check:
    from data_prep.tokenizer import META_FILE, load_tokenizer_dir

    if not (data_dir / META_FILE).is_file():
        return Check(
            "tokenizer",
            "warn",
            f"no tokenizer files in {data_dir} (training does not need them; eval and export do)",
            "copy the tokenizer directory of the data prep output next to the manifest",
        )
    try:
        t = load_tokenizer_dir(data_dir)
    except UserError as exc:
        return Check("tokenizer", "fail", str(exc), "re-run `python -m data_prep tokenizer`")
    if t.hash != manifest_sha:
        return Check(
            "tokenizer",
            "fail",
            f"tokenizer {t.hash[:12]}... is not the one the shards were made with "
            f"({str(manifest_sha)[:12]}...)",
            "restore the data prep's tokenizer files or re-tokenize",
        )
    return Check("tokenizer", "ok", f"{t.kind}, vocab {t.vocab_size}, sha256 {t.hash[:12]}...")


def check_resume(cfg, fast: bool) -> Check:
    """Where the run would resume, and whether that save is intact (its integrity record:
    sizes always, CRC-32s unless --fast). A damaged newest save is a warning: the trainer
    moves it aside and resumes from the newest intact one."""
    from mop.errors import DamagedStateError
    from pretrain.checkpoint import check_save, read_pointer

    ckpt_dir = Path(cfg.checkpoint_dir)
    if cfg.checkpoint.resume == "never":
        return Check("resume", "ok", "checkpoint.resume=never: a fresh start")
    tag = read_pointer(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is None:
        return Check("resume", "ok", f"fresh start (no checkpoint pointer in {ckpt_dir})")
    try:
        recorded = check_save(ckpt_dir / tag, checksum=(lambda name: False) if fast else None)
    except DamagedStateError as exc:
        return Check(
            "resume",
            "warn",
            f"{exc}; the trainer will move it aside and resume from an older intact save",
            f"restore {ckpt_dir / tag} from a copy to resume from it",
        )
    how = "sizes checked" if fast else "sizes and CRC-32 checked"
    state = how if recorded else "no integrity record (an older save): unchecked"
    return Check("resume", "ok", f"resumes from {tag} ({state})")


def check_wandb(cfg, env: dict[str, str]) -> Check:
    mode = cfg.logging.wandb_mode
    if mode == "disabled":
        return Check("wandb", "ok", "disabled (metrics.jsonl only)")
    try:
        import wandb
    except Exception as exc:  # noqa: BLE001
        return Check(
            "wandb",
            "fail",
            f"logging.wandb_mode={mode} but wandb does not import: {exc}",
            "run `make install`, or logging.wandb_mode=disabled",
        )
    if mode == "offline":
        return Check(
            "wandb",
            "ok",
            f"{wandb.__version__} offline (files in run_dir/wandb; `wandb sync` later)",
        )
    if not env.get("WANDB_API_KEY"):
        return Check(
            "wandb",
            "warn",
            f"{wandb.__version__} online, but WANDB_API_KEY is not set in this environment",
            "export WANDB_API_KEY in the job (or `wandb login` once), or logging.wandb_mode=offline",
        )
    return Check("wandb", "ok", f"{wandb.__version__} online (API key set)")
