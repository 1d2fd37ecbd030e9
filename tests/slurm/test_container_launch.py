"""Every sbatch job starts Python through slurm/launch.sh: natively, under pyxis
(`srun --container-image ...`) or under Apptainer (`apptainer exec --nv IMAGE`). Each script
is run here with bash, as SLURM would, with stand-ins for srun, apptainer and scontrol that
record their arguments and the environment they were given."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A stand-in records one line per call: its name and arguments, then the NCCL variables.
STANDIN = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STANDIN_LOG"
echo "env TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-} NCCL_DEBUG=${NCCL_DEBUG:-}" >> "$STANDIN_LOG"
"""
SCONTROL = """#!/usr/bin/env bash
echo localhost
"""


def _standins(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", STANDIN), ("apptainer", STANDIN), ("fakepy", STANDIN)]:
        (bin_dir / name).write_text(text)
    (bin_dir / "scontrol").write_text(SCONTROL)
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_job(tmp_path: Path, script: str, args: list[str], **env_extra: str) -> list[str]:
    """Run slurm/SCRIPT as a job submitted from `tmp_path/work`; the stand-ins' log."""
    bin_dir = tmp_path / "bin" if (tmp_path / "bin").is_dir() else _standins(tmp_path)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MOP_"))}
    env.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        STANDIN_LOG=str(log),
        SLURM_SUBMIT_DIR=str(work),
        SLURM_JOB_ID="7",
        MOP_SLURM_DIR=str(REPO / "slurm"),
        PY=str(bin_dir / "fakepy"),
        **env_extra,
    )
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / script), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines()


JOBS = [
    ("data_prep_tokenizer.sbatch", ["c.yaml", "a=1"], "-m data_prep tokenizer --config c.yaml a=1"),
    (
        "data_prep_tokenize.sbatch",
        ["c.yaml"],
        "-m data_prep tokenize --config c.yaml --no-merge workers=1",
    ),
    ("data_prep_merge.sbatch", ["c.yaml"], "-m data_prep merge --config c.yaml"),
    ("eval.sbatch", ["runs/a"], "-m eval --checkpoint runs/a --suite all"),
    ("train.sbatch", ["t.yaml", "max_steps=3"], "-m pretrain --config t.yaml max_steps=3"),
    ("grid.sbatch", ["g.yaml", "report"], "-m slurm.grid g.yaml --stage report"),
]


def _expected(mode: str, work: Path, tail: str, srun: str = "") -> str:
    """The launch line of one job step: `srun` options only for the trainer."""
    if mode == "native":
        return f"{srun}{work.parent}/bin/fakepy {tail}" if srun else f"fakepy {tail}"
    if mode == "pyxis":  # pyxis lives in srun: every step is an srun with the container flags
        return (
            f"{srun or 'srun --ntasks=1 '}--container-image=/img/mop.sqsh "
            f"--container-mounts={work}:{work},/data:/data:ro --container-workdir={work} "
            f"python {tail}"
        )
    return f"{srun}apptainer exec --nv --bind {work} --pwd {work} /img/mop.sif python {tail}"


MODES = {
    "native": {},
    "pyxis": {"MOP_CONTAINER_IMAGE": "/img/mop.sqsh", "MOP_CONTAINER_MOUNTS": "/data:/data:ro"},
    "apptainer": {"MOP_CONTAINER_IMAGE": "/img/mop.sif", "MOP_CONTAINER_RUNTIME": "apptainer"},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("script,args,tail", JOBS, ids=[j[0] for j in JOBS])
def test_each_job_runs_in_the_container_it_is_given(tmp_path, script, args, tail, mode):
    work = tmp_path / "work"
    lines = _run_job(tmp_path, script, args, **MODES[mode])
    calls = lines[::2]  # each call is followed by its environment line
    if script != "train.sbatch":
        assert calls == [_expected(mode, work, tail)]
        return
    # the trainer: pretrain.doctor first, as one process (told the job's layout: inside a
    # one-task step SLURM_NTASKS is the step's), then one srun task per GPU
    doctor = tail.replace("-m pretrain ", "-m pretrain.doctor --fast --world-size 1 ")
    assert calls == [
        _expected(mode, work, doctor),
        _expected(mode, work, tail, srun="srun --kill-on-bad-exit=1 "),
    ]


def test_native_python_is_the_jobs_py(tmp_path):
    (line, _) = _run_job(tmp_path, "data_prep_merge.sbatch", ["c.yaml"])
    assert line == "fakepy -m data_prep merge --config c.yaml"
    line = _run_job(tmp_path, "train.sbatch", ["t.yaml"])[2]
    assert line == f"srun --kill-on-bad-exit=1 {tmp_path}/bin/fakepy -m pretrain --config t.yaml"


def test_training_job_sets_the_distributed_defaults(tmp_path):
    env = _run_job(tmp_path, "train.sbatch", ["t.yaml"], MOP_CONTAINER_IMAGE="img")[3]
    assert env == "env TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=WARN"
    # a value the user exported wins
    env = _run_job(tmp_path, "train.sbatch", ["t.yaml"], NCCL_DEBUG="INFO")[3]
    assert env == "env TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=INFO"


def test_multi_gpu_eval_runs_torchrun_in_the_container(tmp_path):
    (line, _) = _run_job(
        tmp_path,
        "eval.sbatch",
        ["runs/a", "--suite", "ppl"],
        SLURM_GPUS_ON_NODE="4",
        MOP_CONTAINER_IMAGE="/img/mop.sif",
        MOP_CONTAINER_RUNTIME="apptainer",
    )
    assert line.endswith(
        "/img/mop.sif python -m torch.distributed.run --standalone --nproc_per_node=4 "
        "-m eval --checkpoint runs/a --suite ppl"
    )


def test_unknown_runtime_and_missing_launch_script_are_one_line_errors(tmp_path):
    _standins(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOP_"))}
    for extra, needle in [
        ({"MOP_CONTAINER_IMAGE": "i", "MOP_CONTAINER_RUNTIME": "docker"}, "use pyxis or apptainer"),
        ({"MOP_SLURM_DIR": str(tmp_path / "nowhere")}, "no slurm/launch.sh"),
    ]:
        env = {
            "MOP_SLURM_DIR": str(REPO / "slurm"),
            **base,
            "PATH": f"{tmp_path / 'bin'}:{base['PATH']}",
            "STANDIN_LOG": str(tmp_path / "log"),
            **extra,
        }
        proc = subprocess.run(
            ["bash", str(REPO / "slurm/data_prep_merge.sbatch"), "c.yaml"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert not (tmp_path / "log").exists()  # nothing was started


def test_process_group_timeout_comes_from_the_config(monkeypatch):
    """parallel.timeout_minutes reaches deepspeed.init_distributed (what NCCL's async error
    handling waits for before it aborts a hung collective)."""
    import sys
    import types
    from datetime import timedelta

    from mop.config import load_config
    from pretrain.config import TrainConfig
    from pretrain.launch import DistEnv, init_distributed

    seen = {}
    fake = types.SimpleNamespace(init_distributed=lambda **kw: seen.update(kw))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    cfg = load_config(
        TrainConfig, REPO / "configs/train/tiny_cpu.yaml", ["parallel.timeout_minutes=45"]
    )
    init_distributed(DistEnv(0, 1, 0), cuda=False, timeout_minutes=cfg.parallel.timeout_minutes)
    assert seen["timeout"] == timedelta(minutes=45) and seen["dist_backend"] == "gloo"
    assert (
        load_config(TrainConfig, REPO / "configs/train/tiny_cpu.yaml").parallel.timeout_minutes
        == 10
    )


def _checkout_copy(tmp_path: Path, with_venv: bool) -> Path:
    """A checkout elsewhere: slurm/ copied, and a stand-in .venv/bin/python that says so."""
    checkout = tmp_path / "checkout"
    (checkout / "slurm").mkdir(parents=True)
    for f in (REPO / "slurm").glob("*.s[bh]*"):
        (checkout / "slurm" / f.name).write_text(f.read_text())
    if with_venv:
        py = checkout / ".venv/bin/python"
        py.parent.mkdir(parents=True)
        py.write_text('#!/usr/bin/env bash\necho "checkout-venv-python $*" >> "$STANDIN_LOG"\n')
        py.chmod(0o755)
    return checkout


@pytest.mark.parametrize("how", ["sbatch", "bash"])
def test_jobs_find_launch_sh_and_python_from_the_script_not_the_working_directory(tmp_path, how):
    """`sbatch /elsewhere/slurm/X.sbatch` from any directory, no MOP_SLURM_DIR, no PY: SLURM
    runs a copy of the script from its spool directory, so the job reads the path sbatch was
    given (relative to the submit directory) from `scontrol show job`; run by bash, from $0.
    Python is then the checkout's .venv, else `python` on PATH."""
    bin_dir = _standins(tmp_path)
    checkout = _checkout_copy(tmp_path, with_venv=True)
    work = tmp_path / "work"
    work.mkdir()
    given = os.path.relpath(checkout / "slurm/data_prep_merge.sbatch", work)
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$1 $2 $3" = "show job 7" ]; then\n'
        f'  echo "   Command={given} c.yaml"; echo "   WorkDir={work}"\nelse echo localhost; fi\n'
    )
    script = checkout / "slurm/data_prep_merge.sbatch"
    if how == "sbatch":  # slurmd's copy, far from the checkout
        spool = tmp_path / "spool/job00007"
        spool.mkdir(parents=True)
        script = spool / "slurm_script"
        script.write_text((checkout / "slurm/data_prep_merge.sbatch").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOP_"))}
    env.pop("PY", None)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STANDIN_LOG=str(tmp_path / "calls.log"))
    if how == "sbatch":
        env.update(SLURM_SUBMIT_DIR=str(work), SLURM_JOB_ID="7")
    proc = subprocess.run(
        ["bash", str(script), "c.yaml"], env=env, cwd=work, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["checkout-venv-python -m data_prep merge --config c.yaml"], calls

    # no .venv in that checkout: the `python` on PATH (an activated environment)
    (checkout / ".venv/bin/python").unlink()
    (bin_dir / "python").write_text(
        '#!/usr/bin/env bash\necho "path-python $*" >> "$STANDIN_LOG"\n'
    )
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "calls.log").unlink()
    proc = subprocess.run(
        ["bash", str(script), "c.yaml"], env=env, cwd=work, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "calls.log").read_text().splitlines()[0].startswith("path-python -m")
