"""The training step's speed switches give the same numbers as the plain path (issue 14 item 4):
torch.compile of the blocks, fused/foreach AdamW, SDPA with grouped-query heads."""

from __future__ import annotations

import copy

import pytest
import torch

import pretrain.parallel as parallel
from mop.config import load_config
from pretrain.config import TrainConfig, derived_sizes
from pretrain.deepspeed_config import adamw_kernel, deepspeed_config
from pretrain.model.attention import Attention
from pretrain.model.config import ModelConfig, MoEConfig
from pretrain.model.transformer import build_model, lm_loss
from pretrain.parallel import build_mesh
from tests.pretrain.runs import TINY

APPLY_COMPILE = parallel.apply_compile  # the real one (the tests patch the module's name)


def _tiny_dense() -> ModelConfig:
    return ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
        max_seq_len=16,
    )  # fmt: skip


def _is_compiled(block) -> bool:
    """Compiled in place (nn.Module.compile), or its checkpointed body compiled."""
    body = getattr(block.forward, "checkpointed", None)
    return getattr(block, "_compiled_call_impl", None) is not None or hasattr(
        body, "_torchdynamo_orig_callable"
    )


def _loss_and_grads(model, x):
    out = model(x)
    loss = lm_loss(out.logits, x) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ckpt", [False, True])
def test_compile_switch_compiles_blocks_with_equal_results(monkeypatch, ckpt):
    # The trainer's default backend (inductor) needs minutes of C++ builds on a CPU runner;
    # aot_eager traces the same graphs through AOTAutograd, which is what can change results.
    inductor = parallel.apply_compile
    monkeypatch.setattr(parallel, "apply_compile", lambda m: inductor(m, backend="aot_eager"))
    torch.manual_seed(0)
    plain = build_model(_tiny_dense())
    cfg = load_config(
        TrainConfig, TINY, ["compile=true", f"activation_checkpointing={str(ckpt).lower()}"]
    )
    mesh = build_mesh(cfg, 1, 0)
    compiled = parallel.parallelize(copy.deepcopy(plain), cfg, mesh)
    assert all(_is_compiled(b) for b in compiled.blocks)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randint(0, 64, (2, 16))
    loss_p, grads_p = _loss_and_grads(plain, x)
    loss_c, grads_c = _loss_and_grads(compiled, x)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-6)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _tiny_moe() -> ModelConfig:
    return _tiny_dense().model_copy(update={"ffn": "moe", "moe": MoEConfig(num_experts=4, top_k=2)})


def _compiled_graphs(monkeypatch, ckpt: bool, grouped_mm: bool) -> tuple[int, dict, dict]:
    """Graphs torch.compile produced for a tiny MoE model over one forward+backward, and the
    gradients of the compiled and the plain model."""
    import torch._dynamo

    graphs = []

    def counting(gm, example_inputs):  # a backend that records each graph and runs it as is
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(parallel, "apply_compile", lambda m: APPLY_COMPILE(m, backend=counting))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model_cfg = _tiny_moe()
    model_cfg = model_cfg.model_copy(
        update={"moe": model_cfg.moe.model_copy(update={"grouped_mm": grouped_mm})}
    )
    plain = build_model(model_cfg)
    cfg = load_config(
        TrainConfig, TINY, ["compile=true", f"activation_checkpointing={str(ckpt).lower()}"]
    )
    compiled = parallel.parallelize(copy.deepcopy(plain), cfg, build_mesh(cfg, 1, 0))
    x = torch.randint(0, 64, (2, 16))
    _, grads_p = _loss_and_grads(plain, x)
    _, grads_c = _loss_and_grads(compiled, x)
    return len(graphs), grads_p, grads_c


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_compile_with_activation_checkpointing_compiles_the_moe_blocks(monkeypatch, grouped_mm):
    """Issue 23 item 2: dynamo traces a checkpoint() region whole or not at all, and an MoE
    block breaks its graph (here the per-expert loop's host sizes): compiled over the
    checkpointed forward, every MoE block ran eagerly (0 graphs). Compiled inside the
    checkpoint, it gets the graphs it gets without checkpointing, with the same gradients."""
    without, _, _ = _compiled_graphs(monkeypatch, ckpt=False, grouped_mm=grouped_mm)
    with_ckpt, grads_p, grads_c = _compiled_graphs(monkeypatch, ckpt=True, grouped_mm=grouped_mm)
    assert with_ckpt == without > 0
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_is_off_by_default():
    cfg = load_config(TrainConfig, TINY)
    model = parallel.parallelize(build_model(_tiny_dense()), cfg, build_mesh(cfg, 1, 0))
    assert not any(_is_compiled(b) for b in model.blocks)


def test_adamw_kernel_matches_the_per_parameter_loop():
    cfg = load_config(TrainConfig, TINY)
    ds = deepspeed_config(cfg, derived_sizes(cfg, 1), "fp32")
    params = {k: v for k, v in ds["optimizer"]["params"].items() if k != "torch_adam"}
    assert params.keys() >= adamw_kernel().keys()
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    fast = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, **{**params, "foreach": False, "fused": False})
    opt_fast = torch.optim.AdamW(fast, **params)  # fused=True runs torch's CPU fused kernel
    for _ in range(5):
        g = [torch.randn_like(p) for p in ref]
        for p, q, gi in zip(ref, fast, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt_ref.step()
        opt_fast.step()
    for p, q in zip(ref, fast):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_gqa_attention_is_one_sdpa_call_equal_to_repeated_heads(monkeypatch, masked):
    torch.manual_seed(0)
    attn = Attention(32, n_heads=4, n_kv_heads=2, head_dim=8)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.rand(2, 1, 6, 6) > 0.3 if masked else None
    if masked:
        mask |= torch.eye(6, dtype=torch.bool)  # every query sees at least itself
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    out = attn._attend(q, k, v, mask)
    assert len(calls) == 1 and calls[0].get("enable_gqa") is True
    # reference: kv heads repeated as transformers' repeat_kv does (query head h -> kv h // 2)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = sdpa(q, kr, vr, attn_mask=mask) if masked else sdpa(q, kr, vr, is_causal=True)
    torch.testing.assert_close(out, ref)
