"""bf16 gradients are summed in fp32 (issue 23 item 11), seen on every reduction a bf16 run
makes: a spy in front of torch.distributed's reductions (tests/pretrain/collective_spy.py)
records the op, dtype, size and group of each, and the engine's gradient dtypes.

- dp / expert-dp reductions (ZeRO's buckets): fp32 at every ZeRO stage (a bf16 all-reduce
  rounds after each addition: its error grows with the number of ranks);
- micro-batch accumulation: fp32 with ZeRO 2; bf16 with ZeRO 1, where DeepSpeed 0.19.8 would
  answer fp32 accumulation by switching to its BF16_Optimizer (pretrain/deepspeed_config.py);
- the tensor-parallel sum of the replicated weights' gradients: fp32.

Activations keep their dtype (sequence-parallel reduce-scatters, all-to-alls: not gradients).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.launch import free_port
from tests.pretrain.conftest import REPO, subprocess_env, train_overrides
from tests.pretrain.runs import TINY

SPY = REPO / "tests/pretrain/collective_spy.py"
FLOATS = {"float32", "float64", "bfloat16", "float16"}
BF16 = {"precision": "bf16", "model.n_kv_heads": 2, "max_steps": 2, "schedule.warmup_steps": 1,
        "checkpoint.interval": 100, "eval.interval": 0}  # fmt: skip


def _spied_run(tmp_path: Path, nproc: int, **over) -> dict[int, dict]:
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={free_port()}", str(SPY), "--config", str(TINY)]
    cmd += train_overrides(tmp_path.parent / "data", tmp_path / "run", **{**BF16, **over})
    res = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(MOP_TEST_SPY_DIR=str(spy_dir)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return {r: json.loads((spy_dir / f"rank{r}.json").read_text()) for r in range(nproc)}


@pytest.fixture
def data_link(data_dir, tmp_path):
    """The session's data directory where _spied_run looks for it (beside tmp_path)."""
    link = tmp_path.parent / "data"
    if not link.exists():
        link.symlink_to(data_dir)
    return link


@pytest.mark.parametrize("stage", [1, 2])
def test_data_parallel_gradient_reductions_are_fp32(stage, data_link, tmp_path):
    # ep 2 on 2 ranks: the dense gradients reduced over dp, the experts' over expert dp
    moe = {"zero_stage": stage, "parallel.expert_parallel": 2, "batch.micro_batch": 1}
    spied = _spied_run(tmp_path, 2, **moe)
    for rank, rec in spied.items():
        engine = rec["engine"]
        assert engine["model"] == "bfloat16" and engine["communication"] == "float32", engine
        assert engine["optimizer"] == "DeepSpeedZeroOptimizer"  # not the BF16_Optimizer
        assert engine["accumulation"] == ("float32" if stage == 2 else "bfloat16"), engine
        grads = [c for c in rec["calls"] if c["dtype"] in FLOATS and c["numel"] > 64]
        assert grads, rec["calls"][:5]  # the buckets were seen
        assert all(c["dtype"] != "bfloat16" for c in grads), [c for c in grads][:5]
        assert any(c["ranks"] == [0, 1] for c in grads), rank


def test_tensor_parallel_gradient_sums_are_fp32(data_link, tmp_path):
    spied = _spied_run(tmp_path, 2, **{"parallel.tensor_parallel": 2, "zero_stage": 1})
    for rec in spied.values():
        tp_sums = [
            c for c in rec["calls"]
            if c["op"] == "all_reduce" and c["ranks"] == [0, 1] and c["dtype"] in FLOATS
        ]  # fmt: skip
        # the replicated weights' gradients (norms, router, experts) at least once per step
        assert len([c for c in tp_sums if c["numel"] > 64]) >= 2, tp_sums[:5]
        assert all(c["dtype"] in ("float32", "float64") for c in tp_sums), tp_sums[:5]
