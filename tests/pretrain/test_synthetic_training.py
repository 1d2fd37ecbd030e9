"""The paper's synthetic experiments end to end: `python -m data_prep synthetic` output is a
training data directory for `python -m pretrain` (no mixture plan, no validation sequences),
and `python -m eval --suite synthetic` scores the trained checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

from data_prep.manifest import load_manifest
from data_prep.synthetic.cli import main as synthetic_cli
from eval.__main__ import main as eval_main
from mop.config import load_config
from mop.results import load_results
from pretrain.config import TrainConfig
from pretrain.data import TrainData
from tests.pretrain.conftest import REPO, subprocess_env


def test_phonebook_trains_and_evaluates(tmp_path):
    book = tmp_path / "book"
    assert (
        synthetic_cli(["phonebook", "--out", str(book), "--size", "300", "--num-test", "40"]) == 0
    )
    run = tmp_path / "run"
    overrides = [
        "model=configs/model/tiny_dense.yaml",
        "model.vocab_size=64",  # the character tokenizer has 40 tokens
        f"data.data_dir={book}",
        "data.seq_len=16",  # one 16-token entry per sample (the manifest asks for it)
        f"run_dir={run}",
        "max_steps=40",
        "schedule.warmup_steps=4",
        "checkpoint.interval=20",
        "logging.log_interval=1",
        "logging.wandb_mode=disabled",
    ]
    cfg = load_config(TrainConfig, REPO / "configs/train/tiny_cpu.yaml", overrides)
    data = TrainData(book, load_manifest(book), cfg.data)
    assert data.labels == ["phonebook"] and data.shares == [1.0]
    assert data.packing == "document" and data.streams[0].num_windows == 300
    env = subprocess_env()
    res = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "configs/train/tiny_cpu.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "no validation sequences: in-loop validation is off" in res.stdout
    losses = [
        json.loads(x)["loss"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5

    assert eval_main(["--checkpoint", str(run), "--suite", "synthetic", "--limit", "20"]) == 0
    result = load_results(run / "checkpoints/step_00000040")["synthetic"]["phonebook"]
    assert result["book_size"] == 300 and result["n"] == 20 and 0.0 <= result["accuracy"] <= 1.0
    # 40 steps learn the format and the digit distribution: the loss per digit is below a
    # uniform guess over the 40 tokens (ln 40 = 3.7)
    assert 0.0 <= result["digit_accuracy"] <= 1.0 and result["answer_loss"] < 3.0


def test_shortest_path_directory_is_training_data(tmp_path):
    """Variable-length documents (graph + query + path) pack into windows like any corpus."""
    graphs = tmp_path / "graphs"
    args = ["shortest-path", "--out", str(graphs), "--size", "60", "--num-test", "10"]
    assert synthetic_cli([*args, "--nodes", "10", "--edge-prob", "0.3"]) == 0
    manifest = load_manifest(graphs)
    cfg = load_config(
        TrainConfig,
        REPO / "configs/train/tiny_cpu.yaml",
        [f"data.data_dir={graphs}", "data.seq_len=64", "run_dir=unused"],
    )
    data = TrainData(graphs, manifest, cfg.data)
    assert data.labels == ["shortest_path"] and data.shares == [1.0]
    train_tokens = sum(r["tokens"] for r in manifest["shards"] if r["split"] == "train")
    assert data.streams[0].num_windows == (train_tokens - 1) // 64
    batch = data.collate(list(range(8)))
    assert batch.input_ids.shape == (8, 64) and int(batch.input_ids.max()) < 64
