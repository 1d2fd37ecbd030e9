"""The sequence classifier and the memorization trainer (theory task)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.synthetic.cli import main as synthetic_cli
from data_prep.synthetic.memorization import load_memorization
from mop.errors import ConfigError
from pretrain.memorization import load_classifier_config, main, train_classifier
from pretrain.model.classifier import ClassifierConfig, build_classifier, classifier_size

REPO = Path(__file__).resolve().parents[2]
TINY = dict(d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16, input_dim=32)


def _cfg(ffn: str, **kw) -> ClassifierConfig:
    extra = {"moe": {"num_experts": 4, "top_k": 2}} if ffn == "moe" else {}
    if ffn == "soft_moe":
        extra = {"soft_moe": {"num_experts": 4}}
    if ffn == "peer":  # the paper's 1024^2 experts would take seconds to build
        extra = {"peer": {"num_experts": 64, "num_heads": 2, "top_k": 4, "key_dim": 8}}
    return ClassifierConfig(**{**TINY, "ffn": ffn, **extra, **kw})


@pytest.fixture(scope="module")
def mem_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mem") / "data"
    args = ["memorization", "--out", str(out), "--size", "64", "--seq-len", "16", "--dim", "32"]
    assert synthetic_cli(args) == 0
    return out


@pytest.mark.parametrize("ffn", ["dense", "moe", "soft_moe", "peer"])
def test_classifier_shapes_and_param_count(ffn: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(ffn)
    model = build_classifier(cfg)
    out = model(torch.randn(3, 8, 32))
    assert out.logits.shape == (3,) and out.aux_loss.shape == ()
    total, active = classifier_size(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert active <= total and (active < total) == (ffn in ("moe", "peer"))


def test_classifier_reads_the_last_token_only_when_causal() -> None:
    torch.manual_seed(0)
    model = build_classifier(_cfg("dense", causal=True))
    for p in model.head.parameters():  # the zero-initialised head hides every input
        torch.nn.init.normal_(p)
    x = torch.randn(2, 8, 32)
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(model(x).logits, model(y).logits)
    # Causal or not, the last position sees the whole sequence: changing the first vector
    # changes the prediction.
    z = x.clone()
    z[:, 0] += 1.0
    assert not torch.allclose(model(x).logits, model(z).logits)


def test_query_init_zero_starts_with_uniform_attention() -> None:
    torch.manual_seed(0)
    model = build_classifier(_cfg("dense", query_init="zero"))
    assert not model.blocks[0].attn.wq.weight.any() and model.blocks[1].attn.wk.weight.any()
    for p in model.head.parameters():  # the zero-initialised head hides every input
        torch.nn.init.normal_(p)
    # one layer: uniform weights make the last position a plain mean over the others, so their
    # order does not matter (RoPE rotates zero queries to zero); a random query makes it matter
    one = build_classifier(_cfg("dense", n_layers=1, query_init="zero"))
    normal = build_classifier(_cfg("dense", n_layers=1))
    x = torch.randn(2, 8, 32)
    shuffled = torch.cat([x[:, torch.randperm(7)], x[:, -1:]], dim=1)
    for m in (one, normal):
        for p in m.head.parameters():
            torch.nn.init.normal_(p)
    assert torch.allclose(one(x).logits, one(shuffled).logits, atol=1e-5)
    assert not torch.allclose(normal(x).logits, normal(shuffled).logits, atol=1e-5)


@pytest.mark.parametrize("ffn", ["dense", "soft_moe"])
def test_tiny_classifier_memorizes_64_sequences(mem_dir: Path, ffn: str) -> None:
    torch.manual_seed(0)
    x, y = load_memorization(mem_dir)
    model = build_classifier(_cfg(ffn))
    logs: list[dict] = []
    res = train_classifier(
        model,
        torch.from_numpy(np.array(x)),
        torch.from_numpy(np.array(y)),
        steps=300,
        lr=3e-3,
        log_every=10,
        target_accuracy=1.0,
        log=logs.append,
    )
    assert res["accuracy"] == 1.0, logs[-3:]
    assert logs[-1]["accuracy"] == 1.0 and res["steps"] <= 300


def test_minibatch_training_runs(mem_dir: Path) -> None:
    torch.manual_seed(0)
    x, y = load_memorization(mem_dir)
    model = build_classifier(_cfg("moe"))
    res = train_classifier(
        model, torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)), 6, 1e-3, 24, warmup=2
    )
    assert res["steps"] == 6 and 0.0 <= res["accuracy"] <= 1.0


def test_config_takes_input_dim_from_data_and_checks_length(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("d_model: 32\nn_layers: 1\nffn: soft_moe\nmax_seq_len: 8\n")
    cfg = load_classifier_config(str(path), ["n_heads=2"], input_dim=5, seq_len=8)
    assert cfg.input_dim == 5 and cfg.causal is False and cfg.num_heads == 2
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_classifier_config(str(path), None, input_dim=5, seq_len=9)
    with pytest.raises(ConfigError, match="input_dim"):
        load_classifier_config(str(path), ["input_dim=4"], input_dim=5, seq_len=8)


def test_cli_writes_metrics_weights_config_and_results(mem_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mop.results import load_results

    out = tmp_path / "run"
    argv = [
        "--data",
        str(mem_dir),
        "--model",
        str(REPO / "configs/model/tiny_dense.yaml"),
        "d_model=32",
        "n_heads=2",
        "n_kv_heads=2",
        "ffn_hidden=64",
        "--steps",
        "300",
        "--lr",
        "3e-3",
        "--log-every",
        "10",
        "--target-accuracy",
        "1.0",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    doc = load_results(out)
    assert doc["synthetic"]["memorization"] == {"accuracy": 1.0, "n": 64, "seed": 0}
    model = doc["model"]
    assert model["name"] == "tiny_dense" and model["ffn"] == "dense" and model["d_model"] == 32
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["accuracy"] == 1.0 and lines[-1]["step"] == doc["step"]
    state = load_file(str(out / "model.safetensors"))
    assert sum(v.numel() for v in state.values()) == model["total_params"]
    assert "input_dim: 32" in (out / "config.yaml").read_text()


def test_cli_bad_input_is_one_line_error(tmp_path: Path, capsys) -> None:
    argv = ["--data", str(tmp_path), "--model", "configs/model/tiny_dense.yaml", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "o")]) != 0
    assert capsys.readouterr().err.startswith("error: ")


# -- the length-2-path task (held-out graphs) ------------------------------------------------------


@pytest.fixture(scope="module")
def l2p_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("l2p") / "data"
    args = ["length2-path", "--out", str(out), "--size", "3000", "--vertices", "12"]
    assert synthetic_cli([*args, "--max-degree", "3", "--num-test", "400", "--seed", "0"]) == 0
    return out


def test_cli_length2_path_reports_held_out_accuracy(l2p_dir: Path, tmp_path: Path) -> None:
    from mop.results import load_results

    out = tmp_path / "run"
    argv = ["--data", str(l2p_dir), "--model", str(REPO / "configs/model/demo_l2p_dense_d32.yaml")]
    argv += ["input_dim=13"]  # |V| + 1 on this test's 12-vertex graphs (the demo's YAML: |V| = 16)
    argv += ["--steps", "300", "--lr", "3e-3", "--batch-size", "128", "--warmup", "20"]
    argv += ["--schedule", "cosine", "--min-lr-ratio", "0", "--log-every", "100", "--out", str(out)]
    assert main(argv) == 0
    doc = load_results(out)
    section = doc["synthetic"]["length2_path"]
    assert section["n"] == 3000 and section["n_test"] == 400 and section["vertices"] == 12
    assert (section["min_degree"], section["max_degree"]) == (2, 3)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    # `accuracy` in results.json is the held-out one; the training accuracy sits beside it
    assert section["accuracy"] == lines[-1]["test_accuracy"]
    assert section["train_accuracy"] == lines[-1]["accuracy"]
    # a width-32 model finds the shared vertex on 12-vertex graphs it never saw
    assert section["accuracy"] >= 0.9, lines
    # cosine: full lr after the warmup, then down to min_lr_ratio x lr at the last step
    assert [r["step"] for r in lines] == [100, 200, 300]
    assert 3e-3 > lines[0]["lr"] > lines[1]["lr"] > lines[2]["lr"] and lines[2]["lr"] < 3e-5
    assert doc["model"]["d_model"] == 32 and "input_dim: 13" in (out / "config.yaml").read_text()


def test_constant_schedule_keeps_the_warmup_then_the_lr(mem_dir: Path) -> None:
    torch.manual_seed(0)
    x, y = load_memorization(mem_dir)
    logs: list[dict] = []
    model = build_classifier(_cfg("dense"))
    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
    train_classifier(model, xt, yt, 6, 1e-3, warmup=4, log_every=1, log=logs.append)
    assert [r["lr"] for r in logs] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert all("test_accuracy" not in r for r in logs)  # memorization: test = train
