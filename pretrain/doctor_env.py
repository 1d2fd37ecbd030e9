"""The doctor's checks of the machine itself, with or without a train config: Python, torch
(and a matmul on each device kind), CUDA, NCCL (a one-rank all-reduce on GPU), DeepSpeed (its
CPU comm op), the optimizer kernel training uses, megablocks and grouped_gemm. Each returns
`Check` rows for `python -m pretrain.doctor` (pretrain/doctor.py), which says what they cover.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail", "skip"]


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
    `adamw_kernel`: fused, on GPU and CPU), so a torch build without it fails here."""
    from pretrain.deepspeed_config import adamw_kernel

    kernel = adamw_kernel()
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
