"""Real SLURM on localhost: `python -m slurm.submit sweep --grid` runs a tiny memorization
grid as data array -> run array -> report (afterok), and submitting it again skips every
finished run. Needs a running SLURM, as tests/slurm/test_slurm_requeue.py (same skip rule)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.slurm.test_slurm_requeue import _job_state, _slurm_up, _wait, pytestmark  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def _submit(grid: Path, env: dict, cwd: Path) -> list[str]:
    cmd = [sys.executable, "-m", "slurm.submit", "sweep", "--grid", str(grid)]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [line.split()[1].rstrip(":") for line in out.stdout.splitlines() if "submitted" in line]


def test_grid_on_slurm_runs_to_the_report_and_a_resubmission_skips(tmp_path: Path) -> None:
    assert _slurm_up(), "MOP_REQUIRE_SLURM=1 but no SLURM cluster answers"
    models = REPO / "configs/reproduce/models"
    opts = ["--cpus-per-task=1", "--time=10"]
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "task": "memorization",
                "runs_dir": str(tmp_path / "runs"),
                "sizes": [32],
                "models": [
                    {"name": "dense_f32", "config": str(models / "mem_dense_f32.yaml")},
                    {"name": "moe_e16_f16", "config": str(models / "mem_moe_e16_f16.yaml")},
                ],
                "steps": 3,
                "data": {"seq_len": 4, "dim": 8},
                "slurm": {"data": opts, "run": opts, "report": opts},
            }
        )
    )
    env = {
        **os.environ,
        "PY": str(REPO / ".venv/bin/python"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    for attempt in range(2):
        jobs = _submit(grid, env, tmp_path)
        assert len(jobs) == 3
        try:
            _wait(
                lambda jobs=jobs: all(_job_state(j)[0] == "GONE" for j in jobs) or None,
                300,
                "grid jobs",
            )
        finally:
            subprocess.run(["scancel", *jobs], capture_output=True)
        logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("grid-run-*")}
        assert (tmp_path / "runs/report/memorization_vs_n.png").is_file(), logs
        assert (tmp_path / "runs/runs/moe_e16_f16-n32-s0/results.json").is_file()
        runs_of_this = [text for name, text in logs.items() if f"-{jobs[1]}_" in name]
        assert len(runs_of_this) == 2
        skipped = sum("skipped, already finished" in text for text in runs_of_this)
        assert skipped == (0 if attempt == 0 else 2), runs_of_this
