"""`python -m pretrain.model_info` given a train config counts the model it names."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.model_info import main as model_info_main

REPO = Path(__file__).resolve().parents[2]


def _rows(capsys, *argv: str) -> list[dict]:
    capsys.readouterr()
    assert model_info_main([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_train_config_is_answered_with_its_model(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for train, model in (
        ("configs/train/tiny_cpu.yaml", "configs/model/tiny_moe.yaml"),
        ("configs/train/paper_moe_d512_e8.yaml", "configs/model/moe_d512_e8.yaml"),
    ):
        (via_train,) = _rows(capsys, train)
        (direct,) = _rows(capsys, model)
        assert via_train == direct
        assert model_info_main([train]) == 0
        assert f"{train} is a train config: counting its model {model}" in capsys.readouterr().err


def test_overrides_apply_to_the_train_configs_model(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (row,) = _rows(capsys, "configs/train/tiny_cpu.yaml", "--set", "vocab_size=1024")
    (base,) = _rows(capsys, "configs/model/tiny_moe.yaml")
    assert row["total_params"] > base["total_params"]
