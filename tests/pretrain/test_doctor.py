"""`python -m pretrain.doctor`: everything a CPU machine can show. A healthy tiny config passes
(megablocks missing is a warning here); a GPU layout without GPUs, a full disk, an unwritable
run directory, a broken data directory and a wrong parallel layout each fail with a fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mop.config import load_config
from pretrain import doctor, doctor_env, doctor_job
from pretrain.config import TrainConfig
from pretrain.doctor import main
from pretrain.doctor_job import checkpoint_bytes
from tests.pretrain.conftest import REPO, VOCAB, subprocess_env

TINY = str(REPO / "configs/train/tiny_cpu.yaml")


@pytest.fixture(autouse=True)
def cpu_job_env(monkeypatch):
    """No launcher or SLURM variables from the machine running the tests."""
    for key in (
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "RANK",
        "SLURM_NTASKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_TASKS_PER_NODE",
        *doctor_job.SLURM_GPU_VARS,
        "WANDB_API_KEY",
    ):
        monkeypatch.delenv(key, raising=False)


def over(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    o = {"data.data_dir": data_dir, "run_dir": run_dir, "model.vocab_size": VOCAB, **extra}
    return [f"{k}={v}" for k, v in o.items()]


def doctor_rows(out: str) -> dict[str, tuple[str, str]]:
    """{check: (status, detail)} from the printed table."""
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in ("ok", "warn", "fail", "skip"):
            rows[parts[0]] = (parts[1], parts[2])
    # two-word names
    for line in out.splitlines():
        for name in ("run dir", "checkpoint dir"):
            if line.startswith(name + " "):
                status, detail = line[len(name) :].split(None, 1)
                rows[name] = (status, detail)
    return rows


def run_doctor(capsys, *args: str) -> tuple[int, dict, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, doctor_rows(cap.out), cap.out, cap.err


def test_healthy_cpu_config_passes(data_dir, tmp_path, capsys):
    code, rows, out, err = run_doctor(
        capsys, "--config", TINY, *over(data_dir, tmp_path / "run"), "--fast"
    )
    assert code == 0, out + err
    for name in ("python", "torch", "deepspeed", "layout", "gpus", "disk", "run dir", "data"):
        assert rows[name][0] == "ok", (name, out)
    # GPU-only kernels are a warning on a CPU machine, not an error
    assert rows["megablocks"][0] == "warn" and "GPU only" in rows["megablocks"][1]
    assert rows["grouped_gemm"][0] == "warn"
    assert rows["layout"][1].startswith("world 1 (dp 1, tp 1, ep 1)")
    assert "sizes checked" in rows["data"][1] and "5 shard(s)" in rows["data"][1]
    assert rows["tokenizer"][0] == "warn"  # the test data directory has no tokenizer files
    assert rows["wandb"][0] == "ok" and "offline" in rows["wandb"][1]
    assert out.rstrip().endswith("doctor: no problems found") and err == ""


def test_environment_only_without_config(capsys):
    code, rows, out, _ = run_doctor(capsys)
    assert code == 0
    assert {"python", "torch", "cuda", "nccl", "deepspeed", "megablocks", "grouped_gemm"} <= set(
        rows
    )
    assert "matmul ok on cpu" in rows["torch"][1]
    assert rows["deepspeed"][0] == "ok"
    assert rows["deepspeed"][1].endswith("accelerator cpu; shm comm op ok")  # loaded for real
    # the optimizer training uses on CPU, stepped for real
    assert rows["optimizer"] == ("ok", "torch AdamW fused step ok on cpu")
    assert "layout" not in rows


def test_gpu_layout_without_gpus_fails(data_dir, tmp_path, capsys, monkeypatch):
    # what an 8-GPU sbatch allocation looks like from inside the job
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    code, rows, out, err = run_doctor(
        capsys, "--config", TINY, *over(data_dir, tmp_path / "run"), "--fast"
    )
    assert code == doctor.FAIL_EXIT_CODE
    assert rows["gpus"] == (
        "fail",
        "0 GPU(s) visible, the layout needs 8 on this node (one per process)",
    )
    assert rows["layout"][1].startswith("world 16 (dp 16")
    assert "fix: gpus: request --gpus-per-node=8 with --ntasks-per-node=8" in out
    assert err.strip() == "error: doctor found 1 problem(s): gpus"


def test_megablocks_config_on_cpu_fails_with_the_install_step(data_dir, tmp_path, capsys):
    code, rows, out, _ = run_doctor(
        capsys,
        "--config",
        TINY,
        *over(data_dir, tmp_path / "run", **{"model.moe.backend": "megablocks"}),
        "--fast",
    )
    assert code == doctor.FAIL_EXIT_CODE
    assert rows["megablocks"][0] == "fail" and "moe.backend=megablocks" in rows["megablocks"][1]
    assert rows["gpus"][0] == "fail"  # megablocks needs a GPU
    assert "fix: megablocks: on a GPU machine: pip install" in out


def test_layout_that_does_not_divide_fails(data_dir, tmp_path, capsys):
    code, rows, out, _ = run_doctor(
        capsys,
        "--config",
        TINY,
        *over(data_dir, tmp_path / "run", **{"parallel.tensor_parallel": 3}),
        "--world-size",
        "4",
        "--fast",
    )
    assert code == doctor.FAIL_EXIT_CODE
    assert rows["layout"][0] == "fail" and "tensor_parallel=3" in rows["layout"][1]


def test_full_disk_fails(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor_job, "disk_free", lambda path: 1_000_000)
    code, rows, out, _ = run_doctor(
        capsys, "--config", TINY, *over(data_dir, tmp_path / "run"), "--fast"
    )
    assert code == doctor.FAIL_EXIT_CODE
    assert rows["disk"][0] == "fail" and rows["disk"][1].startswith("1.0 MB free at")
    assert "lower checkpoint.keep_last" in out


def test_unwritable_run_dir_fails(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, rows, out, _ = run_doctor(
        capsys, "--config", TINY, *over(data_dir, blocker / "run"), "--fast"
    )
    assert code == doctor.FAIL_EXIT_CODE
    assert rows["run dir"][0] == "fail" and "is a file, not a directory" in rows["run dir"][1]
    assert "fix: run dir: choose another run_dir" in out


@pytest.fixture()
def data_copy(data_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(data_dir, dst)
    return dst


def _first_shard(data: Path) -> Path:
    manifest = json.loads((data / "manifest.json").read_text())
    return data / (manifest["shards"][0]["path"] + ".bin")


def test_bad_manifest_fails(data_copy, tmp_path, capsys):
    (data_copy / "manifest.json").write_text('{"format": "something else"}')
    code, rows, out, _ = run_doctor(
        capsys, "--config", TINY, *over(data_copy, tmp_path / "run"), "--fast"
    )
    assert code == doctor.FAIL_EXIT_CODE
    assert rows["data"][0] == "fail" and "has format 'something else'" in rows["data"][1]


def test_truncated_shard_fails_fast(data_copy, tmp_path, capsys):
    shard = _first_shard(data_copy)
    shard.write_bytes(shard.read_bytes()[:-2])
    code, rows, out, _ = run_doctor(
        capsys, "--config", TINY, *over(data_copy, tmp_path / "run"), "--fast"
    )
    assert code == doctor.FAIL_EXIT_CODE
    # the shard format's own check names the shard and says it was cut short
    assert rows["data"][0] == "fail" and "truncated" in rows["data"][1]
    assert "u00000-0000" in rows["data"][1]
    assert "fix: data: re-run `python -m data_prep tokenize`" in out


def test_flipped_byte_needs_the_full_check(data_copy, tmp_path, capsys):
    shard = _first_shard(data_copy)
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    args = ("--config", TINY, *over(data_copy, tmp_path / "run"))
    assert run_doctor(capsys, *args, "--fast")[0] == 0  # same size: fast mode cannot see it
    code, rows, _, _ = run_doctor(capsys, *args)
    assert code == doctor.FAIL_EXIT_CODE and "is corrupted: sha256" in rows["data"][1]


def test_vocab_too_small_fails(data_dir, tmp_path, capsys):
    code, rows, _, _ = run_doctor(
        capsys, "--config", TINY, *over(data_dir, tmp_path / "run", **{"model.vocab_size": 64})
    )
    assert code == doctor.FAIL_EXIT_CODE and "model.vocab_size=512" in rows["data"][1]


def test_wandb_online_without_key_is_a_warning(data_dir, tmp_path, capsys):
    code, rows, out, _ = run_doctor(
        capsys,
        "--config",
        TINY,
        *over(data_dir, tmp_path / "run", **{"logging.wandb_mode": "online"}),
        "--fast",
    )
    assert code == 0
    assert rows["wandb"][0] == "warn" and "WANDB_API_KEY is not set" in rows["wandb"][1]
    assert "hint: wandb: export WANDB_API_KEY" in out


def test_checkpoint_estimate_follows_precision_and_zero_stage(data_dir, tmp_path):
    cfg = load_config(TrainConfig, TINY, over(data_dir, tmp_path))
    # ZeRO 1/2 saves masters and moments only, whatever the precision
    assert checkpoint_bytes(cfg, "fp32") == checkpoint_bytes(cfg, "bf16")
    zero0 = cfg.model_copy(update={"zero_stage": 0})
    zero3 = cfg.model_copy(update={"zero_stage": 3})  # DeepSpeed's files: module weights too
    fp32_zero0 = checkpoint_bytes(zero0, "fp32")
    assert fp32_zero0 < checkpoint_bytes(zero3, "bf16") < checkpoint_bytes(zero3, "fp32")
    assert checkpoint_bytes(cfg, "fp32") == fp32_zero0  # 12, 14 and 16 bytes per parameter


def test_entry_point_exit_code_and_one_error_line(tmp_path):
    """As slurm/train.sbatch runs it: a problem stops with exit 1 (not the requeue code)."""
    cmd = [sys.executable, "-m", "pretrain.doctor", "--fast", "--config", TINY]
    res = subprocess.run(
        [*cmd, f"data.data_dir={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == doctor.FAIL_EXIT_CODE, res.stdout + res.stderr
    assert res.stderr.strip() == "error: doctor found 1 problem(s): data"
    assert f"data.data_dir not found: {tmp_path / 'nowhere'}" in res.stdout
    assert "Traceback" not in res.stderr


def test_train_sbatch_stops_before_srun_on_a_problem(tmp_path):
    """slurm/train.sbatch runs the doctor first: with a missing data directory the job ends
    with exit 1 (not 75: no requeue) and srun is never called. scontrol/srun are stubs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path / 'srun_called'}\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = subprocess_env(
        PATH=f"{bin_dir}:{subprocess_env()['PATH']}",
        PY=sys.executable,
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_NTASKS="16",  # the job's layout, passed to the doctor as flags
        SLURM_NTASKS_PER_NODE="8(x2)",
    )
    res = subprocess.run(
        ["bash", str(REPO / "slurm/train.sbatch"), TINY, f"data.data_dir={tmp_path / 'none'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[train.sbatch] pretrain.doctor found a problem (see above): not starting" in res.stdout
    assert "data          fail" in res.stdout
    assert "world 16 (dp 16, tp 1, ep 1), 8 per node" in res.stdout
    assert not (tmp_path / "srun_called").exists()


def test_slurm_gpu_variables():
    assert doctor.slurm_gpus({}) == 0
    assert doctor.slurm_gpus({"SLURM_GPUS_PER_NODE": "0"}) == 0  # --gpus-per-node=0: a CPU job
    assert doctor.slurm_gpus({"SLURM_GPUS_PER_NODE": "h100:8"}) == 8
    assert doctor.slurm_gpus({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert doctor.slurm_gpus({"SLURM_JOB_GPUS": "0"}) == 1  # GPU index 0, not zero GPUs
    assert doctor.slurm_gpus({"SLURM_STEP_GPUS": "0,1,2"}) == 3


def test_cpu_slurm_job_with_zero_gpus_passes(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "0")
    code, rows, out, _ = run_doctor(
        capsys, "--config", TINY, *over(data_dir, tmp_path / "run"), "--fast"
    )
    assert code == 0, out
    assert rows["gpus"][0] == "ok" and rows["layout"][1].startswith("world 2 (dp 2")


def _fake_save(ckpt_dir: Path, step: int) -> Path:
    """A save as pretrain.checkpoint leaves it: files, their integrity record, the pointer."""
    from pretrain.checkpoint import POINTER, tag_of
    from pretrain.checkpoint_record import record_all

    tag_dir = ckpt_dir / tag_of(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
    record_all(tag_dir)
    (ckpt_dir / POINTER).write_text(tag_of(step) + "\n")
    return tag_dir


def test_resume_point_is_checked(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ("--config", TINY, *over(data_dir, run))
    code, rows, out, _ = run_doctor(capsys, *args, "--fast")
    assert rows["resume"] == ("ok", f"fresh start (no checkpoint pointer in {run / 'checkpoints'})")
    tag_dir = _fake_save(run / "checkpoints", 30)
    code, rows, out, _ = run_doctor(capsys, *args)
    assert (
        code == 0 and rows["resume"][1] == "resumes from step_00000030 (sizes and CRC-32 checked)"
    )
    weights = tag_dir / "mp_rank_00_model_states.pt"
    weights.write_bytes(b"WEIGHTS" * 100)  # same size, other bytes
    assert run_doctor(capsys, *args, "--fast")[1]["resume"][0] == "ok"  # sizes only
    code, rows, out, _ = run_doctor(capsys, *args)
    assert code == 0  # the trainer falls back to an older save by itself: a warning
    assert rows["resume"][0] == "warn" and "checksum mismatch" in rows["resume"][1]
    assert f"hint: resume: restore {tag_dir} from a copy" in out


def test_a_deepspeed_op_that_cannot_build_fails(capsys, monkeypatch):
    def no_compiler():
        raise RuntimeError("Error building extension 'deepspeed_shm_comm'")

    monkeypatch.setattr(doctor_env, "_deepspeed_op", no_compiler)
    code, rows, out, err = run_doctor(capsys)
    assert code == doctor.FAIL_EXIT_CODE
    assert (
        rows["deepspeed"][0] == "fail"
        and "shm comm op failed: RuntimeError" in rows["deepspeed"][1]
    )
    assert "fix: deepspeed: DeepSpeed JIT-builds its ops on first use" in out
    assert err.strip() == "error: doctor found 1 problem(s): deepspeed"


def test_gpu_optimizer_check_steps_torch_fused_adamw(monkeypatch):
    # On GPU the doctor steps the optimizer training builds (torch's fused AdamW), and builds
    # no DeepSpeed op for it (DeepSpeed's FusedAdam is no longer what training runs).
    stepped = []
    monkeypatch.setattr(
        doctor_env, "_adamw_step", lambda device, kernel: stepped.append((device, kernel))
    )
    check = doctor.check_optimizer(cuda=True, fast=False)
    assert stepped == [("cuda", {"fused": True})]
    assert (check.status, check.detail) == ("ok", "torch AdamW fused step ok on cuda")
    monkeypatch.setattr(doctor_env, "_deepspeed_op", lambda: stepped.append("ds op"))
    assert doctor.check_deepspeed(cuda=True, fast=False).status == "ok"
    assert stepped == [("cuda", {"fused": True})]
    assert doctor.check_optimizer(cuda=True, fast=True).status == "ok"  # --fast: no step
    assert len(stepped) == 1


def test_an_optimizer_step_that_fails_is_reported(capsys, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors")

    monkeypatch.setattr(torch.optim, "AdamW", no_kernel)
    code, rows, out, err = run_doctor(capsys)
    assert code == doctor.FAIL_EXIT_CODE
    assert rows["optimizer"][0] == "fail"
    assert "torch AdamW fused step on cpu failed: RuntimeError" in rows["optimizer"][1]
    assert "fix: optimizer: install a torch build whose AdamW has this kernel" in out
    assert err.strip() == "error: doctor found 1 problem(s): optimizer"


def test_imported_megatron_data_passes_the_fast_data_check(tmp_path, capsys):
    """An import-megatron directory: its .bin also holds the held-out tail and Megatron's
    int32 where our tokenizer would write uint16, so the size check must read the index
    (train.sbatch runs `doctor --fast` before every training job)."""
    import numpy as np

    from data_prep import megatron_import
    from tests.data_prep.test_megatron_format import _tokenizer, megatron_write, random_docs

    tok_path, vocab, eos = _tokenizer(tmp_path)
    docs = random_docs(np.random.default_rng(5), 200, vocab, eos)
    megatron_write(tmp_path / "c_text_document", docs, np.int32)
    out = tmp_path / "imported"
    megatron_import.import_megatron(
        [str(tmp_path / "c_text_document")], str(tok_path), str(out), validation_sequences=2,
        validation_seq_len=16,
    )  # fmt: skip
    extra = {"model.vocab_size": vocab, "data.seq_len": 16}
    code, rows, out_text, err = run_doctor(
        capsys, "--config", TINY, *over(out, tmp_path / "run", **extra), "--fast"
    )
    assert rows["data"][0] == "ok", out_text + err
    shard = out / megatron_import_first_shard(out)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])  # and a .bin cut into its training part is caught
    code, rows, out_text, _ = run_doctor(
        capsys, "--config", TINY, *over(out, tmp_path / "run2", **extra), "--fast"
    )
    assert code == doctor.FAIL_EXIT_CODE and rows["data"][0] == "fail", out_text


def megatron_import_first_shard(data: Path) -> str:
    manifest = json.loads((data / "manifest.json").read_text())
    return manifest["shards"][0]["path"] + ".bin"
