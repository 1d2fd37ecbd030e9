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
    # The memorization run has its n: accuracy vs n, the maximal n (1.0 >= 0.9 at n=64) and
    # accuracy vs params at the largest n; nothing else has data.
    assert summary["plots"] == [
        "memorization_vs_n.png",
        "memorization_max_n.png",
        "memorization_accuracy.png",
    ]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "`knowledge_vs_params.png` skipped" in md
    assert "`accuracy_vs_perplexity.png` skipped" in md
    rows = _read_csv(tmp_path / "out" / "results.csv")
    assert {r["memorization_accuracy"] for r in rows} == {"1.0", ""}
    assert {r["memorization_n"] for r in rows} == {"64", ""}


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


# -- the synthetic grids of slurm/grid.py: seeds averaged, figures.csv ------------------------

MEM_N = (1024, 4096, 16384)
# accuracy per (model, n, seed): dense forgets as n grows, MoE (same active) holds on longer.
MEM_ACC = {
    ("dense", 1024): (1.0, 0.98),
    ("dense", 4096): (0.92, 0.90),
    ("dense", 16384): (0.74, 0.70),
    ("moe", 1024): (1.0, 1.0),
    ("moe", 4096): (0.998, 0.996),
    ("moe", 16384): (0.96, 0.94),
}


def _mem_header(run: Path, ffn: str) -> dict:
    moe = ffn == "moe"
    head = _header(run, 300, ffn, 16, 9000.0 if moe else 1300.0, 1400.0 if moe else 1300.0)
    head["model"]["name"] = "moe_e16_f16" if moe else "dense_f32"
    head["model"]["num_experts"] = 16 if moe else None
    return head


def make_synthetic_grid(root: Path) -> Path:
    """A memorization grid (2 models x 3 n x 2 seeds) and a shortest-path grid (3 models x 2
    seeds), laid out as slurm/grid.py names them."""
    for (ffn, n), accs in MEM_ACC.items():
        for seed, acc in enumerate(accs):
            run = root / "runs" / f"{ffn}-n{n}-s{seed}"
            section = {"memorization": {"accuracy": acc, "n": n}}
            update_results(run, _mem_header(run, ffn), "synthetic", section)
    for name, ffn, total, active, valid in (
        ("dense_d32", "dense", 2e4, 2e4, (0.40, 0.50)),
        ("moe_d32_e8", "moe", 6e4, 2.2e4, (0.44, 0.46)),
        ("dense_d64", "dense", 7e4, 7e4, (0.80, 0.70)),
    ):
        for seed, v in enumerate(valid):
            run = root / "runs" / f"{name}-n5000-s{seed}"
            head = _header(run, 1000, ffn, 32 if "32" in name else 64, total, active)
            head["model"]["name"] = name
            section = {"shortest_path": {"exact_match": v - 0.1, "valid_shortest_path": v}}
            update_results(run / "checkpoints" / "step_00001000", head, "synthetic", section)
    for name, ffn, digits in (("dense_d32", "dense", 0.4), ("moe_d32_e8", "moe", 0.6)):
        run = root / "runs" / f"{name}-n500-s0"
        head = _header(run, 1000, ffn, 32, 2e4, 2e4)
        head["model"]["name"] = name
        pb = {
            "book_size": 500,
            "accuracy": digits / 3,
            "digit_accuracy": digits,
            "answer_loss": 1.5,
        }
        update_results(run, head, "synthetic", {"phonebook": {**pb, "n": 200}})
    return root


def test_synthetic_grid_figures_and_their_numbers(tmp_path: Path) -> None:
    grid = make_synthetic_grid(tmp_path / "grid")
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out), "--threshold", "0.9"]) == 0
    for name in (
        "memorization_vs_n.png",
        "memorization_max_n.png",
        "memorization_accuracy.png",
        "shortest_path_valid.png",
        "shortest_path_exact_match.png",
    ):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 5000 < len(data) < 200_000, name
    points = _read_csv(out / "figures.csv")

    def pts(fig: str) -> dict[tuple[str, str], float]:
        return {(p["series"], p["x"]): float(p["y"]) for p in points if p["figure"] == fig}

    vs_n = pts("memorization_vs_n.png")
    assert len(vs_n) == 6  # 2 models x 3 n, each the mean of its 2 seeds
    dense = next(s for s, _ in vs_n if s.startswith("dense_f32"))
    moe = next(s for s, _ in vs_n if s.startswith("moe_e16_f16"))
    assert moe.endswith("(9.00K total / 1.40K active)")
    assert dense.endswith("(1.30K total / 1.30K active)")
    assert vs_n[(dense, "4096")] == pytest.approx(0.91)
    assert vs_n[(moe, "16384")] == pytest.approx(0.95)
    assert {p["runs"] for p in points if p["figure"] == "memorization_vs_n.png"} == {"2"}
    # the spread of the two seeds beside each mean: std, min, max
    p = next(p for p in points if p["figure"] == "memorization_vs_n.png" and p["x"] == "4096"
             and p["series"] == dense)  # fmt: skip
    assert float(p["y_std"]) == pytest.approx(0.01414, abs=1e-4)
    assert (float(p["y_min"]), float(p["y_max"])) == pytest.approx((0.90, 0.92))

    # Largest n at >= 0.9 (seed means): dense 4096 (0.91), MoE 16384 (0.95), on both axes.
    max_n = [p for p in points if p["figure"] == "memorization_max_n.png"]
    assert {(p["series"], p["x_name"], p["y"]) for p in max_n} == {
        ("dense", "total_params", "4096"),
        ("dense", "active_params", "4096"),
        ("MoE (16 experts)", "total_params", "16384"),
        ("MoE (16 experts)", "active_params", "16384"),
    }
    at_largest = pts("memorization_accuracy.png")
    assert at_largest[("dense", "1300")] == pytest.approx(0.72)

    sp = {
        (p["model"], p["x_name"]): (float(p["y"]), p["runs"])
        for p in points
        if p["figure"] == "shortest_path_valid.png"
    }
    assert sp[("dense_d32", "active_params")] == (pytest.approx(0.45), "2")
    assert sp[("moe_d32_e8", "total_params")] == (pytest.approx(0.45), "2")
    assert sp[("dense_d64", "total_params")] == (pytest.approx(0.75), "2")
    em = [p for p in points if p["figure"] == "shortest_path_exact_match.png"]
    assert {p["model"]: round(float(p["y"]), 6) for p in em}["dense_d64"] == 0.65

    md = (out / "report.md").read_text()
    assert "## Memorization" in md and "| n=1,024 | n=4,096 | n=16,384 | max n (>= 0.9) |" in md
    dense_line = next(line for line in md.splitlines() if line.startswith("| dense_f32 |"))
    assert "| 0.990 [0.980, 1.000] | 0.910 [0.900, 0.920] | 0.720 [0.700, 0.740] | 4,096 |" in (
        dense_line
    )  # seed means with the seeds' range
    assert "## Shortest path" in md and "| dense_d64 |" in md
    # Phone-book runs that recall nothing at 90% still show their partial recall.
    assert "Phone-book recall per run" in md and "| moe_d32_e8 | moe | 8 |" in md
    assert "| 500 | 1,000 | 0.2 | 0.6 | 1.5 |" in md
    rows = {r["model"]: r for r in _read_csv(out / "results.csv") if r["phonebook_book_size"]}
    assert rows["dense_d32"]["phonebook_digit_accuracy"] == "0.4"
    assert rows["dense_d32"]["phonebook_answer_loss"] == "1.5"


def test_grid_threshold_moves_the_maximal_n(tmp_path: Path) -> None:
    grid = make_synthetic_grid(tmp_path / "grid")
    make_report([grid], tmp_path / "r", threshold=0.995)
    max_n = [p for p in _read_csv(tmp_path / "r" / "figures.csv") if "max_n" in p["figure"]]
    # Only the MoE keeps >= 0.995 (mean of 0.998 and 0.996 at n=4096); dense (0.99 at best) never.
    assert {(p["series"], p["y"]) for p in max_n} == {("MoE (16 experts)", "4096")}


# -- phone-book capacity: the paper's axis per seed, and bits stored ---------------------------

PB_BOOKS = (250, 500, 1000, 2000)
# exact recall per (model, book) and seed: dense holds 500 (one seed only 250), MoE 1000
PB_ACC = {
    "dense": {250: (1.0, 0.99, 0.98), 500: (0.95, 0.8, 0.92), 1000: (0.5, 0.4, 0.45)},
    "moe": {500: (1.0, 1.0, 1.0), 1000: (0.93, 0.95, 0.91), 2000: (0.6, 0.55, 0.5)},
}


def make_phonebook_grid(root: Path) -> Path:
    """Two models x their books x 3 seeds, with the data seed in each section (eval writes it)."""
    for ffn, books in PB_ACC.items():
        total, active = (3e4, 1e4) if ffn == "moe" else (1e4, 1e4)
        for book, accs in books.items():
            for seed, acc in enumerate(accs):
                run = root / "runs" / f"{ffn}-n{book}-s{seed}"
                head = _header(run, 1000, ffn, 16, total, active)
                head["model"]["name"] = f"{ffn}_d16"
                loss = 2.302585 * (1 - acc)  # a digit known with probability acc: bits scale
                section = {"book_size": book, "seed": seed, "accuracy": acc, "n": 200}
                section.update(digit_accuracy=acc, answer_loss=loss)
                update_results(run, head, "synthetic", {"phonebook": section})
    return root


def test_phonebook_capacity_per_seed_and_bits_stored(tmp_path: Path) -> None:
    import math

    grid = make_phonebook_grid(tmp_path / "pb")
    out = tmp_path / "report"
    assert main([str(grid), "--out", str(out), "--threshold", "0.9"]) == 0
    points = _read_csv(out / "figures.csv")
    mx = {
        p["model"]: p for p in points
        if p["figure"] == "phonebook_max_size.png" and p["x_name"] == "total_params"
    }  # fmt: skip
    # dense: seeds 0 and 2 hold 500, seed 1 only 250 -> mean 416.7 in [250, 500]
    assert float(mx["dense_d16"]["y"]) == pytest.approx(1250 / 3)
    assert (float(mx["dense_d16"]["y_min"]), float(mx["dense_d16"]["y_max"])) == (250, 500)
    assert mx["dense_d16"]["runs"] == "3"
    assert float(mx["moe_d16"]["y"]) == 1000 and mx["moe_d16"]["y_std"] == "0.0"

    # bits stored: book x 8 x (ln 10 - loss) / ln 2, the most over a model's books, per seed
    def bits(book: int, acc: float) -> float:
        return book * 8 * (math.log(10) - 2.302585 * (1 - acc)) / math.log(2)

    cap = {
        p["model"]: p for p in points
        if p["figure"] == "phonebook_bits.png" and p["x_name"] == "active_params"
    }  # fmt: skip
    moe_bits = [max(bits(b, PB_ACC["moe"][b][s]) for b in (500, 1000, 2000)) for s in range(3)]
    assert float(cap["moe_d16"]["y"]) == pytest.approx(sum(moe_bits) / 3, rel=1e-6)
    assert float(cap["moe_d16"]["y_max"]) == pytest.approx(max(moe_bits), rel=1e-6)
    rows = {
        (r["model"], r["phonebook_book_size"], r["seed"]): r for r in _read_csv(out / "results.csv")
    }
    r = rows[("dense_d16", "1000", "1")]
    assert float(r["phonebook_bits"]) == pytest.approx(bits(1000, 0.4), rel=1e-6)
    assert float(r["phonebook_bits_exact"]) == pytest.approx(400 * 8 * math.log2(10))
    assert float(r["phonebook_entries_recalled"]) == pytest.approx(400)
    assert float(r["phonebook_bits_per_param"]) == pytest.approx(bits(1000, 0.4) / 1e4, rel=1e-6)
    assert r["phonebook_max_size"] == "250"  # this seed's own largest book at >= 0.9
    assert rows[("dense_d16", "1000", "0")]["phonebook_max_size"] == "500"

    md = (out / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| moe_d16 |"))
    assert "| 1,000 [1,000, 1,000] |" in line and line.endswith("| 3 |")
    per_param = sum(moe_bits) / 3 / 3e4
    assert f"| {per_param:.3f} [" in line
    png = (out / "phonebook_bits.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
