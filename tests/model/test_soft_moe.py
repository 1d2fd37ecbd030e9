import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mop.config import validate
from mop.errors import ConfigError
from pretrain.model.soft_moe import SoftMoE, SoftMoEConfig

D, H = 16, 24


def make(seed: int = 0, **kw) -> SoftMoE:
    torch.manual_seed(seed)
    cfg = SoftMoEConfig(**{"num_experts": 4, "slots_per_expert": 2, **kw})
    return SoftMoE(D, cfg, ffn_hidden=H).double()


@pytest.mark.parametrize("normalize", [False, True])
def test_forward_backward_shapes_finite(normalize):
    layer = make(normalize=normalize)
    x = torch.randn(3, 7, D, dtype=torch.float64, requires_grad=True)
    y, stats = layer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert set(stats) == {"dispatch_entropy", "combine_entropy"}
    assert all(not v.requires_grad and torch.isfinite(v) for v in stats.values())
    y.square().mean().backward()
    for name, p in [("x", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_routing_weights_are_normalised():
    layer = make()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    dispatch, combine = layer.routing_weights(x)
    assert dispatch.shape == combine.shape == (2, 5, 8)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(2, 8, dtype=dispatch.dtype))
    torch.testing.assert_close(combine.sum(-1), torch.ones(2, 5, dtype=combine.dtype))
    assert (dispatch >= 0).all() and (combine >= 0).all()


def test_mask_removes_padding_from_dispatch():
    layer = make()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :] = False  # fully padded sequence: zeros, never NaN
    dispatch, combine = layer.routing_weights(x, mask)
    assert (dispatch[0, 4:] == 0).all()
    torch.testing.assert_close(dispatch[0].sum(0), torch.ones(8, dtype=dispatch.dtype))
    assert (dispatch[1] == 0).all()
    torch.testing.assert_close(combine.sum(-1), torch.ones(2, 6, dtype=combine.dtype))
    # Padding content must not reach valid positions.
    y, _ = layer(x, mask)
    x2 = x.clone()
    x2[0, 4:] = 100 * torch.randn(2, D, dtype=torch.float64)
    y2, _ = layer(x2, mask)
    torch.testing.assert_close(y[0, :4], y2[0, :4])
    assert torch.isfinite(y).all()
    # With padding masked, the valid prefix behaves as the unpadded sequence.
    y_short, _ = layer(x[:1, :4])
    torch.testing.assert_close(y[0, :4], y_short[0])


def test_permutation_equivariant():
    layer = make(normalize=True)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    perm = torch.randperm(9)
    y, _ = layer(x)
    y_perm, _ = layer(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm])


def test_not_causal():
    """A later token changes an earlier output: Soft MoE must not be used in a causal LM."""
    assert SoftMoE.causal is False
    layer = make()
    x = torch.randn(1, 6, D, dtype=torch.float64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[0, -1] += 1.0
    y2, _ = layer(x2)
    assert not torch.allclose(y[0, 0], y2[0, 0])


def test_no_batch_mixing():
    layer = make()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    y, _ = layer(x)
    y1, _ = layer(x[1:2])
    torch.testing.assert_close(y[1:2], y1)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("hidden", [None, 40])
def test_param_count(normalize, hidden):
    cfg = SoftMoEConfig(num_experts=3, slots_per_expert=5, ffn_hidden=hidden, normalize=normalize)
    layer = SoftMoE(D, cfg, ffn_hidden=H)
    h = hidden or H
    hand = D * 3 * 5 + 3 * (3 * D * h) + (1 if normalize else 0)
    actual = sum(p.numel() for p in layer.parameters())
    assert actual == hand == SoftMoE.num_params(D, cfg, H)
    assert SoftMoE.active_params_per_token(D, cfg, H) == hand


def test_flops_formula_matches_flop_counter():
    cfg = SoftMoEConfig(num_experts=3, slots_per_expert=2)
    layer = SoftMoE(D, cfg, ffn_hidden=H)
    b, t, s = 2, 10, 6
    assert SoftMoE.flops_per_token(D, cfg, H, t) == 6 * D * s + 6 * D * H * s / t
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(b, t, D))
    assert counter.get_total_flops() == pytest.approx(b * t * SoftMoE.flops_per_token(D, cfg, H, t))


def test_config_validation():
    with pytest.raises(ConfigError, match="num_experts"):
        validate(SoftMoEConfig, {"num_experts": 0})
    with pytest.raises(ConfigError, match="unknown config field 'experts'"):
        validate(SoftMoEConfig, {"experts": 4})
    cfg = SoftMoEConfig(init="normal", init_std=0.01)
    layer = SoftMoE(64, cfg, ffn_hidden=128)
    assert abs(layer.w1.std().item() - 0.01) < 2e-3
