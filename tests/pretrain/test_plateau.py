"""The plateau rule (train.stop_on_plateau, pretrain/plateau.py) on a phone-book loss curve:
it must not stop during the plateau that comes before memorization starts."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from data_prep.synthetic.cli import main as synthetic_cli
from pretrain.config import PlateauConfig
from pretrain.plateau import PlateauStop
from tests.pretrain.conftest import REPO, subprocess_env

STEPS_PER_PASS = 4
# Pass losses of a phone-book run in the shape the issue saw on a 4,000-entry book: the format
# is learned in 3 passes (4.2 -> 2.10 nats/token, the loss of an entry with every name letter
# and digit at chance), then 60 passes at chance with tiny noise, then memorization (the loss
# falls to 0.9 over 40 passes), then the capacity plateau.
FORMAT = [4.2, 2.8, 2.12]
CHANCE = [2.10 + 0.004 * ((i * 7) % 3 - 1) for i in range(60)]
MEMORIZE = [2.10 - 1.2 * (i + 1) / 40 for i in range(40)]
CAPACITY = [0.9 + 0.0002 * (i % 2) for i in range(40)]
CURVE = FORMAT + CHANCE + MEMORIZE + CAPACITY
FIRST_MEMORIZING_PASS = len(FORMAT) + len(CHANCE) + 1  # 1-based


class _Trainer:
    def __init__(self):
        self.state = SimpleNamespace(step=0)
        self.stopped_at_pass: int | None = None

    def request_stop(self, reason: str) -> None:
        self.stopped_at_pass = self.state.step // STEPS_PER_PASS


def _run(cfg: PlateauConfig, curve: list[float] = CURVE) -> tuple[_Trainer, PlateauStop]:
    """Feed the curve step by step (each pass's steps at its pass loss) until a stop."""
    cb, tr = PlateauStop(cfg, steps_per_pass=STEPS_PER_PASS), _Trainer()
    for loss in curve:
        for _ in range(STEPS_PER_PASS):
            tr.state.step += 1
            cb.on_step_end(tr, SimpleNamespace(lm_loss=loss))
        if tr.stopped_at_pass is not None:
            break
    return tr, cb


def test_unarmed_patience_stops_on_the_initial_plateau():
    # The old rule: with patience 30 the run ends at chance, before memorization starts.
    tr, _ = _run(PlateauConfig(patience=30, min_delta=0.01))
    assert tr.stopped_at_pass is not None and tr.stopped_at_pass < FIRST_MEMORIZING_PASS


@pytest.mark.parametrize("patience", [1, 5, 30])
def test_armed_below_never_stops_during_the_initial_plateau(patience):
    cfg = PlateauConfig(patience=patience, min_delta=0.01, armed_below=2.05)
    tr, cb = _run(cfg)
    # armed only on the first pass below 2.05 (the 3rd memorizing pass), and the capacity
    # plateau is what stops it: `patience` passes after the loss stopped falling by > 0.01
    first_below = next(i for i, x in enumerate(CURVE) if x < 2.05) + 1
    assert first_below > FIRST_MEMORIZING_PASS
    last_better = len(FORMAT) + len(CHANCE) + len(MEMORIZE)
    assert tr.stopped_at_pass is not None and tr.stopped_at_pass > last_better
    assert tr.stopped_at_pass == last_better + patience
    assert cb.pass_losses[-1] < 0.91


def test_min_passes_holds_the_stop_back():
    cfg = PlateauConfig(patience=5, min_delta=0.01, min_passes=50)
    tr, _ = _run(cfg)
    # passes count once 50 are done: the 50th is the first bad pass counted, the 54th the 5th
    assert tr.stopped_at_pass == 54
    # a curve that never learns is ended by max_steps only, however long its plateau
    tr, cb = _run(PlateauConfig(patience=1, armed_below=2.05), FORMAT + CHANCE * 3)
    assert tr.stopped_at_pass is None and len(cb.pass_losses) == len(FORMAT) + 180
    assert cb.bad_passes == 0 and not cb.armed


def test_the_armed_rule_reaches_pretrain(tmp_path):
    """Through `python -m pretrain`: a run whose loss cannot fall (lr 1e-9) would stop after
    one bad pass; armed below a loss it never reaches, it runs to max_steps."""
    book = tmp_path / "book"
    args = ["phonebook", "--out", str(book), "--size", "40", "--num-test", "10"]
    assert synthetic_cli(args) == 0
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
        "stop_on_plateau.armed_below=0.5",
        "max_steps=20",
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
    assert "finished at step" not in res.stdout  # no plateau stop
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    passes = [r for r in recs if "pass_loss" in r]
    assert [r["step"] for r in passes] == [5, 10, 15, 20]
    assert {r["plateau_armed"] for r in passes} == {0}
    assert (run / "checkpoints/step_00000020").is_dir()
