"""Start-up of a CPU run on a fresh install (issue 21 item 3): DeepSpeed's CPU comm op, which
the first `python -m pretrain` compiled inside "initializing torch.distributed" (31-78 s), is
built by `make install` into the cache a run of the same environment loads it from."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pretrain import launch

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
