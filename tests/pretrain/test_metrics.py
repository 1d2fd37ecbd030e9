"""Expert-load metrics: per data source, counted from the training step's own routing."""

from __future__ import annotations

import pytest
import torch

from pretrain.metrics import expert_load_from_counts, mfu, source_expert_counts


def test_source_expert_counts_sum_rows_by_source():
    # Two MoE layers, 3 sequences: rows 0 and 2 from source 1, row 1 from source 0.
    layer0 = torch.tensor([[4, 0, 0], [1, 1, 2], [0, 3, 1]])
    layer1 = torch.tensor([[2, 2, 0], [0, 0, 4], [1, 1, 2]])
    stats = [
        {"expert_counts_per_row": layer0},
        {"other": torch.tensor(1.0)},  # a layer without token-choice routing (dense, PEER)
        {"expert_counts_per_row": layer1},
    ]
    counts = source_expert_counts(stats, torch.tensor([1, 0, 1]), num_sources=3)
    assert counts.tolist() == [
        [[1, 1, 2], [0, 0, 4]],
        [[4, 3, 1], [3, 3, 2]],
        [[0, 0, 0], [0, 0, 0]],
    ]
    assert source_expert_counts([{"other": torch.tensor(1.0)}], torch.tensor([0]), 1) is None


def test_expert_load_from_counts_by_hand():
    counts = torch.tensor([[[1, 1, 2], [0, 0, 4]], [[4, 3, 1], [3, 3, 2]], [[0, 0, 0], [0, 0, 0]]])
    out = expert_load_from_counts(counts, ["a", "b", "unused"])
    assert out["expert_load/layer0"] == pytest.approx([5 / 12, 4 / 12, 3 / 12], abs=1e-6)
    assert out["expert_imbalance/layer1"] == pytest.approx((6 / 12) * 3)
    assert out["expert_load_by_source/a/layer1"] == [0.0, 0.0, 1.0]
    assert out["expert_load_by_source/b/layer0"] == [0.5, 0.375, 0.125]
    assert not any("unused" in k for k in out)  # a source absent from the step
    assert not any(
        "by_source" in k for k in expert_load_from_counts(counts, ["a", "b", "c"], False)
    )


def test_mfu():
    assert mfu(6e9, 1000.0, 2, 989.0) == pytest.approx(6e12 / (2 * 989e12))
    assert mfu(6e9, 1000.0, 2, None) is None


@pytest.mark.parametrize(
    "env,explicit,want",
    [
        (None, None, "offline"),  # neither: offline
        ("disabled", None, "disabled"),  # the environment decides when the config is silent
        ("dryrun", None, "offline"),  # wandb's other spellings
        ("ONLINE", None, "online"),
        ("disabled", "offline", "offline"),  # a mode the config sets wins
        ("online", "disabled", "disabled"),
    ],
)
def test_wandb_mode_follows_WANDB_MODE_unless_the_config_sets_it(monkeypatch, env, explicit, want):
    from mop.config import load_config
    from pretrain.config import TrainConfig
    from tests.pretrain.conftest import REPO

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    over = [f"logging.wandb_mode={explicit}"] if explicit else []
    cfg = load_config(TrainConfig, REPO / "configs/train/tiny_cpu.yaml", over)
    assert cfg.logging.wandb_mode == want


def test_wandb_disabled_in_the_environment_writes_no_wandb_files(monkeypatch, tmp_path):
    """WANDB_MODE=disabled with a recipe that leaves the mode unset: metrics.jsonl only; a
    value wandb does not know is one error line naming the variable."""
    from mop.config import load_config
    from mop.errors import ConfigError
    from pretrain.config import TrainConfig
    from pretrain.metrics import MetricsLogger
    from tests.pretrain.conftest import REPO

    recipe = REPO / "configs/train/tiny_cpu.yaml"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(TrainConfig, recipe)
    logger = MetricsLogger(tmp_path / "run", cfg.logging, {}, rank=0, resume_step=None)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert (tmp_path / "run/metrics.jsonl").is_file()
    assert not (tmp_path / "run/wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' in the environment"):
        load_config(TrainConfig, recipe)
