"""The GPU kit in its CPU smoke mode, end to end, and its pieces (issue 14): one command
leaves exactly summary.json and logs.tar.gz with every step's status and the benchmark rows,
and prints the summary table last; a hung step is killed with its children at its cap."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import device_kit, train_throughput
from bench.train_throughput import ROW_KEYS, Case, cases, layers_that_fit
from tests.pretrain.conftest import REPO, subprocess_env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("out")
    res = subprocess.run(
        ["bash", "tests/gpu/run_device_checks.sh", "--smoke"],
        cwd=REPO,
        env=subprocess_env(OUT=str(out), PY=sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, res


def test_smoke_writes_exactly_the_two_files(smoke):
    out, res = smoke
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json"]


def test_smoke_summary_has_every_step_row_and_floor(smoke):
    out, _ = smoke
    s = json.loads((out / "summary.json").read_text())
    assert tuple(s) == device_kit.SUMMARY_KEYS and s["smoke"] is True
    assert [st["name"] for st in s["steps"]] == [
        "device", "tests_gpu", "gpu_path", "train_throughput",
    ]  # fmt: skip
    assert all(st["status"] == "ok" and st["seconds"] > 0 for st in s["steps"]), s["steps"]
    assert s["tests"]["failed"] == 0 and s["tests"]["skipped"] > 0  # tests/gpu skip on CPU
    # issue 23: one check per item that only a GPU shows, each its own row (skipped on a CPU)
    checks = s["gpu_path"]["checks"]
    for item in ("item1_", "item2_", "item9_", "item10_", "item12_"):
        assert any(name.startswith(f"test_{item}") for name in checks), (item, checks)
    assert set(checks.values()) == {"skipped"} and s["gpu_path"]["figures"] is None
    rows = {r["name"]: r for r in s["throughput"]["rows"]}
    assert list(rows) == [c.name for c in cases(smoke=True)]
    for r in rows.values():
        assert tuple(r) == ROW_KEYS
    for name in ("dense_d1024", "dense_d1024_transformers", "moe_d1024_e8_torch",
                 "moe_d1024_e64_transformers"):  # fmt: skip
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_ms"] * 1e3)
        assert r["tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
    assert rows["dense_d1024"]["ratio_vs_transformers"] == pytest.approx(
        rows["dense_d1024"]["tokens_per_s"] / rows["dense_d1024_transformers"]["tokens_per_s"]
    )
    assert rows["moe_d1024_e8_megablocks"]["status"] == "skipped"  # no megablocks on a CPU
    assert {f["floor"] for f in s["floors"]} >= {"dense_d2048 mfu", "moe_d1024_e64 mfu"}
    assert all(f["met"] is None for f in s["floors"])  # a CPU run never claims a floor


def test_smoke_tarball_holds_the_logs_and_the_table_ends_the_output(smoke):
    out, res = smoke
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for step in ("device", "tests_gpu", "gpu_path", "train_throughput"):
        assert f"device_kit/logs/{step}.log" in names
    assert "device_kit/bench/train_throughput.json" in names
    tail = res.stdout.splitlines()[-60:]
    assert any(line.startswith("== device kit (SMOKE") for line in tail)
    assert any(line.startswith("dense_d2048_transformers") for line in tail)
    assert any(line.startswith("gpu check test_item12_") for line in tail)


def test_a_hung_step_is_killed_with_its_children_and_the_rest_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = device_kit.Step("hang", ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], 2)
    t0 = time.perf_counter()
    rec = device_kit.run_step(hang, tmp_path, dict(os.environ), remaining_s=60)
    assert rec["status"] == "timeout" and time.perf_counter() - t0 < 30
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]  # fmt: skip
    fail = device_kit.Step("fail", [sys.executable, "-c", "raise SystemExit('error: boom')"], 30)
    rec = device_kit.run_step(fail, tmp_path, dict(os.environ), remaining_s=60)
    assert rec["status"] == "failed" and rec["rc"] == 1 and "boom" in rec["error"]


def test_e64_runs_with_the_layers_that_fit_and_dense_keeps_twenty():
    args = argparse.Namespace(smoke=False, cpu=False, seq_len=2048)  # the GPU profile
    h200 = 139 * 2**30
    moe = train_throughput.model_config(
        Case("e64", "ours", "moe_d1024_e64", "configs/model/moe_d1024_e64.yaml", "torch", False),
        args,
    )
    dense = train_throughput.model_config(
        Case("d", "ours", "dense_d2048", "configs/model/dense_d2048.yaml", None, False), args
    )
    n = layers_that_fit(moe, 2048, 16, h200)
    assert 5 <= n < 20  # 11.2B parameters x 18 bytes do not fit; about half the layers do
    assert layers_that_fit(dense, 2048, 16, h200) == 20
    assert layers_that_fit(moe, 2048, 16, 2 * h200) > n


def test_floors_take_the_best_variant_and_only_a_gpu_run_is_judged():
    def row(name, impl, model, mfu, tps):
        return {**dict.fromkeys(ROW_KEYS), "name": name, "impl": impl, "model": model,
                "status": "ok", "mfu": mfu, "tokens_per_s": tps}  # fmt: skip

    rows = [
        row("a", "ours", "dense_d2048", 0.40, 300.0),
        row("b", "ours", "dense_d2048", 0.50, 200.0),
        row("c", "transformers", "dense_d2048", 0.2, 100.0),
    ]
    train_throughput.add_ratios(rows)
    assert rows[0]["ratio_vs_transformers"] == 3.0 and rows[2]["ratio_vs_transformers"] is None
    got = {f["floor"]: f for f in train_throughput.floors(rows, smoke=False)}
    assert got["dense_d2048 mfu"]["value"] == 0.50 and got["dense_d2048 mfu"]["met"] is True
    assert got["dense_d2048 ratio_vs_transformers"]["met"] is True
    assert got["moe_d1024_e8 mfu"]["met"] is None  # not measured: no verdict
    rows[1]["mfu"] = 0.44
    got = {f["floor"]: f for f in train_throughput.floors(rows, smoke=False)}
    assert got["dense_d2048 mfu"]["met"] is False
    assert all(f["met"] is None for f in train_throughput.floors(rows, smoke=True))


def test_the_cpu_profile_is_eager_unless_asked_and_steps_each_model_in_turn(capsys):
    """--cpu runs ours eagerly (as the CPU grids train); --cpu-compile adds ours compiled,
    and the compiled case takes turns with the eager one and transformers' of its model."""
    eager = train_throughput.parse_args(["--cpu"])
    both = train_throughput.parse_args(["--cpu", "--cpu-compile"])
    compiled = [c for c in cases(False) if c.compile and c.backend in (None, "torch")]
    floored = [c for c in compiled if c.model in train_throughput.CPU_RATIO_FLOORS]
    assert floored and all(train_throughput.skip_reason(c, eager, False) for c in floored)
    assert all(train_throughput.skip_reason(c, both, False) is None for c in floored)
    groups = train_throughput.by_model([c for c in cases(False) if c.model == "moe_d1024_e8"])
    assert len(groups) == 1
    assert {(c.impl, c.compile) for c in groups[0]} == {
        ("ours", False),
        ("ours", True),
        ("transformers", False),
    }
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--cpu-compile"])
    assert "--cpu-compile goes with --cpu" in capsys.readouterr().err


def test_the_gpu_call_installs_every_carried_file_offline(tmp_path, monkeypatch):
    whl = tmp_path / "repo" / ".whl"
    whl.mkdir(parents=True)
    for name in ("a-1.0-py3-none-any.whl", "b-2.0-cp312-cp312-manylinux2014_x86_64.whl"):
        (whl / name).write_bytes(b"")
    monkeypatch.setattr(device_kit, "REPO", tmp_path / "repo")
    args = device_kit.parse_args(["--out", str(tmp_path / "out")])
    plan = device_kit.steps(args, tmp_path / "work")
    assert [s.name for s in plan] == [
        "install", "build_kernels", "device", "tests_gpu", "gpu_path", "train_throughput",
        "moe_backends", "checkpoint_save",
    ]  # fmt: skip
    tests_gpu, gpu_path = plan[3].cmd, plan[4].cmd
    assert f"--ignore={device_kit.GPU_PATH}" in tests_gpu  # each check runs once
    assert device_kit.GPU_PATH in gpu_path and "tests/gpu" not in gpu_path
    install = plan[0].cmd[-1]
    assert "--no-index" in install and all(str(p) in install for p in whl.iterdir())
    assert str(whl / "deepspeed-0.19.8.tar.gz") in install
    assert plan[1].cmd == ["bash", "docker/build_gpu_deps.sh", str(whl)]
