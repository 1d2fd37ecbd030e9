"""`python -m eval.report` on a small fake grid of results.json files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from eval.report import BASE_COLUMNS, SYNTHETIC_COLUMNS, main, make_report
from mop.results import update_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZES = (256, 512, 1024)
BOOKS = (100_000, 300_000, 1_000_000)


def _header(run_dir: Path, step: int, ffn: str, d: int, total: float, active: float) -> dict:
    experts = 8 if ffn == "moe" else None
    return {
        "checkpoint": str(run_dir / f"step_{step}"),
        "run_dir": str(run_dir),
        "step": step,
        "model": {
            "name": run_dir.name,
            "ffn": ffn,
            "d_model": d,
            "n_layers": 20,
            "num_experts": experts,
            "top_k": 2 if experts else None,
            "total_params": total,
            "active_params": active,
        },
    }


def _tasks(skill: float) -> dict:
    return {
        "triviaqa": {"category": "knowledge", "primary": "f1", "score": 0.1 * skill},
        "nq_open": {"category": "knowledge", "primary": "f1", "score": 0.05 * skill},
        "hellaswag": {"category": "commonsense", "primary": "acc", "score": 0.3 * skill},
        "gsm8k": {"category": "math", "primary": "exact_match", "score": 0.02 * skill},
    }


def make_grid(root: Path) -> Path:
    """dense and MoE (8 experts) at 3 widths: LM runs with 2 checkpoints each, and a phone-book
    sweep of 3 book sizes per model (one run dir per book size, as a sweep would make)."""
    for ffn in ("dense", "moe"):
        for i, d in enumerate(SIZES):
            total = d * d * 100.0 * (8 if ffn == "moe" else 1)
            active = d * d * 100.0 * (2 if ffn == "moe" else 1)
            run = root / f"lm_{ffn}_{d}"
            for step, skill in ((500, 0.5), (1000, 1.0 + i)):
                ckpt = run / "checkpoints" / f"step_{step:08d}"
                head = _header(run, step, ffn, d, total, active)
                update_results(ckpt, head, "ppl", {"perplexity": 30.0 / skill, "loss": 1.0})
                update_results(ckpt, head, "tasks", _tasks(skill))
            # The phone-book model has a char vocab, hence fewer params than the LM one.
            for j, book in enumerate(BOOKS):
                run_pb = root / f"pb_{ffn}_{d}_{book}"
                acc = 0.99 if j <= i else 0.4  # width index i memorises books 0..i
                head = _header(run_pb, 2000, ffn, d, total / 2, active / 2)
                section = {"phonebook": {"book_size": book, "accuracy": acc, "n": 1000}}
                update_results(run_pb, head, "synthetic", section)
    return root


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_report_on_a_grid_writes_md_csv_and_plots(tmp_path: Path) -> None:
    grid = make_grid(tmp_path / "runs")
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out)]) == 0

    rows = _read_csv(out / "results.csv")
    assert len(rows) == 6 + 18  # latest step of each LM run + every phone-book run
    cols = list(rows[0])
    assert cols[: len(BASE_COLUMNS)] == list(BASE_COLUMNS)
    assert cols[-len(SYNTHETIC_COLUMNS) :] == list(SYNTHETIC_COLUMNS)
    assert {"task_triviaqa", "task_nq_open", "task_hellaswag", "task_gsm8k"} <= set(cols)

    lm = {(r["ffn"], int(r["d_model"])): r for r in rows if r["step"] == "1000"}
    assert len(lm) == 6
    r = lm[("moe", 512)]  # skill 2.0 at the latest step
    assert r["num_experts"] == "8" and r["top_k"] == "2"
    assert (
        float(r["total_params"]) == 512 * 512 * 800 and float(r["active_params"]) == 512 * 512 * 200
    )
    assert float(r["perplexity"]) == pytest.approx(15.0)
    assert float(r["knowledge"]) == pytest.approx((0.2 + 0.1) / 2)
    assert float(r["commonsense"]) == pytest.approx(0.6)
    assert float(r["task_gsm8k"]) == pytest.approx(0.04)
    assert r["phonebook_accuracy"] == "" and r["phonebook_max_size"] == ""

    pb = [r for r in rows if r["phonebook_book_size"]]
    assert len(pb) == 18
    for r in pb:
        i = SIZES.index(int(r["d_model"]))
        assert int(r["phonebook_max_size"]) == BOOKS[i]  # the whole sweep, not the row's book

    for name in (
        "knowledge_vs_params.png",
        "commonsense_vs_params.png",
        "math_vs_params.png",
        "accuracy_vs_perplexity.png",
        "phonebook_max_size.png",
    ):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    md = (out / "report.md").read_text()
    assert "![phonebook_max_size.png](phonebook_max_size.png)" in md
    assert "`shortest_path_valid.png` skipped" in md
    assert "`memorization_accuracy.png` skipped" in md
    assert not (out / "shortest_path_valid.png").exists()


def test_all_steps_keeps_every_checkpoint(tmp_path: Path) -> None:
    grid = make_grid(tmp_path / "runs")
    summary = make_report([grid], tmp_path / "r", all_steps=True)
    assert summary["rows"] == 12 + 18
    # A single results.json file is a valid argument too.
    one = next(grid.rglob("results.json"))
    assert make_report([one], tmp_path / "r1")["rows"] == 1


def test_threshold_changes_the_maximal_size(tmp_path: Path) -> None:
    grid = make_grid(tmp_path / "runs")
    assert main([str(grid), "--out", str(tmp_path / "r"), "--threshold", "0.995"]) == 0
    rows = _read_csv(tmp_path / "r" / "results.csv")
    assert all(r["phonebook_max_size"] == "" for r in rows)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "`phonebook_max_size.png` skipped" in md


def test_partial_results_skip_plots_without_crashing(tmp_path: Path) -> None:
    run = tmp_path / "mem"
    head = _header(run, 300, "soft_moe", 32, 1e4, 1e4)
    update_results(run, head, "synthetic", {"memorization": {"accuracy": 1.0, "n": 64}})
    bare = tmp_path / "bare"  # no model header at all, one task only
    update_results(bare, {}, "tasks", {"piqa": {"category": "commonsense", "score": 0.6}})
    summary = make_report([tmp_path], tmp_path / "out")
    assert summary["rows"] == 2
    assert summary["plots"] == ["memorization_accuracy.png"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "`knowledge_vs_params.png` skipped" in md
    assert "`accuracy_vs_perplexity.png` skipped" in md
    rows = _read_csv(tmp_path / "out" / "results.csv")
    assert {r["memorization_accuracy"] for r in rows} == {"1.0", ""}


@pytest.mark.parametrize("case", ["missing", "empty", "bad_json", "bad_schema"])
def test_bad_input_is_a_one_line_error(tmp_path: Path, capsys, case: str) -> None:
    target = tmp_path / "in"
    if case != "missing":
        target.mkdir()
    if case == "bad_json":
        (target / "results.json").write_text("{not json")
    if case == "bad_schema":
        (target / "results.json").write_text('{"schema": "other"}')
    assert main([str(target), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
