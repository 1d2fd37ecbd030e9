import math

import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from mop.config import validate
from mop.errors import ConfigError
from pretrain.model.peer import PEER, PEERConfig, product_key_topk

D = 16


def make(seed: int = 0, **kw) -> PEER:
    torch.manual_seed(seed)
    cfg = PEERConfig(**{"num_experts": 64, "num_heads": 2, "top_k": 4, "key_dim": 8, **kw})
    return PEER(D, cfg).double()


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_forward_backward_shapes_finite(activation):
    layer = make(activation=activation)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    y, stats = layer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert 0 < stats["expert_usage"].item() <= 1 and not stats["expert_usage"].requires_grad
    y.square().mean().backward()
    for name, p in [("x", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_forward_matches_reference_formula():
    """y = sum_h sum_{i in topk} softmax(scores)_i * act(u_i . x) * v_i, written out plainly."""
    layer = make()
    x = torch.randn(7, D, dtype=torch.float64)
    y, _ = layer(x)
    scores, index = layer.retrieve(x)
    ref = torch.zeros_like(x)
    for m in range(7):
        for h in range(layer.num_heads):
            w = scores[m, h].softmax(-1)
            for j, i in enumerate(index[m, h].tolist()):
                a = torch.nn.functional.gelu(layer.down.weight[i] @ x[m])
                ref[m] += w[j] * a * layer.up.weight[i]
    torch.testing.assert_close(y, ref)


def test_only_retrieved_experts_get_gradient():
    layer = make()
    x = torch.randn(3, D, dtype=torch.float64)
    y, _ = layer(x)
    y.sum().backward()
    _, index = layer.retrieve(x)
    touched = torch.zeros(64, dtype=torch.bool)
    touched[index.reshape(-1)] = True
    for emb in (layer.down, layer.up):
        nonzero = emb.weight.grad.abs().sum(-1) > 0
        assert not (nonzero & ~touched).any()
        assert nonzero[touched].any()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_product_key_topk_equals_brute_force(k):
    torch.manual_seed(k)
    n = 8
    s1 = torch.randn(5, 3, n, dtype=torch.float64)
    s2 = torch.randn(5, 3, n, dtype=torch.float64)
    scores, index = product_key_topk(s1, s2, k)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # score(i, j) at i * n + j
    ref_scores, ref_index = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(index, ref_index)


def test_retrieve_equals_brute_force_over_full_keys():
    layer = make(num_experts=100, top_k=5)
    x = torch.randn(6, D, dtype=torch.float64)
    scores, index = layer.retrieve(x)
    n, half = 10, layer.key_dim // 2
    q = layer.query(x).view(6, layer.num_heads, layer.key_dim)
    k1, k2 = layer.sub_keys[0], layer.sub_keys[1]
    full_keys = torch.cat(  # key of expert i*n + j is [k1[i]; k2[j]]
        [k1.repeat_interleave(n, 0), k2.repeat(n, 1)], dim=-1
    )
    assert full_keys.shape == (100, 2 * half)
    ref_scores, ref_index = (q @ full_keys.T).topk(5, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(index, ref_index)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_causal(batchnorm):
    """Changing a later token changes no earlier output (BN in eval mode is per token too)."""
    assert PEER.causal is True
    layer = make(query_batchnorm=batchnorm)
    if batchnorm:
        layer(torch.randn(4, 6, D, dtype=torch.float64))  # populate running stats
        layer.eval()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, -1] = torch.randn(2, D, dtype=torch.float64)
    y2, _ = layer(x2)
    assert torch.equal(y[:, :-1], y2[:, :-1])
    assert not torch.allclose(y[:, -1], y2[:, -1])


@pytest.mark.parametrize("batchnorm", [False, True])
def test_param_count(batchnorm):
    cfg = PEERConfig(num_experts=81, num_heads=3, top_k=2, key_dim=10, query_batchnorm=batchnorm)
    layer = PEER(D, cfg)
    hand = D * 3 * 10 + 2 * 9 * 5 + 2 * 81 * D + (2 * 3 * 10 if batchnorm else 0)
    assert sum(p.numel() for p in layer.parameters()) == hand == PEER.num_params(D, cfg)
    active = D * 3 * 10 + 2 * 9 * 5 + 2 * 3 * 2 * D + (2 * 3 * 10 if batchnorm else 0)
    assert PEER.active_params_per_token(D, cfg) == active


def test_flops_formula_vs_flop_counter():
    cfg = PEERConfig(num_experts=81, num_heads=3, top_k=2, key_dim=10)
    layer = PEER(D, cfg)
    tokens = 12
    expected = 2 * D * 3 * 10 + 2 * 3 * 9 * 10 + 4 * 3 * 2 * D
    assert PEER.flops_per_token(D, cfg) == expected
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(tokens, D))
    # FlopCounterMode does not count embedding_bag (the up side, 2*H*k*d per token).
    assert counter.get_total_flops() == tokens * (expected - 2 * 3 * 2 * D)


def test_not_perfect_square_is_config_error():
    with pytest.raises(ConfigError, match=r"num_experts.*perfect square.*961.*1024"):
        validate(PEERConfig, {"num_experts": 1000})
    with pytest.raises(ValidationError, match="perfect square"):
        PEERConfig(num_experts=1000)


def test_other_config_errors():
    with pytest.raises(ConfigError, match="top_k = 9 must be <= sqrt"):
        validate(PEERConfig, {"num_experts": 64, "top_k": 9})
    with pytest.raises(ConfigError, match="key_dim must be even"):
        validate(PEERConfig, {"key_dim": 7})
    with pytest.raises(ConfigError, match="unknown config field 'experts'"):
        validate(PEERConfig, {"experts": 4})
    assert PEERConfig().num_experts == 1024**2  # paper default, larger than 1e6


def test_million_experts_small_d():
    """N = 1000^2 experts at d = 32: retrieval touches O(sqrt(N)) keys; the tables are gathered."""
    torch.manual_seed(0)
    cfg = PEERConfig(num_experts=1_000_000, num_heads=2, top_k=8, key_dim=16)
    layer = PEER(32, cfg)
    assert layer.num_sub_keys == math.isqrt(1_000_000) == 1000
    x = torch.randn(2, 4, 32)
    y, stats = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert stats["expert_usage"].item() == pytest.approx(2 * 4 * 2 * 8 / 1_000_000, rel=0.1)
