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
# what the job would see: the log directory (sbatch cannot create it) and the environment
if [ -d logs ]; then echo yes; else echo no; fi >> "$FAKE_DIR/logs_seen"
env | grep '^MOP_' | sort > "$FAKE_DIR/env.$n"
echo "$n;cluster"
"""
TINY_DATA = str(REPO / "configs/data/tiny.yaml")


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
            TINY_DATA,
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
    assert f"data_prep_tokenizer.sbatch {TINY_DATA} workers=2" in tok
    assert "--array=0-3" in arr and "--dependency=afterok:101" in arr
    assert "--dependency=afterok:102" in merge and "data_prep_merge.sbatch" in merge
    assert all("--account=abc" in c for c in calls)
    # logs/ (the scripts' --output directory) existed before the first sbatch
    assert (tmp_path / "logs_seen").read_text().split() == ["yes"] * 3
    assert f"MOP_SLURM_DIR={REPO / 'slurm'}" in (tmp_path / "env.101").read_text()


def test_dry_run_and_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--dry-run", "data", TINY_DATA, "--tasks", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert proc.stdout.count("sbatch --parsable") == 3 and "afterok:<job2>" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--dry-run", "data", TINY_DATA, "--tasks", "0"],
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


def test_every_sbatch_script_is_run_by_a_test():
    # Parsing alone proves little: each job script must be executed (with stand-ins for srun
    # and the container runtimes) by tests/slurm/test_container_launch.py, which checks the
    # exact command each one launches. A new script without such a case fails here.
    from tests.slurm.test_container_launch import JOBS

    scripts = sorted(p.name for p in (REPO / "slurm").glob("*.sbatch"))
    assert scripts, "no sbatch scripts found"
    assert sorted({job[0] for job in JOBS}) == scripts


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


def _submit(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "slurm.submit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_every_config_of_a_chain_is_checked_before_the_first_sbatch(tmp_path):
    """A missing or invalid config, or a missing run directory, is one `error:` line and a
    non-zero exit; nothing is queued and nothing is written."""
    env = _fake_env(tmp_path)
    cases = [
        (["data", "missing.yaml"], ["config file not found: missing.yaml"]),
        (["data", TINY_DATA, "workers=0"], ["workers"]),
        (["data", str(REPO / "configs/train/tiny_cpu.yaml")], ["output_dir"]),
        (["eval", "runs/nope"], ["not found: runs/nope"]),
        (["eval", "runs/a", "--suite", "bogus"], ["bogus"]),
    ]
    for args, needles in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        _one_error_line(_submit(args, tmp_path, env), *needles)
        assert not (tmp_path / "calls").exists(), args
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args


def test_dry_run_writes_nothing(tmp_path):
    """--dry-run prints the chain and leaves the directory as it was (no logs/ either)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "runs" / "a").mkdir(parents=True)
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    chains = [
        ["data", TINY_DATA, "--tasks", "2"],
        ["eval", "runs/a"],
        ["sweep", str(REPO / "configs/train/tiny_cpu.yaml"), "--models"]
        + [str(REPO / "configs/model/tiny_dense.yaml"), "--eval", "ppl", "max_steps=30"],
    ]
    for args in chains:
        proc = _submit(["--dry-run", "--sbatch=--output=joblogs/%j.out", *args], work)
        assert proc.returncode == 0, proc.stderr
        assert "<job1> = " in proc.stdout
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before


def test_sweep_override_after_models_is_an_override(tmp_path):
    env = _fake_env(tmp_path)
    tiny = str(REPO / "configs/train/tiny_cpu.yaml")
    dense = str(REPO / "configs/model/tiny_dense.yaml")
    proc = _submit(
        ["sweep", tiny, "max_steps=5", "--models", dense, "max_steps=7", "optim.lr=0.01"],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stderr
    (call,) = (tmp_path / "calls").read_text().splitlines()
    # both reach the job, in command-line order (the last max_steps wins in the config)
    assert call.endswith("max_steps=5 max_steps=7 optim.lr=0.01"), call
    assert f"model={dense} run_dir=runs/tiny_dense" in call
    # and a bad one there is validated like any other override
    bad = _submit(["--dry-run", "sweep", tiny, "--models", dense, "optim.lr=-1"], tmp_path)
    _one_error_line(bad, "optim.lr")


def test_container_flags_reach_every_job(tmp_path):
    """--container puts the image, runtime and mounts into each job's environment (read by
    slurm/launch.sh); --sbatch --output directories are created before sbatch."""
    env = _fake_env(tmp_path)
    sif = tmp_path / "mop.sif"
    sif.write_text("image")
    flags = ["--container", str(sif), "--container-runtime", "apptainer"]
    flags += ["--container-mounts", f"{tmp_path}:/data:ro", "--sbatch=--output=out/x/%j.log"]
    proc = _submit([*flags, "data", TINY_DATA, "--tasks", "2"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    proc = _submit(
        [*flags, "sweep", str(REPO / "configs/train/tiny_cpu.yaml"), "--models"]
        + [str(REPO / "configs/model/tiny_moe.yaml"), "--eval", "ppl"],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "x").is_dir()
    scripts = [c.split()[-1] for c in (tmp_path / "calls").read_text().splitlines()]
    assert len(scripts) == 5  # tokenizer, tokenize, merge, train, eval
    for n in range(101, 106):
        job_env = (tmp_path / f"env.{n}").read_text().splitlines()
        assert f"MOP_CONTAINER_IMAGE={sif}" in job_env
        assert "MOP_CONTAINER_RUNTIME=apptainer" in job_env
        assert f"MOP_CONTAINER_MOUNTS={tmp_path}:/data:ro" in job_env
    dry = _submit(["--dry-run", "--container", "img.sqsh", "eval", str(tmp_path)], tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "MOP_CONTAINER_IMAGE=img.sqsh MOP_CONTAINER_RUNTIME=pyxis sbatch" in dry.stdout


def test_container_flag_errors(tmp_path):
    run = ["eval", str(tmp_path)]
    cases = [
        (["--container", "x.sif", "--container-runtime", "docker"], "'docker'"),
        (["--container", "nope.sif", "--container-runtime", "apptainer"], "nope.sif"),
        (["--container", "img", "--container-mounts", "rel/dir:/d"], "absolute"),
        (["--container", "img", "--container-mounts", "/no/such/dir"], "/no/such/dir"),
        (["--container", "img", "--container-mounts", f"{tmp_path}:rel"], "DST"),
        (["--container-mounts", str(tmp_path)], "needs --container"),
    ]
    for flags, needle in cases:
        _one_error_line(_submit(["--dry-run", *flags, *run], tmp_path), needle)


def test_job_flags_work_before_and_after_the_command(tmp_path):
    """--dry-run, --sbatch and --container* on either side of `data|sweep|eval` (as the
    README and --help write them): the same jobs; --sbatch given on both sides all reach
    sbatch, in command-line order; every command's --help lists them."""
    env = _fake_env(tmp_path)
    before = _submit(["--dry-run", "--sbatch=--account=abc", "data", TINY_DATA], tmp_path, env)
    after = _submit(["data", TINY_DATA, "--dry-run", "--sbatch=--account=abc"], tmp_path, env)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout and "sbatch --parsable --account=abc " in after.stdout
    assert not (tmp_path / "calls").exists()  # dry runs both
    sif = tmp_path / "mop.sif"
    sif.write_text("image")
    tiny, dense = (
        str(REPO / "configs/train/tiny_cpu.yaml"),
        str(REPO / "configs/model/tiny_dense.yaml"),
    )
    proc = _submit(
        ["--sbatch=--qos=low", "sweep", tiny, "--models", dense, "--sbatch=--account=abc"]
        + ["--container", str(sif), "--container-runtime", "apptainer", "max_steps=30"],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stderr
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert call.startswith("--parsable --qos=low --account=abc "), call
    assert "MOP_CONTAINER_RUNTIME=apptainer" in (tmp_path / "env.101").read_text()
    eval_after = _submit(["eval", str(tmp_path), "--dry-run", "--container", "img"], tmp_path)
    assert eval_after.returncode == 0 and "MOP_CONTAINER_IMAGE=img" in eval_after.stdout
    for command in ("data", "sweep", "eval"):
        text = _submit([command, "--help"], tmp_path).stdout
        assert "options for every job (before or after the command)" in text, command
        assert all(f in text for f in ("--dry-run", "--sbatch", "--container-mounts")), command


def test_sweep_refuses_a_non_causal_model_by_file_before_submitting(tmp_path):
    """A glob over configs/model/synth12_* also matches the Soft MoE (non-causal, refused by
    pretrain): the sweep names that file and queues nothing; the README's two globs pass."""
    env = _fake_env(tmp_path)
    soft = str(REPO / "configs/model/synth12_softmoe_d256_e8.yaml")
    recipe = [str(REPO / "configs/train/synthetic.yaml")]
    over = ["model.vocab_size=64", "data.data_dir=data/phonebook_1e5"]
    dense = str(REPO / "configs/model/synth12_dense_d256.yaml")
    proc = _submit(["sweep", *recipe, "--models", dense, soft, *over], tmp_path, env)
    _one_error_line(proc, f"--models {soft}:", "model.causal=false")
    assert not (tmp_path / "calls").exists()
    models = sorted(str(p) for p in (REPO / "configs/model").glob("synth12_dense_*.yaml"))
    models += sorted(str(p) for p in (REPO / "configs/model").glob("synth12_moe_*.yaml"))
    proc = _submit(["--dry-run", "sweep", *recipe, "--models", *models, *over], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("train.sbatch") == len(models) >= 5
