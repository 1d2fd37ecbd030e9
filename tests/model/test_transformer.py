import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.transformer import ModelOutput, build_model, lm_loss

from .conftest import tiny_config


@pytest.mark.parametrize("ffn", ["dense", "moe"])
@pytest.mark.parametrize("tie", [False, True])
def test_shapes_and_outputs(ffn, tie):
    cfg = tiny_config(ffn, tie_embeddings=tie)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    out = model(ids, return_hidden=True)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 11, cfg.vocab_size)
    assert out.hidden.shape == (3, 11, cfg.d_model)
    assert out.aux_loss.shape == ()
    if ffn == "dense":
        assert out.aux_loss.item() == 0.0 and out.expert_stats == []
    else:
        assert len(out.expert_stats) == cfg.n_layers
        s = out.expert_stats[0]
        assert s["tokens_per_expert_frac"].shape == (4,)
        assert s["tokens_per_expert_frac"].sum().item() == pytest.approx(1.0)
        assert {"max_imbalance", "dead_experts"} <= set(s)
        expected = cfg.moe.lb_loss_weight * out.aux_losses["lb_loss"] + (
            cfg.moe.z_loss_weight * out.aux_losses["z_loss"]
        )
        torch.testing.assert_close(out.aux_loss, expected)
    assert (model.lm_head.weight is model.embed.weight) == tie


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_causality(ffn):
    cfg = tiny_config(ffn)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


def test_non_causal_model_sees_the_future():
    cfg = tiny_config(causal=False)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % cfg.vocab_size
    with torch.no_grad():
        assert (model(ids).logits[0, 0] - model(changed).logits[0, 0]).abs().max() > 1e-5


def test_module_names_are_the_parallelism_contract():
    model = build_model(tiny_config())
    names = {n for n, _ in model.named_parameters()}
    for want in (
        "embed.weight",
        "blocks.0.attn.wq.weight",
        "blocks.1.attn.wo.weight",
        "blocks.0.attn_norm.weight",
        "blocks.0.ffn_norm.weight",
        "blocks.0.ffn.w1.weight",
        "blocks.0.ffn.w2.weight",
        "blocks.0.ffn.w3.weight",
        "norm.weight",
        "lm_head.weight",
    ):
        assert want in names
    for lin in ("wq", "wk", "wv", "wo"):
        assert getattr(model.blocks[0].attn, lin).bias is None
    assert model.blocks[0].attn.wk.weight.shape == (2 * 8, 32)  # GQA: 2 kv heads of dim 8


def test_scaled_init():
    cfg = tiny_config(d_model=256, n_heads=4, n_kv_heads=None, ffn_hidden=512, n_layers=8)
    model = build_model(cfg)
    block = model.blocks[0]
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert block.attn.wq.weight.std().item() == pytest.approx(std, rel=0.05)
    assert block.attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert block.ffn.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.all(block.attn_norm.weight == 1)


def test_lm_loss_ignores_index():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :3] = -100
    keep = targets != -100
    want = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(lm_loss(logits, targets), want)


def test_gqa_matches_repeated_kv_heads():
    """A GQA model equals the MHA model whose k/v heads are copies (transformers' repeat_kv)."""
    gqa = build_model(tiny_config(n_kv_heads=2)).eval()
    mha = build_model(tiny_config(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"blocks.{i}.attn.{name}.weight"].view(2, 8, 32)
            state[f"blocks.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=1e-5, atol=1e-5)


def test_backward_and_sequence_limit():
    cfg = tiny_config("moe")
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids[:, :-1])
    (lm_loss(out.logits, ids[:, 1:]) + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize(
    "kw",
    [
        dict(ffn="peer", peer={"num_experts": 16, "num_heads": 2, "top_k": 2, "key_dim": 8}),
        dict(ffn="soft_moe", causal=False, soft_moe={"num_experts": 4}),
    ],
    ids=["peer", "soft_moe"],
)
def test_ffn_plugins_build_run_and_are_counted(kw):
    """PEER and Soft MoE plug into the same block slot and the same accounting."""
    from pretrain.model.accounting import model_size

    cfg = tiny_config(**kw)
    model = build_model(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 8)))
    assert out.logits.shape == (2, 8, cfg.vocab_size)
    out.logits.sum().backward()
    assert model_size(cfg).total_params == sum(p.numel() for p in model.parameters())
