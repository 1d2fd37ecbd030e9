"""The phone-book is trained in the context its eval asks in: one entry per sample at
position 0 (data.packing=document, chosen by the generator's manifest), padding out of the
loss; and train.stop_on_plateau ends a run whose loss over a pass of the book stopped falling."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from data_prep.manifest import load_manifest
from data_prep.synthetic.cli import main as synthetic_cli
from data_prep.synthetic.writer import load_test_set
from data_prep.tokenizer import load_tokenizer_dir
from eval.synthetic import _split_tokens
from mop.config import load_config
from mop.errors import DataError
from pretrain.config import PlateauConfig, TrainConfig
from pretrain.data import IGNORE_INDEX, TrainData
from pretrain.plateau import PlateauStop, steps_per_pass
from tests.pretrain.conftest import REPO, subprocess_env

SIZE = 40


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "book"
    args = ["phonebook", "--out", str(out), "--size", str(SIZE), "--num-test", "15"]
    assert synthetic_cli(args) == 0
    return out


def _data(book, *over: str, pad_multiple: int = 1) -> TrainData:
    cfg = load_config(
        TrainConfig,
        REPO / "configs/train/tiny_cpu.yaml",
        [f"data.data_dir={book}", "run_dir=unused", *over],
    )
    return TrainData(book, load_manifest(book), cfg.data, pad_multiple=pad_multiple)


def test_every_test_entry_is_trained_exactly_as_the_eval_asks_it(book):
    # seq_len 20 is an upper bound; pad_multiple 6 cuts the batch to 18 (entries: 15 + EOS)
    data = _data(book, "data.seq_len=20", pad_multiple=6)
    assert data.packing == "document" and data.samples_per_pass == SIZE
    tok = load_tokenizer_dir(book)
    batch = data.collate(list(range(SIZE)))  # one pass: every entry once
    assert batch.input_ids.shape == batch.targets.shape == (SIZE, 18)
    inputs, targets = batch.input_ids.tolist(), batch.targets.tolist()
    for row in load_test_set(book):
        prompt, answer = _split_tokens(tok, row)  # what eval feeds and scores
        doc = prompt + answer + [tok.eos_id]
        hits = [i for i, x in enumerate(inputs) if x[: len(prompt)] == prompt]
        assert len(hits) == 1, row["prompt"]  # the name, at position 0, in exactly one sample
        x, y = inputs[hits[0]], targets[hits[0]]
        assert x[: len(doc) - 1] == doc[:-1]  # same tokens at the same positions
        assert y[: len(doc) - 1] == doc[1:]  # every answer token (and EOS) is a target
        assert y[len(doc) - 1 :] == [IGNORE_INDEX] * (18 - len(doc) + 1)  # padding: no loss
        assert min(x) >= 0  # padded inputs are a real token id
    # without a multiple to keep, no column is padding in every row
    assert _data(book, "data.seq_len=20").collate([0, 1]).input_ids.shape == (2, 15)
    # a second pass shows every entry again, in another order
    again = data.collate(list(range(SIZE, 2 * SIZE))).input_ids.tolist()
    assert sorted(map(tuple, again)) == sorted(map(tuple, inputs)) and again != inputs


def test_pack_mode_still_packs_and_a_too_short_seq_len_is_refused(book):
    packed = _data(book, "data.seq_len=20", "data.packing=pack")
    assert packed.packing == "pack"
    assert packed.streams[0].num_windows == (SIZE * 16 - 1) // 20
    assert (packed.collate([0, 1, 2]).targets != IGNORE_INDEX).all()
    with pytest.raises(DataError, match=r"data.seq_len >= 15"):
        _data(book, "data.seq_len=8")


class _FakeTrainer:
    def __init__(self):
        self.state = SimpleNamespace(step=0)
        self.finished_reason = None

    def request_stop(self, reason: str) -> None:
        self.finished_reason = reason


def _feed(cb: PlateauStop, losses: list[float]) -> _FakeTrainer:
    tr = _FakeTrainer()
    for loss in losses:
        tr.state.step += 1
        cb.on_step_end(tr, SimpleNamespace(lm_loss=loss))
        if tr.finished_reason:
            break
    return tr


def test_plateau_stops_after_patience_passes_without_improvement():
    cb = PlateauStop(PlateauConfig(patience=2, min_delta=0.01), steps_per_pass=2)
    # pass means: 1.0, 0.5, 0.495 (not better by > 0.01), 0.49 (= 0.5 - 0.01: not better)
    tr = _feed(cb, [1.2, 0.8, 0.6, 0.4, 0.5, 0.49, 0.5, 0.48, 0.1, 0.1])
    assert cb.pass_losses == pytest.approx([1.0, 0.5, 0.495, 0.49])
    assert tr.state.step == 8 and "2 passes" in tr.finished_reason
    # a loss that keeps falling never stops; a pass's mean needs every step of the pass
    cb = PlateauStop(PlateauConfig(patience=1, min_delta=0.01), steps_per_pass=3)
    tr = _feed(cb, [1.0 - 0.05 * i for i in range(18)])
    assert tr.finished_reason is None and len(cb.pass_losses) == 6
    assert steps_per_pass(40, 8) == 5 and steps_per_pass(41, 8) == 6


def test_pretrain_stops_on_plateau_and_saves(book, tmp_path):
    """A run whose lr is too small to move the loss stops after patience + 1 passes."""
    run = tmp_path / "run"
    over = [
        "model=configs/model/tiny_dense.yaml",
        "model.vocab_size=64",
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_kv_heads=1",
        "model.ffn_hidden=32",
        "model.n_layers=1",
        f"data.data_dir={book}",
        "data.seq_len=16",
        "batch.grad_accum=1",
        "batch.micro_batch=8",  # 40 entries: 5 steps a pass
        "optim.lr=1e-9",
        "schedule.warmup_steps=0",
        "stop_on_plateau.patience=1",
        "stop_on_plateau.min_delta=0.01",
        "max_steps=100",
        f"run_dir={run}",
        "logging.wandb_mode=disabled",
        "eval.interval=0",
    ]
    res = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "configs/train/tiny_cpu.yaml", *over],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "document packing" in res.stdout
    assert "[train] finished at step 10:" in res.stdout
    assert (run / "checkpoints/step_00000010").is_dir()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "pass_loss" in r] == [5, 10]
