"""Process layout from the launcher's environment, and torch.distributed start-up.

torchrun / the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK; srun sets SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID. A plain `python -m pretrain` is a world of one.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def dist_env(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return DistEnv(0, 1, 0)


def free_port() -> int:
    """A free TCP port on localhost (for a single-process run or a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env(de: DistEnv, cuda: bool) -> None:
    """Environment that deepspeed/torch.distributed read; call before importing deepspeed."""
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    os.environ.setdefault("RANK", str(de.rank))
    os.environ.setdefault("WORLD_SIZE", str(de.world_size))
    os.environ.setdefault("LOCAL_RANK", str(de.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if de.world_size == 1:
        # A free port, so that concurrent single-process runs on one machine do not collide.
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = "29500"  # srun: set MASTER_ADDR/PORT in the sbatch script


def extensions_dir() -> str:
    """torch's JIT-extension cache for this Python environment.

    On CPU DeepSpeed JIT-builds its shm comm op (about a minute) into torch's per-user cache.
    The build flags hold the environment's path, so two environments of one user (two
    checkouts, a container and a venv) rebuild it in turn on every start and wait on each
    other's lock. A subdirectory per environment keeps one build each."""
    from torch.utils.cpp_extension import get_default_build_root

    env_key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return str(Path(get_default_build_root()) / f"env-{env_key}")


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device this process trains on, out of the `visible` ones.

    torchrun and `srun --gpus-per-node` show every GPU of the node to every process: local rank
    r takes GPU r. SLURM's per-task binding (`--gpus-per-task=1`, or `--gpu-bind` setting
    CUDA_VISIBLE_DEVICES per task) shows each task only its own GPU, which is then device 0
    whatever the local rank (local rank 3 as an ordinal would be an invalid device). With k
    GPUs bound to each task, local_rank % k spreads the node's tasks over them. (Fewer GPUs
    than tasks with all of them visible would put two ranks on one GPU, which NCCL refuses:
    `python -m pretrain.doctor` reports that before the job starts.)"""
    if visible < 1:
        raise RuntimeError("CUDA is available but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
    return local_rank % visible


def init_distributed(de: DistEnv, cuda: bool, timeout_minutes: float = 10.0) -> int | None:
    """The default process group; `timeout_minutes` is the config's parallel.timeout_minutes.
    Returns the CUDA device index this process uses (None on CPU): pass it to
    `deepspeed.initialize(args=...)` as `device_rank`, or DeepSpeed takes LOCAL_RANK for one.

    On CUDA with several processes the group is created here, bound to the chosen device
    (DeepSpeed's own init_distributed would bind cuda:LOCAL_RANK, the wrong ordinal under
    per-task GPU binding); DeepSpeed then adopts it. Binding the device makes NCCL connect at
    start-up (a bad network fails here, not in the first step) and torch never has to guess a
    barrier's device."""
    from datetime import timedelta

    import deepspeed
    import torch

    timeout = timedelta(minutes=timeout_minutes)
    device = None
    if cuda:
        device = cuda_device_index(de.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
        if de.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group(
                "nccl",
                timeout=timeout,
                rank=de.rank,
                world_size=de.world_size,
                device_id=torch.device("cuda", device),
            )
    elif de.local_rank == 0:
        clear_stale_jit_lock("deepspeed_shm_comm")
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=timeout
    )
    return device


def set_determinism(mode: bool | str, cuda: bool) -> None:
    """torch's deterministic algorithms as `deterministic` (the config) asks: false: off;
    true: on, with warn_only (an op without a deterministic kernel warns and runs anyway);
    "strict": on for real (such an op is an error, and SDPA's flash / memory-efficient
    backward take their deterministic variants). On a CPU `true` is already bitwise exact;
    on CUDA only `strict` is (see `reproducibility_line`). Call before building the model."""
    if not mode:
        return
    import torch

    if cuda:
        # cuBLAS is deterministic only with a fixed workspace; without it every matmul warns
        # in deterministic mode. Read at the first cuBLAS call, which comes later.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=mode != "strict")
    # Deterministic mode also fills every torch.empty with NaN; ZeRO allocates its gradient
    # buckets (hundreds of MB) with torch.empty on each step and overwrites them, so the fill
    # only costs time (seconds per step on CPU).
    torch.utils.deterministic.fill_uninitialized_memory = False


def reproducibility_line(mode: bool | str, cuda: bool) -> str:
    """The banner's plain account of how far a rerun or a resume reproduces this run."""
    if not mode:
        return "reproducibility: deterministic=false: reruns differ in the last bits"
    if not cuda or mode == "strict":
        return (
            "reproducibility: bitwise (deterministic kernels; a resume in the same layout is exact)"
        )
    return (
        "reproducibility: up to CUDA kernel nondeterminism: data order, RNG and optimizer state "
        "are restored exactly, but attention's backward and atomic adds are not bitwise "
        "reproducible; deterministic=strict makes them so (slower; an op without a "
        "deterministic kernel is then an error)"
    )


STALE_LOCK_SECONDS = 900


def clear_stale_jit_lock(name: str, max_age_s: float = STALE_LOCK_SECONDS) -> bool:
    """Remove torch's JIT-build lock of extension `name` when it is older than `max_age_s`.

    On the CPU accelerator DeepSpeed JIT-builds its shared-memory comm op at start-up; torch
    guards the build with a lock file that only the builder deletes. A process killed while
    building (SIGKILL, or a signal during start-up) leaves the lock behind, and every later
    run then waits for it forever, silently. A build takes about a minute, so a lock older than
    15 minutes has no builder. Returns whether one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, RuntimeError):
        return False  # no lock (the usual case) or no build directory
    if age < max_age_s:
        return False
    print(f"[train] removing a stale JIT build lock ({age / 60:.0f} min old): {lock}", flush=True)
    lock.unlink(missing_ok=True)
    return True


CPU_COMM_OP = "ShareMemCommBuilder"  # DeepSpeed's op builder behind the CPU accelerator's comm


def build_cpu_comm_op() -> None:
    """Build DeepSpeed's shared-memory comm op of the CPU accelerator now, into the extension
    cache a CPU run of this environment loads it from (`extensions_dir`). `make install` runs
    it: otherwise the first `python -m pretrain` on a fresh install compiles it with g++ inside
    "initializing torch.distributed" (31 s to 78 s measured on the 2-core machine; 0.1 s once
    built). The CPU Docker image does the same at build time."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    from deepspeed.accelerator import get_accelerator

    clear_stale_jit_lock("deepspeed_shm_comm")
    get_accelerator().create_op_builder(CPU_COMM_OP).load()
