import pytest
import torch

from mop.errors import ConfigError
from pretrain.model.hf_export import SIDECAR, export_hf, import_hf, to_hf_state_dict
from pretrain.model.transformer import build_model

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")

CASES = {
    "dense": dict(ffn="dense"),
    "dense_tied_mha": dict(ffn="dense", tie_embeddings=True, n_kv_heads=None),
    "moe": dict(ffn="moe"),
}


def _perturbed(cfg):
    """A model with non-trivial norms too, so a swapped norm would show in the logits."""
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_export_with_same_logits(tmp_path, case):
    cfg = tiny_config(**CASES[case])
    model = _perturbed(cfg)
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    want = "MixtralForCausalLM" if cfg.ffn == "moe" else "MistralForCausalLM"
    assert type(hf).__name__ == want
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_weights_and_logits(tmp_path, case):
    cfg = tiny_config(**CASES[case])
    model = _perturbed(cfg)
    export_hf(model, tmp_path)
    back = import_hf(tmp_path).eval()
    assert back.cfg == cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_import_of_transformers_own_save_and_fused_layout(tmp_path):
    cfg = tiny_config("moe")
    model = _perturbed(cfg)
    export_hf(model, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "theirs")  # no sidecar: config from config.json only
    assert not (tmp_path / "theirs" / SIDECAR).exists()
    back = import_hf(tmp_path / "theirs")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k

    # transformers 5's in-memory fused layout: gate_up_proj [E, 2f, d], down_proj [E, d, f].
    from safetensors.torch import save_file

    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(tmp_path / "theirs" / "model.safetensors"), metadata={"format": "pt"})
    fused = import_hf(tmp_path / "theirs")
    for k, v in model.state_dict().items():
        assert torch.equal(v, fused.state_dict()[k]), k


def test_export_refusals(tmp_path):
    with pytest.raises(ConfigError, match="renormalise"):
        to_hf_state_dict(
            build_model(tiny_config("moe", moe={"num_experts": 4, "renormalize": False}))
        )
    with pytest.raises(ConfigError, match="causal"):
        export_hf(build_model(tiny_config(causal=False)), tmp_path)
