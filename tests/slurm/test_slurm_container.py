"""Real SLURM on localhost: `slurm.submit --container` sweeps whose training jobs start
through pyxis (`srun --container-image ...`) and Apptainer (`apptainer exec --nv IMAGE`).

Neither runtime exists here, so stand-ins on PATH record the arguments they were given and
then run the command natively (the image itself is built and run for real in
tests/docker/test_image.py). The jobs are real: sbatch, the afterok-free sweep, srun, the
trainer, the log directory that slurm.submit creates. Same skip rule as
tests/slurm/test_slurm_requeue.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from tests.pretrain.conftest import REPO, make_data_dir, train_overrides
from tests.slurm.test_slurm_requeue import _job_state, _slurm_up, _wait, pytestmark  # noqa: F401

# apptainer exec [--nv] [--bind B] [--pwd D] IMAGE CMD...: record, then run CMD in D with
# `python` meaning the job's $PY.
APPTAINER = r"""#!/usr/bin/env bash
echo "apptainer $*" >> "$STANDIN_LOG"
echo "env TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-} NCCL_DEBUG=${NCCL_DEBUG:-}" >> "$STANDIN_LOG"
[ "$1" = exec ] || exit 90; shift
pwd_=.
while [ $# -gt 0 ]; do
  case $1 in
    --nv) shift ;;
    --bind) shift 2 ;;
    --pwd) pwd_=$2; shift 2 ;;
    -*) exit 91 ;;
    *) break ;;
  esac
done
shift  # the image
[ "$1" = python ] || exit 92; shift
cd "$pwd_" && exec "$PY" "$@"
"""
# srun with pyxis's flags: record, drop them, run the real srun with `python` as $PY
# (without those flags, e.g. srun ... apptainer exec ..., it only records).
SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$STANDIN_LOG"
args=() pyxis=0
for a in "$@"; do
  case $a in
    --container-*) pyxis=1 ;;
    python) if [ $pyxis = 1 ]; then args+=("$PY"); else args+=(python); fi ;;
    *) args+=("$a") ;;
  esac
done
exec REAL_SRUN "${args[@]}"
"""


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sweep_jobs_run_through_pyxis_and_apptainer(tmp_path):
    assert _slurm_up(), "MOP_REQUIRE_SLURM=1 but no SLURM cluster answers"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(APPTAINER)
    (bin_dir / "srun").write_text(SRUN.replace("REAL_SRUN", shutil.which("srun")))
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    data = make_data_dir(tmp_path / "data")
    sif = tmp_path / "mop.sif"
    sif.write_text("a stand-in image")
    work = tmp_path / "work"
    work.mkdir()
    overrides = [
        o
        for o in train_overrides(data, Path("unused"), max_steps=6, **{"eval.interval": 0})
        if not o.startswith("run_dir=")
    ]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PY": str(REPO / ".venv/bin/python"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "STANDIN_LOG": str(tmp_path / "standin.log"),
    }
    env = {k: v for k, v in env.items() if not k.startswith(("NCCL_", "TORCH_NCCL_"))}
    sbatch = ["--sbatch=--gpus-per-node=0", "--sbatch=--ntasks-per-node=1"]
    sbatch += ["--sbatch=--cpus-per-task=1", "--sbatch=--time=30"]  # USR1 comes at limit-5min
    runs = {
        "apptainer": [
            "--container",
            str(sif),
            "--container-runtime",
            "apptainer",
            "--container-mounts",
            f"{data}:{data}",
        ],
        "pyxis": ["--container", "/images/mop.sqsh"],
    }
    jobs = {}
    for runtime, flags in runs.items():
        proc = subprocess.run(
            [sys.executable, "-m", "slurm.submit", *sbatch, *flags, "sweep"]
            + [str(REPO / "configs/train/tiny_cpu.yaml"), "--models"]
            + [str(REPO / "configs/model/tiny_moe.yaml"), "--runs-dir", f"runs/{runtime}"]
            + overrides,
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        jobs[runtime] = proc.stdout.split()[1].rstrip(":")  # "submitted JOB: sbatch ..."
    try:
        for runtime, job in jobs.items():
            _wait(lambda job=job: _job_state(job)[0] == "GONE" or None, 600, f"{runtime} job")
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    calls = (tmp_path / "standin.log").read_text()
    for runtime, job in jobs.items():
        log = (work / "logs" / f"train-tiny_moe-{job}.out").read_text()  # logs/ made by submit
        assert f"[launch] in container ({runtime})" in log, log[-3000:]
        steps = [m["step"] for m in _metrics(work / "runs" / runtime / "tiny_moe") if "loss" in m]
        assert steps == list(range(1, 7)), log[-3000:]
    tail = "python -m pretrain --config " + str(REPO / "configs/train/tiny_cpu.yaml")
    assert f"apptainer exec --nv --bind {work},{data}:{data} --pwd {work} {sif} {tail}" in calls, (
        calls
    )
    assert (
        "srun --kill-on-bad-exit=1 --container-image=/images/mop.sqsh "
        f"--container-mounts={work}:{work} --container-workdir={work} {tail}" in calls
    ), calls
    # the training job's distributed defaults reached the container (pretrain.doctor's and
    # the trainer's apptainer exec)
    envs = [line for line in calls.splitlines() if line.startswith("env ")]
    assert envs == ["env TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=WARN"] * 2, envs
