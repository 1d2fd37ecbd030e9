"""The submit tool chains jobs with afterok dependencies (fake sbatch on PATH)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 100) + 1 ))
echo $n > "$FAKE_DIR/count"
echo "$*" >> "$FAKE_DIR/calls"
echo "$n;cluster"
"""


def _fake_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }


def test_data_chain_dependencies(tmp_path):
    env = _fake_env(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slurm.submit",
            "--sbatch=--account=abc",
            "data",
            "configs/data/tiny.yaml",
            "--tasks",
            "4",
            "workers=2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 3
    tok, arr, merge = calls
    assert "data_prep_tokenizer.sbatch configs/data/tiny.yaml workers=2" in tok
    assert "--array=0-3" in arr and "--dependency=afterok:101" in arr
    assert "--dependency=afterok:102" in merge and "data_prep_merge.sbatch" in merge
    assert all("--account=abc" in c for c in calls)


def test_dry_run_and_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--dry-run", "data", "c.yaml", "--tasks", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert proc.stdout.count("sbatch --parsable") == 3 and "afterok:<job2>" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--dry-run", "data", "c.yaml", "--tasks", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--tasks must be >= 1" in bad.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "slurm.submit",
            "--dry-run",
            "sweep",
            "t.yaml",
            "--models",
            "nope.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "model config not found" in bad.stderr


def test_sbatch_scripts_are_valid_bash():
    for script in (REPO / "slurm").glob("*.sbatch"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_sweep_validates_and_submits_one_job_per_model(tmp_path):
    env = _fake_env(tmp_path)
    models = [
        str(REPO / "configs/model/tiny_dense.yaml"),
        str(REPO / "configs/model/tiny_moe.yaml"),
    ]
    cmd = [
        sys.executable,
        "-m",
        "slurm.submit",
        "sweep",
        str(REPO / "configs/train/tiny_cpu.yaml"),
        "--models",
        *models,
        "--after",
        "77",
        "max_steps=10",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    assert all("--dependency=afterok:77" in c and "train.sbatch" in c for c in calls)
    assert "run_dir=runs/tiny_dense" in calls[0] and "run_dir=runs/tiny_moe" in calls[1]
    # a bad override is caught before anything is submitted
    (tmp_path / "calls").unlink()
    bad = subprocess.run(
        [*cmd[:-1], "optim.lr=-1"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "optim.lr" in bad.stderr
    assert not (tmp_path / "calls").exists()


def test_sweep_with_eval_chains_one_eval_job_per_run(tmp_path):
    env = _fake_env(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "slurm.submit",
        "sweep",
        str(REPO / "configs/train/tiny_cpu.yaml"),
        "--models",
        str(REPO / "configs/model/tiny_dense.yaml"),
        str(REPO / "configs/model/tiny_moe.yaml"),
        "--eval",
        "knowledge,ppl",
        "--runs-dir",
        "runs/sweep1/",
        "max_steps=10",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 4 and all("train.sbatch" in c for c in calls[:2])
    # fake job ids 101, 102 are the training jobs; each eval waits for its own
    assert "run_dir=runs/sweep1/tiny_dense " in calls[0]
    assert "--dependency=afterok:101" in calls[2]
    assert "eval.sbatch runs/sweep1/tiny_dense --suite" in calls[2]
    assert "--dependency=afterok:102" in calls[3]
    assert "eval.sbatch runs/sweep1/tiny_moe --suite" in calls[3]
    assert calls[3].endswith("--suite knowledge,ppl")
    # a bad suite is refused before any training job is queued
    (tmp_path / "calls").unlink()
    bad = subprocess.run(
        [*cmd[:-5], "--eval", "bogus", "max_steps=10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown suite 'bogus'" in bad.stderr
    one_dir = subprocess.run(
        [*cmd[:-1], "run_dir=runs/x"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert one_dir.returncode == 2 and "use --runs-dir" in one_dir.stderr
    assert not (tmp_path / "calls").exists()


def test_eval_jobs_pass_their_arguments(tmp_path):
    env = _fake_env(tmp_path)
    cmd = [sys.executable, "-m", "slurm.submit", "--sbatch=--qos=low", "eval", "runs/a"]
    cmd += ["runs/b/checkpoints/step_00000100", "--suite", "math", "--eval-arg=--limit=50"]
    proc = subprocess.run([*cmd, "--after", "9"], cwd=tmp_path, env=env, text=True)
    assert proc.returncode == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and all("--qos=low" in c and "afterok:9" in c for c in calls)
    assert calls[0].endswith("eval.sbatch runs/a --suite math --limit=50")
    assert "--job-name=eval-step_00000100" in calls[1]
