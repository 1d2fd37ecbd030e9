import math

import pytest
import torch

from pretrain.model.router import (
    TopKRouter,
    expert_counts_per_row,
    expert_load_stats,
    load_balancing_loss,
    router_z_loss,
)


def _router(logits_rows, top_k=2, renormalize=True):
    """A router whose logits equal the given rows: identity weight on one-hot inputs."""
    logits = torch.tensor(logits_rows, dtype=torch.float32)
    n, e = logits.shape
    router = TopKRouter(d_model=e, num_experts=e, top_k=top_k, renormalize=renormalize)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
    return router, logits


def test_top_k_and_renormalisation_by_hand():
    router, x = _router([[0.0, math.log(2), math.log(3), math.log(4)]])
    r = router(x)  # probs 1/10, 2/10, 3/10, 4/10
    assert torch.allclose(r.probs, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert r.experts.tolist() == [[3, 2]]
    assert torch.allclose(r.weights, torch.tensor([[4 / 7, 3 / 7]]))
    raw = TopKRouter(4, 4, 2, renormalize=False)
    raw.weight.data.copy_(torch.eye(4))
    assert torch.allclose(raw(x).weights, torch.tensor([[0.4, 0.3]]))
    assert r.tokens_per_expert.tolist() == [0, 0, 1, 1]


def test_load_balancing_loss_by_hand():
    # 2 tokens, 4 experts, top-1. Token 0 -> e0 (p=.7), token 1 -> e1 (p=.4).
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.3, 0.4, 0.2, 0.1]])
    counts = torch.tensor([1, 1, 0, 0])
    # f = [.5, .5, 0, 0], P = [.5, .25, .15, .1] -> 4 * (.25 + .125) = 1.5
    assert load_balancing_loss(probs, counts, top_k=1).item() == pytest.approx(1.5)


def test_load_balancing_loss_uniform_is_one_and_collapsed_is_e():
    e, n, k = 8, 16, 2
    uniform = torch.full((n, e), 1 / e)
    counts = torch.full((e,), n * k // e)
    assert load_balancing_loss(uniform, counts, k).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1.0
    counts = torch.zeros(e, dtype=torch.long)
    counts[0] = n * k
    assert load_balancing_loss(collapsed, counts, k).item() == pytest.approx(e)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    # logsumexp: log 2 and log 4 -> mean of squares
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_expert_load_stats():
    stats = expert_load_stats(torch.tensor([6, 2, 0, 0]))
    assert stats["tokens_per_expert_frac"].tolist() == [0.75, 0.25, 0.0, 0.0]
    assert stats["max_imbalance"].item() == pytest.approx(3.0)
    assert stats["min_imbalance"].item() == 0.0
    assert stats["dead_experts"].item() == 2


def test_expert_counts_per_row_by_hand():
    # 2 rows x 3 tokens, top-2 over 4 experts, tokens in row-major order.
    experts = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2], [3, 2], [3, 1]])
    counts = expert_counts_per_row(experts, rows=2, num_experts=4)
    assert counts.tolist() == [[3, 2, 1, 0], [0, 1, 2, 3]]
    assert counts.sum(0).tolist() == torch.bincount(experts.flatten(), minlength=4).tolist()


def test_moe_layer_reports_per_row_counts():
    from pretrain.model.config import MoEConfig
    from pretrain.model.moe import MoE

    torch.manual_seed(0)
    layer = MoE(8, MoEConfig(num_experts=4, top_k=2), ffn_hidden=16)
    layer.reset_parameters(0.2, 0.2)
    _, aux = layer(torch.randn(3, 5, 8))
    per_row = aux["expert_counts_per_row"]
    assert per_row.shape == (3, 4) and per_row.sum(1).tolist() == [10, 10, 10]
    frac = per_row.sum(0).float() / 30
    torch.testing.assert_close(frac, aux["tokens_per_expert_frac"])


def test_router_runs_in_fp32_for_bf16_inputs():
    router = TopKRouter(8, 4, 2, True)
    torch.nn.init.normal_(router.weight)
    r = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert r.probs.dtype == torch.float32 and r.weights.dtype == torch.float32
    assert int(r.tokens_per_expert.sum()) == 10
