"""`python -m pretrain.doctor [--config TRAIN.yaml [key=value ...]] [--fast]`: check a machine
before a long job.

Environment: Python, torch (and a matmul on each device kind here), CUDA, NCCL (a one-rank
all-reduce on GPU), DeepSpeed (imports with the accelerator it will use; loads its
shared-memory comm op on CPU), the optimizer (one step of torch's AdamW with the kernel
training uses: fused on GPU, foreach on CPU), megablocks and
grouped_gemm (a grouped GEMM on GPU; missing is only a warning without CUDA, unless the config
asks for moe.backend=megablocks). With a config: the process layout against the visible GPUs,
which GPU this process takes (`gpu binding`; run the doctor inside the job step, under srun, to
see each task's own view under per-task binding), free disk where checkpoints go against
`checkpoint.keep_last + 1` checkpoints of this model, the data directory (manifest, tokenizer, every shard's size; `--fast` skips the sha256 of each
shard), a writable run directory, the save a restart would resume from (its integrity record;
`--fast` checks sizes only), the wandb mode.

Prints a table; exit 0 when nothing failed (warnings allowed), else 1 with one `fix:` line per
problem. `--fast` skips the device ops and the shard hashes (seconds; slurm/train.sbatch runs
it first). The layout comes from `--world-size/--nproc-per-node`, else from the launcher's
environment (WORLD_SIZE / LOCAL_WORLD_SIZE, SLURM_NTASKS / SLURM_NTASKS_PER_NODE); GPUs are
expected when `--device cuda`, when SLURM allocated GPUs, when CUDA is visible, or when the
config needs them (moe.backend=megablocks).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mop.cli import ArgumentParser, examples
from mop.config import load_config
from mop.errors import UserError, cli_entry
from mop.progress import fmt_bytes

Status = Literal["ok", "warn", "fail", "skip"]
FAIL_EXIT_CODE = 1  # not 75: a job stopped by the doctor must not be requeued
SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# Environment ---------------------------------------------------------------------------------


def check_python() -> Check:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if (v.major, v.minor) < (3, 10):
        return Check("python", "fail", text, "use Python >= 3.10 (make install builds .venv)")
    return Check("python", "ok", text)


def check_torch(fast: bool) -> list[Check]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return [
            Check(
                "torch",
                "fail",
                f"import failed: {exc.__class__.__name__}: {exc}",
                "run `make install` (rebuilds .venv from requirements.txt)",
            )
        ]
    cuda = torch.cuda.is_available()
    detail = f"{torch.__version__}"
    if not fast:
        devices = ["cpu"] + (["cuda"] if cuda else [])
        for dev in devices:
            x = torch.ones(4, 4, device=dev)
            ok = float((x @ x).sum()) == 64.0
            if not ok:
                return [
                    Check("torch", "fail", f"{detail}: wrong matmul on {dev}", "reinstall torch")
                ]
        detail += f"; matmul ok on {', '.join(devices)}"
    out = [Check("torch", "ok", detail)]
    if torch.version.cuda is None:
        out.append(Check("cuda", "warn", "CPU-only torch build (training runs on CPU, fp32)"))
    elif not cuda:
        out.append(
            Check(
                "cuda",
                "warn",
                f"torch built for CUDA {torch.version.cuda} but no GPU visible",
                "check nvidia-smi and CUDA_VISIBLE_DEVICES (or request GPUs from SLURM)",
            )
        )
    else:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        out.append(
            Check(
                "cuda",
                "ok",
                f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}",
            )
        )
    out.append(check_nccl(cuda, fast))
    return out


def check_nccl(cuda: bool, fast: bool) -> Check:
    import torch

    if not cuda:
        return Check("nccl", "skip", "no CUDA (CPU runs use gloo)")
    try:
        version = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # noqa: BLE001
        return Check("nccl", "fail", f"unavailable: {exc}", "install a torch build with NCCL")
    if fast:
        return Check("nccl", "ok", version)
    import torch.distributed as dist

    try:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        t = torch.ones(1, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        return Check(
            "nccl",
            "fail",
            f"{version}: one-rank all-reduce failed: {exc}",
            "check the driver / NCCL install",
        )
    return Check("nccl", "ok", f"{version}; one-rank all-reduce ok")


def check_deepspeed(cuda: bool, fast: bool) -> Check:
    """Imports with the accelerator training uses; without --fast on CPU also loads the op a
    run needs first (JIT-built on first use, so a missing compiler shows here, not at step 0):
    the shared-memory comm op. On GPU no DeepSpeed op is built: the optimizer is torch's."""
    from pretrain.launch import extensions_dir

    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as pretrain.launch.prepare_env does
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    from pretrain.console import filter_known_chatter, quiet_third_party

    quiet_third_party()
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as exc:  # noqa: BLE001
        return Check(
            "deepspeed",
            "fail",
            f"import failed: {exc.__class__.__name__}: {exc}",
            "run `make install` (DeepSpeed is pinned in requirements.txt)",
        )
    detail = f"{deepspeed.__version__}; accelerator {get_accelerator()._name}"
    if fast or cuda:
        return Check("deepspeed", "ok", detail)
    op = "shm comm op"
    try:
        with filter_known_chatter():
            _deepspeed_op()
    except Exception as exc:  # noqa: BLE001
        return Check(
            "deepspeed",
            "fail",
            f"{detail}; {op} failed: {exc.__class__.__name__}: {exc}",
            "DeepSpeed JIT-builds its ops on first use: check the C++ compiler, or install "
            "DeepSpeed with its ops prebuilt (DS_BUILD_OPS=1)",
        )
    return Check("deepspeed", "ok", f"{detail}; {op} ok")


def _deepspeed_op() -> None:
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        raise RuntimeError("DeepSpeed reports its CPU comm op as incompatible with this machine")
    builder.load()


def check_optimizer(cuda: bool, fast: bool) -> Check:
    """One step of torch's AdamW with the kernel training asks for (pretrain/deepspeed_config.py
    `adamw_kernel`: fused on GPU, foreach on CPU), so a torch build without it fails here."""
    from pretrain.deepspeed_config import adamw_kernel

    kernel = adamw_kernel(cuda)
    what = f"torch AdamW {', '.join(kernel)}"
    if fast:
        return Check("optimizer", "ok", f"{what} (step not run: --fast)")
    device = "cuda" if cuda else "cpu"
    try:
        _adamw_step(device, kernel)
    except Exception as exc:  # noqa: BLE001
        return Check(
            "optimizer",
            "fail",
            f"{what} step on {device} failed: {exc.__class__.__name__}: {exc}",
            "install a torch build whose AdamW has this kernel (see requirements.txt)",
        )
    return Check("optimizer", "ok", f"{what} step ok on {device}")


def _adamw_step(device: str, kernel: dict[str, bool]) -> None:
    import torch

    p = torch.nn.Parameter(torch.ones(8, device=device))
    p.grad = torch.ones_like(p)
    torch.optim.AdamW([p], lr=0.1, **kernel).step()
    if device == "cuda":
        torch.cuda.synchronize()
    if not bool((p < 1).all()):
        raise RuntimeError("the step did not update the parameter")


def check_moe_kernels(needed: bool, cuda: bool, fast: bool) -> list[Check]:
    """megablocks and grouped_gemm: GPU-only kernels for moe.backend=megablocks."""
    out = []
    for dist_name, module in (("megablocks", "megablocks"), ("grouped_gemm", "grouped_gemm")):
        version = _version(dist_name)
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            why = "not installed" if version is None else f"import failed: {exc}"
            fix = (
                "on a GPU machine: pip install --no-deps --no-build-isolation -r "
                "requirements-gpu.txt (docker/build_gpu_deps.sh), or use moe.backend=torch"
            )
            if needed:
                out.append(
                    Check(module, "fail", f"{why}; the config uses moe.backend=megablocks", fix)
                )
            elif cuda:
                out.append(
                    Check(module, "warn", f"{why} (only moe.backend=megablocks needs it)", fix)
                )
            else:
                out.append(Check(module, "warn", f"{why} (GPU only; moe.backend=torch runs here)"))
            continue
        detail = version or "?"
        if module == "grouped_gemm" and cuda and not fast:
            detail += "; " + _grouped_gemm_op()
        elif not cuda:
            detail += "; kernels need CUDA (not run here)"
        out.append(Check(module, "ok", detail))
    return out


def _grouped_gemm_op() -> str:
    import torch
    from grouped_gemm import ops

    a = torch.ones(6, 8, device="cuda", dtype=torch.bfloat16)
    b = torch.ones(2, 8, 4, device="cuda", dtype=torch.bfloat16)
    out = ops.gmm(a, b, torch.tensor([2, 4]))
    torch.cuda.synchronize()
    return "gmm ok" if float(out[0, 0]) == 8.0 else "gmm WRONG result"


# Config-dependent ----------------------------------------------------------------------------


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


# Report --------------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace, env: dict[str, str] | None = None) -> list[Check]:
    env = dict(os.environ) if env is None else env
    cfg = None
    if args.config:
        from pretrain.config import TrainConfig

        cfg = load_config(TrainConfig, args.config, args.overrides)
    checks = [check_python(), *check_torch(args.fast)]
    import torch

    cuda = torch.cuda.is_available()
    checks.append(check_deepspeed(cuda, args.fast))
    checks.append(check_optimizer(cuda, args.fast))
    megablocks = (
        cfg is not None and cfg.model.ffn == "moe" and cfg.model.moe.backend == "megablocks"
    )
    checks += check_moe_kernels(megablocks, cuda, args.fast)
    if cfg is None:
        return checks
    from pretrain.config import resolve_precision

    layout = layout_from(args, env, megablocks, cuda)
    visible = torch.cuda.device_count() if cuda else 0
    checks += check_layout(cfg, layout, visible, slurm_gpus(env))
    binding = check_gpu_binding(layout, env, visible)
    if binding is not None:
        checks.append(binding)
    checks.append(check_disk(cfg, resolve_precision(cfg, layout.gpus_needed > 0)))
    checks.append(check_writable("run dir", Path(cfg.run_dir)))
    if Path(cfg.checkpoint_dir).absolute() != (Path(cfg.run_dir) / "checkpoints").absolute():
        checks.append(check_writable("checkpoint dir", Path(cfg.checkpoint_dir)))
    checks.append(check_resume(cfg, args.fast))
    checks += check_data(cfg, args.fast)
    checks.append(check_wandb(cfg, env))
    return checks


def format_table(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{'check':<{w}}  {'status':<6}  detail"]
    lines += [f"{c.name:<{w}}  {c.status:<6}  {c.detail}" for c in checks]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m pretrain.doctor",
        description="Check this machine (and a train config) before a long job.",
        epilog=examples(
            "python -m pretrain.doctor",
            "python -m pretrain.doctor --config configs/train/tiny_cpu.yaml "
            "data.data_dir=demo_out/data --fast",
            notes="Exit 0: ready (warnings allowed); 1: a problem, each with its fix.",
        ),
    )
    p.add_argument("--config", help="train config YAML: adds layout, disk, data, run dir checks")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for python -m pretrain")
    p.add_argument("--fast", action="store_true", help="skip device ops and shard sha256s")
    p.add_argument("--world-size", type=int, help="processes in the job (default: from env)")
    p.add_argument("--nproc-per-node", type=int, help="processes on this node (default: env)")
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cuda: GPUs are required; auto: required under a SLURM GPU allocation or when "
        "CUDA is visible",
    )
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checks = run_checks(args)
    print(format_table(checks), flush=True)
    problems = [c for c in checks if c.status == "fail"]
    for c in checks:
        if c.status in ("fail", "warn") and c.fix:
            print(f"{'fix' if c.status == 'fail' else 'hint'}: {c.name}: {c.fix}")
    if problems:
        names = ", ".join(c.name for c in problems)
        print(f"error: doctor found {len(problems)} problem(s): {names}", file=sys.stderr)
        return FAIL_EXIT_CODE
    print("doctor: no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
