import json

import pytest

from pretrain.model.accounting import model_size
from pretrain.model.transformer import build_model
from pretrain.model_info import main as model_info_main

from .conftest import tiny_config


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) weights counted once


@pytest.mark.parametrize(
    "kw",
    [
        dict(ffn="dense"),
        dict(ffn="dense", tie_embeddings=True),
        dict(ffn="moe"),
        dict(ffn="moe", n_kv_heads=None),
    ],
)
def test_total_params_match_the_built_model(kw):
    cfg = tiny_config(**kw)
    assert model_size(cfg).total_params == _numel(build_model(cfg))


def test_hand_formulas_dense():
    # V=97 d=32 L=2 H=4 Hkv=2 hd=8 f=48 T=32
    cfg = tiny_config()
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32  # wq + wk,wv + wo = 3072
    mlp = 3 * 32 * 48  # 4608
    total = 2 * 97 * 32 + 2 * (attn + mlp + 2 * 32) + 32
    size = model_size(cfg)
    assert size.total_params == total == size.active_params
    fwd = 2 * (2 * attn + 2 * mlp) + 2 * 97 * 32 + 2 * 4 * 32 * 32
    assert size.flops_per_token == 3 * fwd
    causal = model_size(cfg, attention="causal").flops_per_token
    assert size.flops_per_token - causal == 3 * 2 * 4 * 32 * (32 - 33 / 2)


def test_hand_formulas_moe():
    cfg = tiny_config("moe")  # E=4, k=2, f=48
    attn = 3072
    router = 32 * 4
    total_ffn = router + 4 * 3 * 32 * 48
    active_ffn = router + 2 * 3 * 32 * 48
    size = model_size(cfg, seq_len=16)
    assert size.total_params == 2 * 97 * 32 + 2 * (attn + total_ffn + 64) + 32
    assert size.total_params - size.active_params == 2 * (total_ffn - active_ffn)
    fwd = 2 * (2 * attn + 2 * active_ffn) + 2 * 97 * 32 + 2 * 4 * 16 * 32
    assert size.flops_per_token == 3 * fwd


def test_model_info_cli_table_and_json(capsys):
    from pathlib import Path

    root = Path(__file__).parents[2] / "configs" / "model"
    paths = [str(root / "dense_d256.yaml"), str(root / "moe_d256_e8.yaml")]
    assert model_info_main(paths) == 0
    table = capsys.readouterr().out
    assert "dense_d256" in table and "moe_d256_e8" in table and "FLOPs/token" in table
    assert model_info_main([*paths, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    dense, moe = rows
    assert dense["layers"] == 20 and dense["d_model"] == 256
    assert dense["total_params"] == dense["active_params"]
    assert moe["total_params"] > moe["active_params"] > dense["active_params"]
    assert model_info_main([str(root / "missing.yaml")]) == 2


def test_model_info_counts_classifier_configs_as_pretrain_memorization_does(capsys):
    """One count per model: a YAML with input_dim (the demo's pair), or any YAML with
    --classifier, is counted as the sequence classifier that pretrain.memorization builds and
    records in results.json (what the demo's verdict prints), equal to its real parameters."""
    from pathlib import Path

    from pretrain.memorization import load_classifier_config, model_header
    from pretrain.model.classifier import build_classifier

    root = Path(__file__).parents[2] / "configs" / "model"
    cases = [("demo_mem_dense.yaml", []), ("demo_mem_moe16.yaml", [])]
    cases += [("synth12_moe_d256_e8.yaml", ["--classifier"])]
    for name, flags in cases:
        assert model_info_main([str(root / name), *flags, "--json"]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        cfg = load_classifier_config(str(root / name), [], 32, 2)
        header = model_header(cfg, name)
        assert row["counted_as"] == "classifier (input_dim 32)", row
        assert (row["total_params"], row["active_params"]) == (
            header["total_params"],
            header["active_params"],
        )
        assert row["total_params"] == _numel(build_classifier(cfg)), name
    # the demo's pair, as its verdict line prints them
    assert (
        model_info_main([str(root / "demo_mem_dense.yaml"), str(root / "demo_mem_moe16.yaml")]) == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert "3.15K   3.15K" in table[2] and "14.16K  3.41K" in table[3], table
    # without --classifier a shared YAML is the decoder LM (embeddings and LM head)
    assert model_info_main([str(root / "synth12_moe_d256_e8.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counted_as"] == "LM"
