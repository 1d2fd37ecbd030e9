"""A tiny data directory in the real format (manifest, mixture plan, shards, validation),
written directly with ShardWriter: tokenizing text would cost seconds and test nothing here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import FORMAT, PLAN, write_manifest
from data_prep.shards import ShardWriter
from mop.fileio import atomic_write_json

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_SHA = "ab" * 32
VOCAB = 512
SEQ_LEN = 32


def _documents(rng: np.random.Generator, n: int, stride: int) -> list[np.ndarray]:
    """Learnable documents: arithmetic runs mod 500 (ids 1..500; 0 is EOS)."""
    docs = []
    for _ in range(n):
        length = int(rng.integers(20, 90))
        start = int(rng.integers(0, 500))
        body = (start + stride * np.arange(length)) % 500 + 1
        docs.append(np.append(body, 0))
    return docs


def write_shard(stem: Path, docs: list[np.ndarray]) -> dict:
    w = ShardWriter(stem, np.uint16)
    for d in docs:
        w.add(d)
    return w.finish()


def make_data_dir(out: Path, shares: dict[str, float] | None = None) -> Path:
    shares = shares or {"alpha": 0.7, "beta": 0.3}
    rng = np.random.default_rng(0)
    shards, plan = [], {}
    for j, label in enumerate(sorted(shares)):
        available = 0
        for k in range(2):  # two train shards per source: windows cross shard boundaries
            rel = f"shards/{label}/train/u00000-{k:04d}"
            rec = write_shard(out / rel, _documents(rng, 30, stride=j + 1))
            shards.append({**rec, "path": rel, "source": label, "split": "train"})
            available += rec["tokens"]
        plan[label] = {
            "weight": shares[label],
            "share": shares[label],
            "planned_tokens": available,
            "available_tokens": available,
            "epochs": 1.0,
        }
    val_docs = [(np.arange(SEQ_LEN + 1) * (i % 2 + 1) + i) % 500 + 1 for i in range(8)]
    val = write_shard(out / "validation/sequences", val_docs)
    atomic_write_json(out / PLAN, {"sources": plan, "total_tokens": 10**6, "seed": 0})
    manifest = {
        "format": FORMAT,
        "tokenizer": {"sha256": TOKENIZER_SHA, "vocab_size": VOCAB, "eos_id": 0, "dtype": "uint16"},
        "sources": {},
        "shards": shards,
        "mixture_plan": PLAN,
        "validation": {
            **val,
            "path": "validation/sequences",
            "seq_len": SEQ_LEN + 1,
            "num_sequences": len(val_docs),
        },
    }
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


def train_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    over = {
        "data.data_dir": str(data_dir),
        "data.seq_len": SEQ_LEN,
        "run_dir": str(run_dir),
        "logging.wandb_mode": "disabled",
        "logging.log_interval": 1,
        "eval.interval": 5,
        "max_steps": 20,
        "checkpoint.interval": 3,
        "checkpoint.keep_last": 2,
        "schedule.warmup_steps": 3,
        "batch.micro_batch": 2,
        "batch.grad_accum": 2,
        "model.n_layers": 1,
        "model.d_model": 32,
        "model.n_heads": 2,
        "model.n_kv_heads": 1,
        "model.ffn_hidden": 32,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of a training/eval subprocess: no inherited rank variables (a test run
    under torchrun or srun must not leak them), one thread, the repository importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def run_trainer(
    overrides: list[str], env_extra: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run the trainer in a fresh process through the test-only wrapper (faults by env)."""
    env = subprocess_env(**(env_extra or {}))
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("fault_wrapper.py")),
        "--config",
        str(REPO / "configs/train/tiny_cpu.yaml"),
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
