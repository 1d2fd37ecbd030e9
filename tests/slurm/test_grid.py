"""Grids of synthetic-task runs (slurm/grid.py): expansion, skip-on-rerun, the SLURM plan."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mop.errors import UserError
from mop.results import update_results
from slurm import grid as G
from tests.slurm.test_submit import _fake_env

REPO = Path(__file__).resolve().parents[2]
MEM_MODELS = [
    {"name": "dense_f32", "config": str(REPO / "configs/reproduce/models/mem_dense_f32.yaml")},
    {"name": "moe_e16_f16", "config": str(REPO / "configs/reproduce/models/mem_moe_e16_f16.yaml")},
]


def _write_grid(path: Path, **fields) -> Path:
    data = {
        "task": "memorization",
        "runs_dir": str(path.parent / "runs"),
        "sizes": [64, 128],
        "seeds": [0, 1],
        "models": MEM_MODELS,
        "steps": {64: 3, 128: 5},
        "data": {"seq_len": 4, "dim": 8},
        "train": {"lr": 0.01, "log_every": 1},
    }
    data.update(fields)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _lm_grid(tmp_path: Path, task: str = "phonebook") -> G.GridConfig:
    path = _write_grid(
        tmp_path / "pb.yaml",
        task=task,
        sizes=[500, 1000],
        seeds=[3],
        models=[
            {"name": "tiny", "config": "configs/model/tiny_dense.yaml", "overrides": ["d_model=32"]}
        ],
        steps=100,
        data={"num_test": 50},
        train={"optim.lr": 0.003, "batch.micro_batch": 8},
        train_config="configs/train/tiny_cpu.yaml",
        eval_args=["--limit", "50"],
    )
    return G.load_grid(path)


def test_expansion_names_every_run_and_its_commands(tmp_path: Path) -> None:
    grid = G.load_grid(_write_grid(tmp_path / "g.yaml"))
    jobs, runs = G.data_jobs(grid), G.expand(grid)
    assert [(j.size, j.seed) for j in jobs] == [(64, 0), (64, 1), (128, 0), (128, 1)]
    assert len({j.out for j in jobs}) == 4
    assert jobs[1].command == [
        "python", "-m", "data_prep", "synthetic", "memorization", "--out", jobs[1].out,
        "--size", "64", "--seed", "1", "--seq-len", "4", "--dim", "8",
    ]  # fmt: skip
    assert [r.name for r in runs[:4]] == [
        "dense_f32-n64-s0",
        "moe_e16_f16-n64-s0",
        "dense_f32-n64-s1",
        "moe_e16_f16-n64-s1",
    ]
    assert len(runs) == 8 and len({r.run_dir for r in runs}) == 8
    last = runs[-1]
    assert last.name == "moe_e16_f16-n128-s1" and last.data_dir == jobs[3].out
    (cmd,) = last.commands
    assert cmd[:3] == ["python", "-m", "pretrain.memorization"]
    assert cmd[cmd.index("--steps") + 1] == "5"  # the per-size budget
    assert cmd[cmd.index("--seed") + 1] == "1"
    assert cmd[cmd.index("--name") + 1] == "moe_e16_f16"
    assert cmd[cmd.index("--out") + 1] == last.run_dir
    assert cmd[cmd.index("--lr") + 1] == "0.01" and "--log-every" in cmd


def test_length2_path_grid_sizes_are_graph_sizes(tmp_path: Path) -> None:
    """The length-2-path grid's sizes set --vertices (the training set is `data.size`) and its
    runs are the classifier's, like memorization's."""
    path = _write_grid(
        tmp_path / "l2p.yaml",
        task="length2_path",
        sizes=[12, 16],
        seeds=[0],
        steps=20,
        data={"size": 2000, "num_test": 100},
        train={"lr": 0.003, "batch_size": 64, "schedule": "cosine"},
    )
    grid = G.load_grid(path)
    jobs, runs = G.data_jobs(grid), G.expand(grid)
    assert jobs[0].command == [
        "python", "-m", "data_prep", "synthetic", "length2-path", "--out", jobs[0].out,
        "--vertices", "12", "--seed", "0", "--size", "2000", "--num-test", "100",
    ]  # fmt: skip
    assert [r.name for r in runs] == [
        "dense_f32-n12-s0", "moe_e16_f16-n12-s0", "dense_f32-n16-s0", "moe_e16_f16-n16-s0",
    ]  # fmt: skip
    (cmd,) = runs[0].commands
    assert cmd[:3] == ["python", "-m", "pretrain.memorization"]
    assert cmd[cmd.index("--schedule") + 1] == "cosine"
    assert G.METRIC[grid.task] == "accuracy" and G.SECTION[grid.task] == "length2_path"
    G.check_runs(grid)  # no LM recipe to check


def test_lm_grid_trains_with_the_recipe_then_evaluates(tmp_path: Path) -> None:
    grid = _lm_grid(tmp_path)
    runs = G.expand(grid)
    assert [r.name for r in runs] == ["tiny-n500-s3", "tiny-n1000-s3"]
    train, ev = runs[1].commands
    assert train[:5] == ["python", "-m", "pretrain", "--config", "configs/train/tiny_cpu.yaml"]
    assert "model=configs/model/tiny_dense.yaml" in train and "model.d_model=32" in train
    assert f"data.data_dir={runs[1].data_dir}" in train and "data.seed=3" in train
    assert "seed=3" in train  # the model init follows the grid seed too
    assert "max_steps=100" in train and "optim.lr=0.003" in train
    assert ev == [
        "python", "-m", "eval", "--checkpoint", runs[1].run_dir, "--suite", "synthetic",
        "--name", "tiny", "--limit", "50",
    ]  # fmt: skip
    G.check_runs(grid)  # the recipe + overrides validate
    bad = _lm_grid(tmp_path)
    bad.train["optim.lr"] = -1.0
    with pytest.raises(UserError, match="optim.lr"):
        G.check_runs(bad)
    sp = G.data_jobs(_lm_grid(tmp_path, "shortest_path"))[0].command
    assert sp[3:5] == ["synthetic", "shortest-path"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"task": "sorting"}, "task"),
        ({"sizes": [64, 64]}, "distinct"),
        ({"steps": {64: 3}}, "no budget for sizes [128]"),
        ({"models": MEM_MODELS + [MEM_MODELS[0]]}, "distinct"),
        ({"models": [{"name": "a b", "config": "x.yaml"}]}, "letters"),
        ({"models": [{"name": "x", "config": "no/such.yaml"}]}, "config not found"),
        ({"task": "phonebook"}, "needs train_config"),
        ({"stepz": 3}, "unknown config field 'stepz'"),
    ],
)
def test_bad_grid_is_one_line_error(tmp_path: Path, capsys, fields: dict, message: str) -> None:
    from slurm.submit import main

    path = _write_grid(tmp_path / "g.yaml", **fields)
    assert main(["sweep", "--grid", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_grid_refuses_a_second_sweep_spec(tmp_path: Path, capsys) -> None:
    from slurm.submit import main

    path = _write_grid(tmp_path / "g.yaml")
    assert main(["sweep", "configs/train/tiny_cpu.yaml", "--grid", str(path)]) == 2
    assert "--grid takes no training config" in capsys.readouterr().err
    assert main(["sweep", "--local"]) == 2
    assert "--local needs --grid" in capsys.readouterr().err
    assert main(["sweep", "configs/train/tiny_cpu.yaml"]) == 2
    assert "--models" in capsys.readouterr().err
    assert main(["sweep", "--grid", str(path), "--jobs", "2"]) == 2
    assert "--jobs needs --local" in capsys.readouterr().err
    assert main(["sweep", "--grid", str(path), "--local", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def _finish(grid: G.GridConfig, run: G.Run, acc: float) -> None:
    """What a finished run leaves: a results.json with the task's section."""
    section = {"memorization": {"accuracy": acc, "n": run.size}}
    update_results(run.run_dir, {"model": {"name": run.model}}, "synthetic", section)


def test_rerun_skips_finished_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    grid = G.load_grid(_write_grid(tmp_path / "g.yaml", sizes=[64], seeds=[0]))
    dense, moe = G.expand(grid)
    executed: list[list[str]] = []

    def fake_exec(cmd: list[str], log: Path | None = None) -> None:
        executed.append(cmd)
        if cmd[2] == "data_prep":
            Path(cmd[cmd.index("--out") + 1]).mkdir(parents=True)
            (Path(cmd[cmd.index("--out") + 1]) / "manifest.json").write_text("{}")
        elif cmd[2] == "pretrain.memorization":
            run = dense if cmd[cmd.index("--name") + 1] == "dense_f32" else moe
            _finish(grid, run, 0.75)

    monkeypatch.setattr(G, "_exec", fake_exec)
    _finish(grid, moe, 0.99)  # the MoE run finished earlier (e.g. before a crash)
    assert G.run_local(grid) == {"ran": 1, "skipped": 1}
    out = capsys.readouterr().out
    assert "[grid] 1/2 dense_f32-n64-s0: accuracy 0.7500 in" in out
    assert "[grid] 2/2 moe_e16_f16-n64-s0: skipped, already finished (accuracy 0.9900)" in out
    kinds = [c[2] for c in executed]
    assert kinds == ["data_prep", "pretrain.memorization", "eval.report"]
    assert executed[1][executed[1].index("--name") + 1] == "dense_f32"

    executed.clear()
    assert G.run_local(grid, report=False) == {"ran": 0, "skipped": 2}
    assert executed == []  # data there, both runs finished: nothing runs

    # A results.json without the task's section (another suite) does not count as finished.
    other = tmp_path / "runs" / "runs" / "x"
    update_results(other, {}, "tasks", {"piqa": {"category": "commonsense", "score": 0.5}})
    fake = G.Run("x", "x", 64, 0, "d", str(other))
    assert G.finished_result(grid, fake) is None


def test_a_failing_step_stops_the_grid_naming_its_log(tmp_path: Path) -> None:
    grid = G.load_grid(_write_grid(tmp_path / "g.yaml", sizes=[64], seeds=[0]))
    log = tmp_path / "step.log"
    with pytest.raises(UserError, match=r"exit 2: python -m pretrain.memorization .*step.log"):
        G._exec(["python", "-m", "pretrain.memorization", "--steps", "0"], log)
    assert log.read_text().startswith("$ python -m pretrain.memorization --steps 0\n")
    with pytest.raises(UserError, match=r"--index must be in \[0, 1\]"):
        G.run_stage(grid, "run", 2)


def test_tiny_grid_runs_end_to_end_and_a_rerun_skips_it(tmp_path: Path) -> None:
    """The real CLI steps (data_prep, pretrain.memorization, eval.report) on a 2-run grid."""
    path = _write_grid(tmp_path / "g.yaml", sizes=[32], seeds=[0], steps=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slurm.submit", "sweep", "--grid", str(path), "--local"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "[grid] 1/2 dense_f32-n32-s0: accuracy" in first.stdout
    assert "[grid] 2/2 moe_e16_f16-n32-s0: accuracy" in first.stdout
    report = tmp_path / "runs" / "report"
    assert (report / "memorization_vs_n.png").is_file()
    assert "memorization_vs_n.png" in (report / "figures.csv").read_text()
    results = tmp_path / "runs" / "runs" / "moe_e16_f16-n32-s0" / "results.json"
    before = results.stat().st_mtime_ns
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("skipped, already finished") == 2
    assert "0 run(s) trained, 2 skipped" in second.stdout
    assert results.stat().st_mtime_ns == before


def test_slurm_plan_chains_data_runs_and_report(tmp_path: Path) -> None:
    path = _write_grid(
        tmp_path / "g.yaml",
        slurm={"run": ["--gpus-per-node=1", "--time=1:00:00"], "report": ["--time=0:10:00"]},
    )
    env = _fake_env(tmp_path)
    base = [sys.executable, "-m", "slurm.submit"]
    dry = subprocess.run(
        [*base, "--dry-run", "sweep", "--grid", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stdout.splitlines() if line.startswith("<job")]
    assert len(lines) == 3 and not (tmp_path / "calls").exists()  # nothing submitted
    assert "--array=0-3" in lines[0] and f"grid.sbatch {path} data" in lines[0]
    assert "--array=0-7" in lines[1] and "--dependency=afterok:<job1>" in lines[1]
    assert "--gpus-per-node=1 --time=1:00:00" in lines[1]
    assert "--dependency=afterok:<job2>" in lines[2] and lines[2].endswith(f"{path} report")

    real = subprocess.run(
        [*base, "--sbatch=--account=abc", "sweep", "--grid", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert real.returncode == 0, real.stderr
    data, runs, report = (tmp_path / "calls").read_text().splitlines()
    assert "--account=abc" in data and "--array=0-3" in data
    assert "--array=0-7" in runs and "--dependency=afterok:101" in runs
    assert "--dependency=afterok:102" in report and "--array" not in report


def test_array_task_runs_its_index_and_skips_when_finished(tmp_path: Path, monkeypatch, capsys):
    grid = G.load_grid(_write_grid(tmp_path / "g.yaml"))
    executed: list[list[str]] = []
    monkeypatch.setattr(G, "_exec", lambda cmd, log=None: executed.append(cmd))
    G.run_stage(grid, "data", 2)
    assert executed == [G.data_jobs(grid)[2].command]
    run = G.expand(grid)[5]
    G.run_stage(grid, "run", 5)
    assert executed[1:] == run.commands
    _finish(grid, run, 0.5)
    G.run_stage(grid, "run", 5)
    assert len(executed) == 2 and "skipped, already finished" in capsys.readouterr().out
    G.run_stage(grid, "report", None)
    assert executed[-1] == G.report_command(grid)


def test_sbatch_script_runs_its_array_task_and_refuses_a_non_array_run(tmp_path) -> None:
    # The job script with a stand-in Python: an array task runs its own index of the stage;
    # a run stage outside an array is refused before any Python starts.
    fake = tmp_path / "fakepy"
    fake.write_text('#!/usr/bin/env bash\necho "$@" >> "$CALLS"\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOP_"))}
    env.update(
        PY=str(fake),
        CALLS=str(calls),
        SLURM_SUBMIT_DIR=str(tmp_path),
        MOP_SLURM_DIR=str(REPO / "slurm"),
    )
    script = str(REPO / "slurm" / "grid.sbatch")
    ok = subprocess.run(
        ["bash", script, "g.yaml", "run"],
        env={**env, "SLURM_ARRAY_TASK_ID": "3"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert calls.read_text().splitlines() == ["-m slurm.grid g.yaml --stage run --index 3"]
    bad = subprocess.run(
        ["bash", script, "g.yaml", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "not an array task" in bad.stderr
    assert calls.read_text().splitlines() == ["-m slurm.grid g.yaml --stage run --index 3"]


@pytest.mark.parametrize("path", sorted((REPO / "configs/reproduce").glob("*.yaml")))
def test_shipped_grids_load_and_validate(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    grid = G.load_grid(path.relative_to(REPO))
    G.check_runs(grid)
    per_seed = sum(len(grid.sizes_of(m)) for m in grid.models)
    assert len(G.expand(grid)) == per_seed * len(grid.seeds) >= len(grid.models)


def test_models_run_their_own_sizes(tmp_path: Path) -> None:
    models = [{**MEM_MODELS[0], "sizes": [64]}, MEM_MODELS[1]]
    grid = G.load_grid(_write_grid(tmp_path / "g.yaml", models=models, seeds=[0]))
    assert [r.name for r in G.expand(grid)] == [
        "dense_f32-n64-s0",
        "moe_e16_f16-n64-s0",
        "moe_e16_f16-n128-s0",
    ]
    bad = [{**MEM_MODELS[0], "sizes": [64, 256]}, MEM_MODELS[1]]
    with pytest.raises(UserError, match=r"dense_f32: sizes \[256\] are not in the grid's sizes"):
        G.load_grid(_write_grid(tmp_path / "bad.yaml", models=bad))
    unused = [{**m, "sizes": [64]} for m in MEM_MODELS]
    with pytest.raises(UserError, match=r"sizes \[128\] are run by no model"):
        G.load_grid(_write_grid(tmp_path / "unused.yaml", models=unused))


def _fake_parallel_exec(grid: G.GridConfig, live: list[int], peak: list[int], fail: str = ""):
    """An _exec stand-in: data dirs appear, each run takes 0.3 s and counts how many overlap."""
    import threading

    by_name = {r.name: r for r in G.expand(grid)}
    lock = threading.Lock()

    def fake(cmd: list[str], log: Path | None = None) -> None:
        if cmd[2] == "data_prep":
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "manifest.json").write_text("{}")
            return
        if cmd[2] != "pretrain.memorization":
            return
        run = by_name[Path(cmd[cmd.index("--out") + 1]).name]
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.3)
        with lock:
            live[0] -= 1
        if run.name == fail:
            raise UserError(f"step failed with exit 1: {run.name}")
        _finish(grid, run, 0.5)

    return fake


def test_jobs_runs_n_at_a_time_and_a_rerun_skips(tmp_path: Path, monkeypatch, capsys) -> None:
    grid = G.load_grid(_write_grid(tmp_path / "g.yaml"))  # 8 runs
    live, peak = [0], [0]
    monkeypatch.setattr(G, "_exec", _fake_parallel_exec(grid, live, peak))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    t0 = time.perf_counter()
    assert G.run_local(grid, report=False, jobs=2) == {"ran": 8, "skipped": 0}
    assert peak[0] == 2 and time.perf_counter() - t0 < 8 * 0.3  # two at a time, never three
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    out = capsys.readouterr().out
    assert out.count(": accuracy 0.5000 in ") == 8 and "(load " in out
    timings = (Path(grid.runs_dir) / "timings.jsonl").read_text().splitlines()
    assert len(timings) == 8 and all('"jobs": 2' in t and '"load_start"' in t for t in timings)
    assert G.run_local(grid, report=False, jobs=2) == {"ran": 0, "skipped": 8}


def test_jobs_a_failure_lets_running_runs_finish_then_stops(tmp_path, monkeypatch) -> None:
    grid = G.load_grid(_write_grid(tmp_path / "g.yaml"))
    names = [r.name for r in G.expand(grid)]
    live, peak = [0], [0]
    monkeypatch.setattr(G, "_exec", _fake_parallel_exec(grid, live, peak, fail=names[0]))
    with pytest.raises(UserError, match=names[0]):
        G.run_local(grid, report=False, jobs=2)
    finished = [n for n in names if G.finished_result(grid, G.expand(grid)[names.index(n)])]
    assert finished == [names[1]]  # the run beside the failing one finished; none started after
    with pytest.raises(UserError, match="--jobs must be >= 1"):
        G.run_local(grid, jobs=0)


def test_train_by_size_overrides_the_shared_flags_for_one_size(tmp_path: Path) -> None:
    path = _write_grid(
        tmp_path / "pb.yaml",
        task="phonebook",
        sizes=[500, 1000],
        seeds=[0],
        models=[{"name": "tiny", "config": "configs/model/tiny_dense.yaml"}],
        steps=100,
        data={},
        train={"optim.lr": 0.003, "batch.micro_batch": 8},
        train_by_size={1000: {"batch.micro_batch": 16}},
        train_config="configs/train/tiny_cpu.yaml",
    )
    small, big = G.expand(G.load_grid(path))
    assert "batch.micro_batch=8" in small.commands[0]
    assert (
        "batch.micro_batch=16" in big.commands[0] and "batch.micro_batch=8" not in big.commands[0]
    )
    assert "optim.lr=0.003" in big.commands[0]
    bad = _write_grid(tmp_path / "bad.yaml", train_by_size={999: {"lr": 0.1}})
    with pytest.raises(UserError, match=r"train_by_size names sizes \[999\]"):
        G.load_grid(bad)
