"""torch vs megablocks MoE backends on one GPU: same inputs and weights, bf16, E=8 and E=64.

Checks outputs and gradients (x, router, w1, v1, w2) of both bf16 backends against an fp32
reference (the torch backend's per-expert loop in fp32), and against each other; times
forward+backward per layer. Prints a table; writes moe_backends.json under $OUT when set.
`bench/moe_backends.py` runs the same comparison at benchmark sizes.
Skips cleanly without CUDA or without megablocks.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from pretrain.model import moe_backends
from pretrain.model.config import MoEConfig
from pretrain.model.moe import MoE

pytestmark = pytest.mark.gpu

GRAD_NAMES = ("x", "router", "w1", "v1", "w2")
# bf16 keeps 8 bits of mantissa: errors relative to the largest reference value.
REL_TOL = 3e-2


def megablocks_usable() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs CUDA"
    if importlib.util.find_spec("megablocks") is None:
        return False, "megablocks not installed (pip install -r requirements-gpu.txt)"
    try:
        from pretrain.model.moe_backends import import_megablocks

        import_megablocks()
        import grouped_gemm  # noqa: F401  (mlp_impl='grouped' needs it)
    except Exception as exc:  # a broken CUDA extension, missing grouped_gemm
        return False, f"megablocks not usable: {exc}"
    return True, ""


def _layer(backend: str, num_experts: int, d: int, f: int, top_k: int = 2) -> MoE:
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, backend=backend)
    return MoE(d, cfg, f)


def _fwd_bwd(layer: MoE, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y, aux = layer(x)
    (y.float() * g).sum().backward()
    grads = [x.grad, layer.router.weight.grad, layer.w1.grad, layer.v1.grad, layer.w2.grad]
    return y.detach(), [gr.detach() for gr in grads], aux


def _rel(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (a.float() - ref.float()).abs().max().item()
    return diff, diff / max(ref.float().abs().max().item(), 1e-12)


def _time_ms(layer: MoE, x: torch.Tensor, g: torch.Tensor, iters: int) -> float:
    for _ in range(3):
        _fwd_bwd(layer, x, g)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        _fwd_bwd(layer, x, g)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def compare_backends(
    num_experts: int, tokens: int, d: int, f: int, top_k: int = 2, iters: int = 10, seed: int = 0
) -> dict:
    """One row: errors of each bf16 backend vs the fp32 reference and vs each other, timings."""
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    base = _layer("torch", num_experts, d, f, top_k)
    base.reset_parameters(std=0.02, out_std=0.02)
    x = torch.randn(tokens, d, device=dev).to(torch.bfloat16)
    g = torch.randn(tokens, d, device=dev)

    tb = copy.deepcopy(base).to(dev, torch.bfloat16)  # torch backend, grouped_mm if it works
    mb = _layer("megablocks", num_experts, d, f, top_k).to(dev, torch.bfloat16)
    mb.load_state_dict(tb.state_dict())
    # Reference: fp32 copy of the same bf16-rounded weights and inputs, per-expert loop.
    ref = copy.deepcopy(tb).float()
    ref.cfg = ref.cfg.model_copy(update={"grouped_mm": False})

    y_ref, g_ref, _ = _fwd_bwd(ref, x.float(), g)
    y_t, g_t, aux_t = _fwd_bwd(tb, x, g)
    y_m, g_m, aux_m = _fwd_bwd(mb, x, g)

    row: dict = {"experts": num_experts, "tokens": tokens, "d": d, "ffn": f, "top_k": top_k}
    for name, (y, grads) in {"torch": (y_t, g_t), "megablocks": (y_m, g_m)}.items():
        row[f"{name}_out_abs"], row[f"{name}_out_rel"] = _rel(y, y_ref)
        for gname, a, b in zip(GRAD_NAMES, grads, g_ref):
            row[f"{name}_d{gname}_abs"], row[f"{name}_d{gname}_rel"] = _rel(a, b)
    row["mb_vs_torch_out_rel"] = _rel(y_m, y_t)[1]
    row["grouped_mm_used"] = bool(moe_backends._GROUPED_MM_OK)
    frac_t, frac_m = aux_t["tokens_per_expert_frac"], aux_m["tokens_per_expert_frac"]
    row["same_routing"] = bool(torch.equal(frac_t, frac_m))
    row["lb_loss_equal"] = bool(torch.equal(aux_t["lb_loss"], aux_m["lb_loss"]))
    row["torch_ms"] = _time_ms(tb, x, g, iters)
    row["megablocks_ms"] = _time_ms(mb, x, g, iters)
    flops = 3 * 2 * tokens * top_k * 3 * d * f  # fwd+bwd expert matmuls
    row["torch_tflops"] = flops / row["torch_ms"] / 1e9
    row["megablocks_tflops"] = flops / row["megablocks_ms"] / 1e9
    return row


def format_rows(rows: list[dict]) -> str:
    cols = [
        "experts",
        "tokens",
        "d",
        "ffn",
        "torch_out_rel",
        "megablocks_out_rel",
        "megablocks_dw1_rel",
        "megablocks_dx_rel",
        "mb_vs_torch_out_rel",
        "same_routing",
        "torch_ms",
        "megablocks_ms",
        "torch_tflops",
        "megablocks_tflops",
    ]
    fmt = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for r in rows for c in cols]
    cells = [fmt[i * len(cols) : (i + 1) * len(cols)] for i in range(len(rows))]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(rows: list[dict], out_dir: str | None, name: str = "moe_backends.json") -> None:
    if out_dir:
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2)
        )


_ROWS: list[dict] = []


@pytest.mark.parametrize("num_experts", [8, 64])
def test_torch_and_megablocks_backends_agree(num_experts):
    ok, why = megablocks_usable()
    if not ok:
        pytest.skip(why)
    row = compare_backends(num_experts, tokens=4096, d=512, f=1408, iters=5)
    _ROWS.append(row)
    print("\n" + format_rows(_ROWS))
    write_json(_ROWS, os.environ.get("OUT"))
    assert row["same_routing"] and row["lb_loss_equal"]
    for name in ("torch", "megablocks"):
        assert row[f"{name}_out_rel"] < REL_TOL, row
        for gname in GRAD_NAMES:
            assert row[f"{name}_d{gname}_rel"] < REL_TOL, (gname, row)
