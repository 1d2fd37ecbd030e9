"""Start-up of a CPU run (issue 21 item 3).

- On a fresh install: DeepSpeed's CPU comm op, which the first `python -m pretrain` compiled
  inside "initializing torch.distributed" (31-78 s), is built by `make install` into the cache
  a run of the same environment loads it from.
- On every start: a run that does not compile never imports inductor's compiler (DeepSpeed's
  Muon module pulled it in through its torch.compile decorators, ~2.3 s of a 13 s start), and
  wandb does not import W&B Launch to find no staged inputs (1.4 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import launch
from tests.pretrain.conftest import subprocess_env, train_overrides

REPO = Path(__file__).resolve().parents[2]


def test_the_prebuild_uses_the_cache_a_cpu_run_loads_from(monkeypatch):
    import deepspeed.accelerator

    seen = {}

    class Builder:
        def load(self):
            seen["dir"] = os.environ["TORCH_EXTENSIONS_DIR"]
            seen["accelerator"] = os.environ["DS_ACCELERATOR"]

    class Accelerator:
        def create_op_builder(self, name):
            seen["name"] = name
            return Builder()

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    for var in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    launch.build_cpu_comm_op()
    assert seen == {
        "name": "ShareMemCommBuilder",
        "dir": launch.extensions_dir(),
        "accelerator": "cpu",
    }
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    launch.prepare_env(launch.DistEnv(0, 1, 0), cuda=False)  # what python -m pretrain sets
    assert os.environ["TORCH_EXTENSIONS_DIR"] == seen["dir"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_install_builds_the_op_on_a_cpu_machine(tmp_path):
    plan = subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", "PY=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    install = plan.index("pip install -q --no-deps --no-build-isolation -e .")
    assert plan.index("build_cpu_comm_op", install) < plan.index(".project-installed", install)


# What a run imports ----------------------------------------------------------------------------
# `python -m pretrain` in a child whose last words are the heavy modules it imported.
IMPORTED_AT_EXIT = """
import runpy, sys
try:
    runpy.run_module("pretrain", run_name="__main__")
finally:
    # inductor's compiler proper (torch._dynamo, which torch.optim imports, brings only the
    # light part of torch._inductor: its config and utilities)
    heavy = ("torch._inductor.compile_fx", "torch._inductor.lowering", "wandb.sdk.launch")
    print("IMPORTED", [m for m in heavy if m in sys.modules])
"""


def run_and_list_heavy_imports(args: list[str]) -> tuple[subprocess.CompletedProcess, list]:
    import ast

    proc = subprocess.run(
        [sys.executable, "-c", IMPORTED_AT_EXIT, *args],
        cwd=REPO,
        env=subprocess_env(WANDB_SILENT="true"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, ast.literal_eval(lines[-1].removeprefix("IMPORTED "))


def test_an_eager_cpu_run_never_imports_the_compiler_or_wandb_launch(data_dir, tmp_path):
    # deterministic on (the default), a ZeRO-1 MoE step (DeepSpeed looks for Muon in
    # initialize and in the gradient reduction), wandb offline: all three used to import them
    over = train_overrides(
        data_dir, tmp_path / "run", max_steps=4, **{"logging.wandb_mode": "offline"}
    )
    proc, heavy = run_and_list_heavy_imports(["--config", "configs/train/tiny_cpu.yaml", *over])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert heavy == [], heavy
    assert (tmp_path / "run" / "wandb").is_dir()  # wandb did run


def test_muon_still_compiles_its_functions_at_their_first_call(monkeypatch):
    import torch

    from pretrain import deepspeed_compat

    for name in [m for m in sys.modules if m.startswith("deepspeed.runtime.zero.muon")]:
        monkeypatch.delitem(sys.modules, name)
    compiled = []

    def fake_compile(fn, *a, **k):
        compiled.append(fn.__name__)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    deepspeed_compat.defer_muon_compile()
    from deepspeed.runtime.zero.muon import original_muon
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # noqa: F401

    assert compiled == []  # nothing compiled at import
    import deepspeed.runtime.compiler as ds_compiler

    assert ds_compiler.compile() is fake_compile  # DeepSpeed's own decorator is back
    g = torch.randn(4, 3)
    out = original_muon.zeropower_via_newtonschulz5(g, steps=1)
    assert compiled == ["zeropower_via_newtonschulz5"] and out.shape == g.shape
    original_muon.zeropower_via_newtonschulz5(g, steps=1)
    assert compiled == ["zeropower_via_newtonschulz5"]  # once


def test_wandb_still_applies_launch_inputs_that_were_staged(monkeypatch):
    import types

    from pretrain import metrics

    seen = []

    class Run:
        def _detect_and_apply_job_inputs(self):
            seen.append(self)

    fake = types.SimpleNamespace(
        sdk=types.SimpleNamespace(wandb_run=types.SimpleNamespace(Run=Run))
    )
    metrics.look_for_launch_inputs_only_when_staged(fake)
    metrics.look_for_launch_inputs_only_when_staged(fake)  # idempotent: wrapped once
    monkeypatch.delitem(sys.modules, metrics.LAUNCH_INPUTS_MODULE, raising=False)
    run = Run()
    run._detect_and_apply_job_inputs()
    assert seen == []  # nothing can be staged: no look
    monkeypatch.setitem(sys.modules, metrics.LAUNCH_INPUTS_MODULE, types.ModuleType("staged"))
    run._detect_and_apply_job_inputs()
    assert seen == [run]
    metrics.look_for_launch_inputs_only_when_staged(types.SimpleNamespace())  # another wandb


def test_the_pinned_wandb_has_the_look_we_wrap():
    import wandb

    assert callable(wandb.sdk.wandb_run.Run._detect_and_apply_job_inputs)
