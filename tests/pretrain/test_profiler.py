"""`python -m pretrain --profile FROM:TO` writes a torch profiler trace of those steps."""

from __future__ import annotations

import json

import pytest

from mop.errors import UserError
from pretrain.profiler import parse_profile_range
from tests.pretrain.conftest import run_trainer, train_overrides


def test_profile_range_parsing():
    assert parse_profile_range("5:8") == (5, 8)
    assert parse_profile_range("1:1") == (1, 1)
    for bad in ("8:5", "0:3", "5", "a:b", "1:2:3"):
        with pytest.raises(UserError, match="FROM:TO"):
            parse_profile_range(bad)


def test_profile_writes_a_trace_of_the_steps(data_dir, tmp_path):
    over = train_overrides(data_dir, tmp_path, max_steps=4, **{"eval.interval": 0})
    res = run_trainer([*over, "--profile", "2:3"])
    assert res.returncode == 0, res.stderr[-3000:]
    trace = tmp_path / "profile" / "steps_2-3_rank0.json"
    assert f"profiler trace of steps 2-3: {trace}" in res.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") for n in names)  # the steps' ops were recorded
    assert any("backward" in n.lower() for n in names)


def test_a_bad_profile_range_is_one_error_line(data_dir, tmp_path):
    res = run_trainer([*train_overrides(data_dir, tmp_path), "--profile", "3:1"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --profile '3:1': want FROM:TO with 1 <= FROM <= TO, e.g. 5:8"
    ]
