from pathlib import Path

import pytest

from mop.config import load_config, read_yaml
from mop.errors import ConfigError
from pretrain.model.config import (
    ClassifierConfig,
    ModelConfig,
    default_ffn_hidden,
    is_classifier_yaml,
)

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "model").glob("*.yaml"))


def _error(tmp_path, text: str, overrides=None) -> str:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(ModelConfig, path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults_resolve_from_d_model():
    cfg = ModelConfig(d_model=1024)
    assert (cfg.num_heads, cfg.kv_heads, cfg.head_dim) == (16, 16, 64)
    assert cfg.ffn_dim == default_ffn_hidden(1024) == 2816
    assert default_ffn_hidden(4096) == 11008  # the Llama-7B width
    assert cfg.n_layers == 20 and cfg.vocab_size == 32000 and cfg.max_seq_len == 2048
    # Unset sizes stay None so an override of d_model recomputes them.
    assert cfg.model_dump()["ffn_hidden"] is None


def test_override_of_d_model_recomputes_sizes(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("d_model: 256\n")
    cfg = load_config(ModelConfig, path, ["d_model=512"])
    assert cfg.num_heads == 8 and cfg.ffn_dim == 1408


def test_moe_section_defaults_when_selected():
    cfg = ModelConfig(ffn="moe")
    assert cfg.moe.num_experts == 8 and cfg.moe.top_k == 2 and cfg.moe.renormalize
    assert cfg.expert_ffn_dim == cfg.ffn_dim
    assert ModelConfig(ffn="moe", moe={"ffn_hidden": 512}).expert_ffn_dim == 512


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("d_model: 100\nn_heads: 3\n", "n_heads=3 must divide d_model=100"),
        ("d_model: 128\nn_heads: 4\nn_kv_heads: 3\n", "n_kv_heads=3 must divide n_heads=4"),
        ("ffn: moe\nmoe:\n  num_experts: 2\n  top_k: 3\n", "top_k=3 must be <= moe.num_experts=2"),
        ("ffn: mlp\n", "config field 'ffn'"),
        ("d_modle: 64\n", "unknown config field 'd_modle'"),
        ("ffn: moe\nmoe:\n  backend: cuda\n", "config field 'moe.backend'"),
        ("d_model: 96\nn_heads: 32\n", "must be even for rotary"),
    ],
)
def test_validation_errors_are_one_line_and_name_the_field(tmp_path, text, needle):
    assert needle in _error(tmp_path, text)


def test_soft_moe_refuses_causal_lm(tmp_path):
    msg = _error(tmp_path, "ffn: soft_moe\n")
    assert "Soft MoE mixes tokens across the sequence" in msg
    assert "causal LM" in msg
    assert ModelConfig(ffn="soft_moe", causal=False).soft_moe is not None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_grid_configs_load(path):
    # a YAML that sets a classifier's field is a classifier's (pretrain.memorization reads it;
    # model_info knows it)
    cfg = load_config(
        ClassifierConfig if is_classifier_yaml(read_yaml(path)) else ModelConfig, path
    )
    if path.stem.startswith(("dense_", "moe_")):
        assert cfg.n_layers == 20 and cfg.num_heads == cfg.d_model // 64
    if path.stem.startswith("synth12"):
        assert cfg.n_layers == 12
    if cfg.ffn == "moe":
        assert cfg.moe.top_k == 2


def test_grid_is_complete():
    names = {p.stem for p in CONFIGS}
    assert {f"dense_d{d}" for d in (256, 512, 1024, 2048, 4096)} <= names
    assert {f"moe_d{d}_e{e}" for d in (256, 512, 1024) for e in (8, 16, 32, 64)} <= names
    assert {"tiny_dense", "tiny_moe"} <= names


def test_classifier_yaml_is_told_by_its_own_fields():
    assert is_classifier_yaml({"d_model": 8, "query_init": "zero"})
    assert is_classifier_yaml({"input_dim": 17})
    assert not is_classifier_yaml({"d_model": 8, "ffn": "moe"})
