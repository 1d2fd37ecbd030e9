"""Damaged checkpoints are detected before anything is loaded, moved aside (never deleted), and
training resumes from the newest intact save; with none left, one `error:` line and exit 66.
Eval and export refuse a damaged save in one line. Faults come from fault_wrapper.py."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mop.errors import DamagedStateError, DataError
from pretrain import checkpoint_record as record
from pretrain.checkpoint import (
    POINTER,
    check_save,
    list_tags,
    move_aside,
    prune,
    read_pointer,
    step_of,
    tag_of,
)
from tests.pretrain.conftest import REPO, run_trainer, subprocess_env, train_overrides
from tests.pretrain.runs import metrics, run_pretrain

# A ZeRO 1/2 save (format 2): rank r's torch.distributed.checkpoint file holds its share of
# the masters and Adam moments; state.pt the client state (pretrain/checkpoint_dcp.py).
MODEL = "dcp/__0_0.distcp"
OPTIM = "dcp/__{}_0.distcp"
DAMAGED_EXIT = DamagedStateError.exit_code


def overrides(data_dir: Path, run_dir: Path) -> list[str]:
    # saves at steps 3 and 6 (keep_last 2)
    return train_overrides(data_dir, run_dir, max_steps=6, **{"eval.interval": 0})


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in metrics(run_dir).items() if "loss" in r}


def check_ok(res, code: int = 0) -> None:
    assert res.returncode == code, (
        f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    )


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def lines_with(text: str, needle: str) -> list[str]:
    return [ln for ln in text.splitlines() if needle in ln]


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base")
    check_ok(run_trainer(overrides(data_dir, run)))
    assert list_tags(run / "checkpoints") == [tag_of(3), tag_of(6)]
    return run


@pytest.fixture()
def run_copy(base, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


# The record itself --------------------------------------------------------------------------


def test_each_save_records_every_file_with_size_and_checksum(base):
    for tag in (tag_of(3), tag_of(6)):
        tag_dir = base / "checkpoints" / tag
        files = json.loads((tag_dir / record.RECORD).read_text())["files"]
        on_disk = {**record.saved_files(tag_dir), "dcp/.metadata": 0}  # DCP's hidden index
        assert set(files) == set(on_disk) >= {MODEL, "state.pt", "rng_rank0.pt", "layout.json"}
        for name, entry in files.items():
            assert entry["size"] == (tag_dir / name).stat().st_size
            assert entry["crc32"] == record.crc32_file(tag_dir / name)
        assert check_save(tag_dir) is True


def test_record_check_names_each_kind_of_damage(base, tmp_path):
    def damaged(how) -> str | None:
        tag_dir = tmp_path / "s"
        shutil.rmtree(tag_dir, ignore_errors=True)
        shutil.copytree(base / "checkpoints" / tag_of(6), tag_dir)
        how(tag_dir)
        return record.problem(tag_dir)

    assert damaged(lambda d: None) is None
    assert damaged(lambda d: (d / "rng_rank0.pt").unlink()) == "missing file rng_rank0.pt"
    size = (base / "checkpoints" / tag_of(6) / MODEL).stat().st_size
    cut = damaged(lambda d: (d / MODEL).write_bytes((d / MODEL).read_bytes()[:100]))
    assert cut == f"size mismatch in {MODEL}: 100 bytes, {size} recorded"
    flipped = damaged(lambda d: flip_byte(d / OPTIM.format(0)))
    assert flipped == f"checksum mismatch in {OPTIM.format(0)}"
    # a filter leaves files out of the checksums (sizes are still checked)
    tag_dir = tmp_path / "s"
    assert record.problem(tag_dir, checksum=lambda n: "distcp" not in n) is None
    assert damaged(lambda d: (d / record.RECORD).write_text("{not json")) == (
        f"its {record.RECORD} is unreadable"
    )


def test_shares_split_the_checksum_work_over_ranks():
    sizes = {"a": 100, "b": 90, "c": 10, "d": 5, "e": 1}
    parts = record.shares(sizes, 2)
    assert sorted(n for p in parts for n in p) == sorted(sizes)  # each file exactly once
    assert parts == [["a", "d"], ["b", "c", "e"]]  # about equal bytes (105 / 101)
    assert record.shares(sizes, 1) == [sorted(sizes, key=lambda n: -sizes[n])]


def test_tags_damaged_names_and_prune(tmp_path):
    for step in (3, 6, 9, 12):
        (tmp_path / tag_of(step)).mkdir()
    (tmp_path / POINTER).write_text(tag_of(9) + "\n")
    moved = move_aside(tmp_path / tag_of(6))
    assert moved.name == f"{tag_of(6)}.damaged-1"
    (tmp_path / tag_of(6)).mkdir()
    assert move_aside(tmp_path / tag_of(6)).name == f"{tag_of(6)}.damaged-2"
    assert list_tags(tmp_path) == [tag_of(3), tag_of(9), tag_of(12)]
    assert step_of(tag_of(123456789)) == 123456789
    prune(tmp_path, keep_last=1)  # 12 is newer than the pointer: half-written, removed
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        f"{tag_of(6)}.damaged-1",
        f"{tag_of(6)}.damaged-2",
        tag_of(9),
    ]


# Resume over a damaged save -----------------------------------------------------------------


@pytest.mark.parametrize(
    "damage,how",
    [
        (lambda d: (d / MODEL).write_bytes((d / MODEL).read_bytes()[:1000]), "size mismatch"),
        (lambda d: (d / "rng_rank0.pt").unlink(), "missing file rng_rank0.pt"),
        (lambda d: flip_byte(d / "state.pt"), "checksum mismatch in state.pt"),
    ],
    ids=["truncated", "deleted", "flipped-state-byte"],
)
def test_damaged_newest_save_is_moved_aside_and_training_resumes(
    base, run_copy, data_dir, damage, how
):
    ckpt = run_copy / "checkpoints"
    damage(ckpt / tag_of(6))
    before = record.problem(ckpt / tag_of(6))
    res = run_trainer(overrides(data_dir, run_copy))
    check_ok(res)
    said = lines_with(res.stderr, "damaged")
    assert len(said) == 1 and f"{ckpt / tag_of(6)} is damaged ({how}" in said[0], res.stderr
    assert f"moved aside to {tag_of(6)}.damaged-1" in said[0]
    assert f"resumed from {tag_of(3)}" in res.stdout
    # kept as it was found, not deleted; the retrained step 6 is a fresh, intact save
    assert record.problem(ckpt / f"{tag_of(6)}.damaged-1") == before
    assert read_pointer(ckpt) == tag_of(6) and check_save(ckpt / tag_of(6))
    assert losses(run_copy) == losses(base)  # steps 4..6 retrained exactly


@pytest.mark.parametrize(
    "pointer,how",
    [(tag_of(9) + "\n", f"names {tag_of(9)}, which does not exist"), ("\x00\x7fjunk", "holds")],
    ids=["missing-step", "garbage"],
)
def test_damaged_pointer_is_moved_aside_and_newest_intact_save_used(
    run_copy, data_dir, pointer, how
):
    ckpt = run_copy / "checkpoints"
    (ckpt / POINTER).write_text(pointer)
    res = run_trainer(overrides(data_dir, run_copy))
    check_ok(res)
    said = lines_with(res.stderr, "moved aside")
    assert len(said) == 1 and how in said[0] and "moved aside" in said[0], res.stderr
    assert (ckpt / f"{POINTER}.damaged-1").read_text() == pointer
    assert f"resumed from {tag_of(6)}" in res.stdout
    assert read_pointer(ckpt) == tag_of(6)


def test_no_intact_save_is_one_error_line_and_a_code_that_is_not_requeued(run_copy, data_dir):
    ckpt = run_copy / "checkpoints"
    flip_byte(ckpt / tag_of(6) / MODEL)
    (ckpt / tag_of(3) / "state.pt").unlink()
    res = run_trainer(overrides(data_dir, run_copy))
    check_ok(res, DAMAGED_EXIT)
    sbatch = (REPO / "slurm/train.sbatch").read_text()
    requeued = re.search(r"^REQUEUE_EXIT_CODE=(\d+)$", sbatch, re.M)
    assert requeued and int(requeued.group(1)) != DAMAGED_EXIT  # the job is not requeued
    errors = lines_with(res.stderr, "error:")
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert errors[0].startswith(f"error: no intact checkpoint in {ckpt}")
    assert tag_of(6) in errors[0] and tag_of(3) in errors[0]
    assert list_tags(ckpt) == []
    assert {p.name for p in ckpt.glob("step_*")} == {
        f"{tag_of(6)}.damaged-1",
        f"{tag_of(3)}.damaged-1",
    }
    # a requeue anyway (or a manual restart) fails the same way, and moves nothing else
    res = run_trainer(overrides(data_dir, run_copy))
    check_ok(res, DAMAGED_EXIT)
    assert len(lines_with(res.stderr, "error: no intact checkpoint")) == 1


def test_save_without_record_loads_as_before_with_a_note(run_copy, data_dir):
    ckpt = run_copy / "checkpoints"
    (ckpt / tag_of(6) / record.RECORD).unlink()
    res = run_trainer(overrides(data_dir, run_copy))
    check_ok(res)
    assert len(lines_with(res.stderr, f"note: checkpoint {ckpt / tag_of(6)} has no")) == 1
    assert f"resumed from {tag_of(6)}" in res.stdout


# A kill during a save -------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["files", "record", "merge", "pointer"])
def test_kill_during_save_resumes_previous_save(base, data_dir, tmp_path, phase):
    over = overrides(data_dir, tmp_path)
    env = {"MOP_TEST_KILL_IN_SAVE_STEP": "6", "MOP_TEST_KILL_IN_SAVE_AT": phase}
    res = run_trainer(over, env)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert read_pointer(ckpt) == tag_of(3)
    has_record = (ckpt / tag_of(6) / record.RECORD).is_file()
    assert has_record == (phase == "pointer")  # the record is the last thing before it
    res = run_trainer(over)
    check_ok(res)
    assert f"resumed from {tag_of(3)}" in res.stdout and "damaged" not in res.stderr
    assert read_pointer(ckpt) == tag_of(6) and check_save(ckpt / tag_of(6))
    assert losses(tmp_path) == losses(base)


# Two processes: one rank's files damaged ------------------------------------------------------


def test_damage_to_one_ranks_files_in_a_two_process_run(data_dir, tmp_path):
    over = overrides(data_dir, tmp_path)
    run_pretrain(over, nproc=2)
    ckpt = tmp_path / "checkpoints"
    reference = losses(tmp_path)
    files = json.loads((ckpt / tag_of(6) / record.RECORD).read_text())["files"]
    # every rank's files are in the one record
    assert {OPTIM.format(0), OPTIM.format(1), "rng_rank0.pt", "rng_rank1.pt"} <= set(files)
    flip_byte(ckpt / tag_of(6) / OPTIM.format(1))
    res = run_pretrain(over, nproc=2)
    said = lines_with(res.stderr, "damaged")
    assert len(said) == 1, res.stderr[-3000:]  # rank 0 reports it, once
    assert f"checksum mismatch in {OPTIM.format(1)}" in said[0]
    assert f"resumed from {tag_of(3)}" in res.stdout
    assert (ckpt / f"{tag_of(6)}.damaged-1").is_dir()
    assert losses(tmp_path) == reference


# Eval and export use the same check -----------------------------------------------------------


@pytest.mark.parametrize(
    "cmd", [["eval.export", "--out", "{out}"], ["eval", "--suite", "ppl"]], ids=["export", "eval"]
)
def test_eval_and_export_refuse_a_damaged_save_in_one_line(run_copy, tmp_path, cmd):
    flip_byte(run_copy / "checkpoints" / tag_of(6) / MODEL)
    out = tmp_path / "hf"
    args = [a.format(out=out) for a in cmd]
    res = subprocess.run(
        [sys.executable, "-m", args[0], "--checkpoint", str(run_copy), *args[1:]],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == DAMAGED_EXIT, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    expected = f"error: checkpoint {run_copy / 'checkpoints' / tag_of(6)} is damaged: checksum "
    assert len(lines) == 1 and lines[0].startswith(expected), res.stderr
    assert not out.exists()
    assert (run_copy / "checkpoints" / tag_of(6)).is_dir()  # eval only reads: nothing moved


def test_one_rank_killed_while_recording_in_a_two_process_run(data_dir, tmp_path):
    """Rank 1 dies after every file is written, before its share of the record: no record,
    the pointer stays on step 3, and the rerun resumes from there."""
    over = overrides(data_dir, tmp_path)
    env = {"MOP_TEST_KILL_IN_SAVE_STEP": "6", "MOP_TEST_KILL_IN_SAVE_AT": "record"}
    res = run_pretrain(over, nproc=2, check=False, env_extra={**env, "MOP_TEST_KILL_RANK": "1"})
    assert res.returncode != 0
    ckpt = tmp_path / "checkpoints"
    assert read_pointer(ckpt) == tag_of(3)
    assert not (ckpt / tag_of(6) / record.RECORD).exists()
    res = run_pretrain(over, nproc=2)
    assert f"resumed from {tag_of(3)}" in res.stdout and "damaged" not in res.stderr
    assert read_pointer(ckpt) == tag_of(6) and check_save(ckpt / tag_of(6))


# Two ranks, two directories (a node-local checkpoint.dir) -----------------------------------


def _separate_dirs_worker(rank: int, port: int, root: str) -> None:
    import contextlib
    import io
    import os

    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed

    from pretrain import checkpoint
    from pretrain.parallel import Mesh

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    engine.backward(engine(torch.randn(2, 8)).square().sum())
    engine.step()
    mesh = Mesh(world_size=2, rank=rank, dp=2, tp=1, ep=1)
    node_dir = Path(root) / f"node{rank}"  # each rank its own directory
    target = checkpoint.Target(engine, mesh, node_dir)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        checkpoint.save(target, 1, {"mop": {"step": 1}}, keep_last=2)
        checkpoint.wait(target)
    try:
        checkpoint.load(target)
        refused = None
    except DataError as exc:
        refused = str(exc)
    out = {"said": said.getvalue(), "refused": refused, "pointer": read_pointer(node_dir)}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))


def test_separate_directories_are_recorded_over_the_group_and_refused_at_resume(tmp_path):
    """Issue 23 item 8: each rank writes into its own directory. The record comes from the
    entries gathered over the process group (rank 0 never reads another rank's files), the
    save says in one line that the directory is not shared, and a resume refuses it in one
    line on every rank (no rank left waiting)."""
    import torch.multiprocessing as mp

    from pretrain.launch import free_port

    mp.start_processes(
        _separate_dirs_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    tag_dir = tmp_path / "node0" / tag_of(1)
    rec = json.loads((tag_dir / record.RECORD).read_text())
    assert rec["shared"] is False
    # rank 1's files are in the record, with the sizes and checksums rank 1 computed
    rank1_dir = tmp_path / "node1" / tag_of(1)
    for name in ("dcp/__1_0.distcp", "rng_rank1.pt"):
        assert rec["files"][name]["crc32"] == record.crc32_file(rank1_dir / name)
    assert {"dcp/__0_0.distcp", "dcp/.metadata", "state.pt", "rng_rank0.pt"} <= set(rec["files"])
    assert res[0]["pointer"] == tag_of(1)
    warned = [ln for ln in res[0]["said"].splitlines() if "not shared" in ln]
    assert len(warned) == 1 and "warning: checkpoint.dir" in warned[0], res[0]["said"]
    assert res[1]["said"] == ""
    for r in res:
        assert r["refused"] and "is not one directory for all ranks" in r["refused"], r
