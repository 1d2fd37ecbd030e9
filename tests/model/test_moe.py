import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mop.errors import ConfigError
from pretrain.model.config import MoEConfig
from pretrain.model.moe import MoE


def _moe(num_experts=4, top_k=2, renormalize=True, d=16, f=24) -> MoE:
    layer = MoE(d, MoEConfig(num_experts=num_experts, top_k=top_k, renormalize=renormalize), f)
    layer.reset_parameters(std=0.3, out_std=0.3)
    return layer


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: per token, softmax -> top-k -> (renorm) -> weighted experts."""
    w1, v1, w2 = layer.expert_weights()
    flat = x.reshape(-1, x.shape[-1])
    rows = []
    for tok in flat:
        probs = torch.softmax(layer.router.weight.float() @ tok.float(), dim=-1)
        top_w, top_e = torch.topk(probs, layer.top_k)
        if layer.cfg.renormalize:
            top_w = top_w / top_w.sum()
        out = torch.zeros_like(tok)
        for w, e in zip(top_w, top_e.tolist()):
            h = F.silu(w1[e] @ tok) * (v1[e] @ tok)
            out = out + w * (h @ w2[e])
        rows.append(out)
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize(
    ("num_experts", "top_k", "renormalize"), [(4, 2, True), (6, 1, False), (3, 3, True)]
)
def test_torch_backend_matches_naive_loop_outputs_and_gradients(num_experts, top_k, renormalize):
    layer = _moe(num_experts, top_k, renormalize)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y, aux = layer(x)
    ref = naive_moe(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)

    g = torch.randn_like(y)
    params = [x, layer.router.weight, layer.w1, layer.v1, layer.w2]
    got = torch.autograd.grad((y * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Dead experts: those in no token's top-k, counted here from the router logits directly.
    logits = x.detach().reshape(-1, 16) @ layer.router.weight.detach().t()
    chosen = logits.topk(top_k, dim=-1).indices.unique()
    assert int(aux["dead_experts"]) == num_experts - chosen.numel()
    assert aux["lb_loss"].requires_grad


def test_dead_expert_gets_zero_gradient_and_is_counted():
    layer = _moe(num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight[3] = -1e3  # with positive inputs, expert 3 is never chosen
    x = torch.rand(3, 5, 16)
    y, aux = layer(x)
    assert aux["dead_experts"].item() >= 1
    y.sum().backward()
    for grad in (layer.w1.grad, layer.v1.grad, layer.w2.grad):
        per_expert = grad.view(4, 24, 16)
        assert torch.count_nonzero(per_expert[3]) == 0
        assert torch.count_nonzero(per_expert[:3]) > 0


def test_layout_is_megablocks_glu():
    layer = _moe(num_experts=4, d=16, f=24)
    assert layer.w1.shape == layer.v1.shape == layer.w2.shape == (4 * 24, 16)
    assert layer.router.weight.shape == (4, 16)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"router.weight", "w1", "v1", "w2"}


@pytest.mark.skipif(
    importlib.util.find_spec("megablocks") is not None, reason="megablocks installed"
)
def test_megablocks_missing_error_names_install_step():
    with pytest.raises(ConfigError) as info:
        MoE(16, MoEConfig(num_experts=4, backend="megablocks"), 24)
    msg = str(info.value)
    assert "megablocks" in msg
    assert "pip install --no-deps --no-build-isolation -r requirements-gpu.txt" in msg
    assert "docker/build_gpu_deps.sh" in msg


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_mm_path_matches_the_loop(monkeypatch):
    """The CUDA fast path (torch._grouped_mm, bf16) against the per-expert loop, empty expert
    included. torch 2.13 also runs it on CPU in bf16; skip where it refuses."""
    from pretrain.model import moe_backends

    monkeypatch.setattr(moe_backends, "_GROUPED_MM_OK", None)
    counts = [5, 0, 11, 16]
    e, d, f = 4, 32, 48
    xs = torch.randn(sum(counts), d, dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(e, f, d) / 6).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    out = moe_backends._expert_grouped_mm(xs, torch.tensor(counts), *ws)
    if out is None:
        pytest.skip("torch._grouped_mm refuses these inputs on this platform")
    ref = moe_backends._expert_loop(xs, counts, *ws)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [xs, *ws])
    want = torch.autograd.grad((ref * g).sum(), [xs, *ws])
    for a, b in zip(got, want):
        scale = b.float().abs().max()
        assert ((a.float() - b.float()).abs().max() / scale).item() < 2e-2


def _expert_inputs(counts, dtype=torch.float32, d=32, f=48):
    torch.manual_seed(0)
    e = len(counts)
    xs = torch.randn(sum(counts), d, dtype=dtype, requires_grad=True)
    ws = [(torch.randn(e, f, d) / 6).to(dtype).requires_grad_() for _ in range(3)]
    return xs, ws


def test_cpu_runs_the_experts_as_grouped_gemms_like_the_loop(monkeypatch):
    """On CPU the torch backend runs torch._grouped_mm (its CPU kernel is the loop's own mm):
    the same bits as the per-expert loop forward, an empty expert included, and no host list
    of sizes (nothing to sync, nothing that breaks a compiled graph). Backward agrees to fp32
    rounding: bit for bit on this machine, not on CI's CPU (the weight gradients' reduction
    order follows the CPU's vector width)."""
    from pretrain.model import moe_backends

    monkeypatch.setattr(moe_backends, "_GROUPED_MM_OK", None)
    counts = [5, 0, 11, 16]
    xs, ws = _expert_inputs(counts)
    calls = []
    grouped = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped(*a, **k))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host read"))
    out = moe_backends.run_local_experts(xs, torch.tensor(counts), *ws)
    monkeypatch.undo()
    assert len(calls) == 3  # gate, up, down
    ref = moe_backends._expert_loop(xs, counts, *ws)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [xs, *ws])
    want = torch.autograd.grad((ref * g).sum(), [xs, *ws])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_moe_layer_traces_into_one_graph():
    """The layer as the CUDA bf16 path runs it (grouped GEMMs, counts without bincount) has no
    graph break, so torch.compile gets it whole (also inside an activation checkpoint)."""
    torch.manual_seed(0)
    layer = _moe(d=32, f=48).to(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    ref, _ = layer(x)
    y, _ = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(y, ref)


@pytest.mark.parametrize(
    "refusal",
    [
        NotImplementedError(
            "Could not run 'aten::_grouped_mm' with arguments from the 'CPU' backend"
        ),
        RuntimeError("grouped gemm is only supported on CUDA devices with compute capability 9.0"),
        TypeError("_grouped_mm() got an unexpected keyword argument 'offs'"),
    ],
)
def test_a_grouped_mm_refusal_falls_back_to_the_loop_and_says_so_once(monkeypatch, caplog, refusal):
    from pretrain.model import moe_backends

    monkeypatch.setattr(moe_backends, "_GROUPED_MM_OK", None)
    tries = []

    def refuse(*a, **k):
        tries.append(1)
        raise refusal

    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    counts = [3, 4, 0, 5]
    xs, ws = _expert_inputs(counts)
    with caplog.at_level("WARNING", logger="pretrain.model.moe_backends"):
        first = moe_backends.run_local_experts(xs, torch.tensor(counts), *ws)
        second = moe_backends.run_local_experts(xs, torch.tensor(counts), *ws)
    assert torch.equal(first, moe_backends._expert_loop(xs, counts, *ws))
    assert torch.equal(second, first)
    assert len(tries) == 1  # not retried on every layer
    (record,) = caplog.records
    assert "per-expert loop" in record.getMessage() and type(refusal).__name__ in record.message


@pytest.mark.parametrize(
    "failure",
    [
        torch.OutOfMemoryError("CPU out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ],
)
def test_a_grouped_mm_failure_is_raised_not_hidden_behind_the_loop(monkeypatch, caplog, failure):
    from pretrain.model import moe_backends

    monkeypatch.setattr(moe_backends, "_GROUPED_MM_OK", None)

    def fail(*a, **k):
        raise failure

    monkeypatch.setattr(torch, "_grouped_mm", fail)
    counts = [3, 4, 0, 5]
    xs, ws = _expert_inputs(counts)
    with pytest.raises(type(failure), match=str(failure)[:20]):
        moe_backends._expert_grouped_mm(xs, torch.tensor(counts), *ws)
    assert moe_backends._GROUPED_MM_OK is None  # the next call tries the grouped GEMM again
    assert not caplog.records
