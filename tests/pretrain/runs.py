"""Running `python -m pretrain` as a user would (one process or under torchrun) and reading
its metrics.jsonl back, for the tests that compare whole runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.launch import free_port
from tests.pretrain.conftest import REPO, subprocess_env

TINY = REPO / "configs/train/tiny_cpu.yaml"
RTOL = 1e-5


def run_pretrain(
    overrides: list[str],
    nproc: int,
    timeout: float = 300,
    check: bool = True,
    env_extra: dict[str, str] | None = None,
):
    """`python -m pretrain` (via the test wrapper) in one process or under torchrun; with
    check, a failed run fails the test with the ranks' errors. `env_extra`: fault_wrapper.py
    variables."""
    env = subprocess_env(**(env_extra or {}))
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        launcher += [f"--master_port={free_port()}"]
    cmd = [*launcher, str(REPO / "tests/pretrain/fault_wrapper.py"), "--config", str(TINY)]
    res = subprocess.run(
        [*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        # torchrun's summary buries the ranks' own errors: show those first.
        errors = [ln for ln in res.stderr.splitlines() if "Error" in ln or "error:" in ln][:20]
        joined = "\n".join(errors)
        pytest.fail(
            f"exit {res.returncode}\n{joined}\n--- stdout\n{res.stdout[-2000:]}\n"
            f"--- stderr\n{res.stderr[-3000:]}"
        )
    return res


def metrics(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def assert_same_run(
    ref: dict[int, dict],
    got: dict[int, dict],
    steps,
    grad_norm_rtol: float = RTOL,
    rtol: float = RTOL,
) -> None:
    for s in steps:
        for key in ("loss", "grad_norm", "val_loss", "lr", "samples"):
            if key in ref[s]:
                tol = grad_norm_rtol if key == "grad_norm" else rtol
                assert got[s][key] == pytest.approx(ref[s][key], rel=tol), (s, key)


def assert_same_expert_load(ref: dict[int, dict], got: dict[int, dict], steps) -> None:
    """The logged expert loads (whole step, and per data source) of two runs agree: the same
    tokens went to the same experts, whatever the process layout."""
    for s in steps:
        keys = sorted(k for k in ref[s] if k.startswith("expert_load"))
        assert any(k.startswith("expert_load_by_source/") for k in keys), (s, keys)
        assert keys == sorted(k for k in got[s] if k.startswith("expert_load")), s
        for k in keys:
            assert got[s][k] == pytest.approx(ref[s][k], abs=1e-6), (s, k)


def saved_weights(step_dir: Path) -> dict:
    """The single-process model's weights of one save, of any format and layout, as eval
    reads them (the model config is the one the save carries)."""
    from eval.checkpoint import _read_states, _train_config, deepspeed_state_dict
    from pretrain.model.transformer import build_model

    states = _read_states(step_dir)[0]
    cfg = _train_config(states, None, step_dir)
    model = build_model(cfg.model)
    return deepspeed_state_dict(step_dir, states, cfg, model)
