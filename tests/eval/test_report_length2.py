"""The length-2-path task in `python -m eval.report`: one figure and one table per graph size,
seed means with their range, every plotted point in figures.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from eval.report import main
from mop.results import update_results

# (name, ffn, d_model, experts, total, active) -> held-out accuracy per seed, per |V|
MODELS = {
    16: [
        (("dense_d8", "dense", 8, None, 817, 817), (0.70, 0.72)),
        (("dense_d32", "dense", 32, None, 10945, 10945), (1.0, 0.98)),
        (("moe_d8_e64", "moe", 8, 64, 13233, 1329), (0.71, 0.69)),
    ],
    32: [
        (("dense_d16", "dense", 16, None, 3169, 3169), (0.66, 0.64)),
        (("dense_d64", "dense", 64, None, 43393, 43393), (0.99, 1.0)),
    ],
}


def _grid(root: Path) -> Path:
    for v, models in MODELS.items():
        for (name, ffn, d, experts, total, active), accs in models:
            for seed, acc in enumerate(accs):
                run = root / "runs" / f"{name}-n{v}-s{seed}"
                model = {"name": name, "ffn": ffn, "d_model": d, "n_layers": 1}
                model |= {"num_experts": experts, "top_k": 2 if experts else None}
                model |= {"total_params": total, "active_params": active}
                head = {"checkpoint": str(run), "run_dir": str(run), "step": 2000, "model": model}
                section = {"accuracy": acc, "train_accuracy": acc + 0.01, "n": 50000}
                section |= {"n_test": 2000, "vertices": v, "seed": seed}
                update_results(run, head, "synthetic", {"length2_path": section})
    return root


def test_length2_path_figures_tables_and_points(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(_grid(tmp_path / "grid")), "--out", str(out)]) == 0
    assert (out / "length2_path_v16.png").is_file() and (out / "length2_path_v32.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Length-2 path (reasoning, theory task)" in report
    # one table per |V|, seed mean [min, max] of the held-out accuracy, then the training one
    assert "|V| = 16: accuracy on held-out graphs" in report
    assert "| dense_d32 | dense | - | 32 | 10.95K | 10.95K | 0.990 [0.980, 1.000] |" in report
    assert "| moe_d8_e64 | moe | 64 | 8 | 13.23K | 1.33K | 0.700 [0.690, 0.710] |" in report
    v32 = report[report.index("|V| = 32") :]
    assert "| dense_d16 | dense | - | 16 | 3.17K | 3.17K | 0.650 [0.640, 0.660] |" in v32
    assert "moe_d8_e64" not in v32  # each size its own models
    with open(out / "figures.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["figure"] == "length2_path_v16.png"]
    # each model once against total and once against active parameters, with its seed range
    assert len(rows) == 6
    moe = [r for r in rows if r["model"] == "moe_d8_e64"]
    assert {r["x_name"] for r in moe} == {"total_params", "active_params"}
    assert all(float(r["y"]) == 0.7 and float(r["y_min"]) == 0.69 for r in moe)
    assert all(r["runs"] == "2" for r in rows)
    with open(out / "results.csv", newline="") as fh:
        res = list(csv.DictReader(fh))
    assert {r["length2_path_vertices"] for r in res} == {"16", "32"}
