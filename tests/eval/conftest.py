"""Shared fixtures of the eval tests.

- The Hugging Face stack is kept offline with a private cache for the whole session (the
  harness and `datasets` would otherwise try the hub or reuse a user's cache).
- `eval_data_dir`: a tiny data directory in the real format with a real (small BPE) tokenizer,
  so text round-trips through the same code as production.
- `trained_run`: one short `python -m pretrain` run on it (MoE, 4 steps, saves at 2 and 4),
  shared by every test that needs a real DeepSpeed checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import FORMAT, PLAN, write_manifest
from data_prep.shards import ShardWriter
from data_prep.tokenizer import train_bpe
from mop.fileio import atomic_write_json

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32  # training / validation sequence length
MAX_SEQ_LEN = 48  # model context: small, so truncation and rolling windows are exercised

_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "under",
    "over",
    "mat",
    "log",
    "tree",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "quick",
    "slow",
    "one",
    "two",
    "three",
    "four",
    "five",
    "and",
    "then",
    "because",
    "so",
    "question",
    "answer",
    "is",
    "what",
]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(int(rng.integers(2, 6))):
            words = rng.choice(_WORDS, size=int(rng.integers(4, 10)))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def make_eval_data_dir(out: Path) -> Path:
    """Tokenizer + manifest + one train shard + validation sequences of SEQ_LEN + 1 tokens."""
    docs = corpus(120)
    tok = train_bpe(docs, vocab_size=300)
    tok.save(out)
    eos = tok.eos_id
    ids = [np.append(np.asarray(x, dtype=np.int64), eos) for x in tok.encode_batch(docs)]
    rel = "shards/text/train/u00000-0000"
    w = ShardWriter(out / rel, tok.token_dtype)
    for d in ids:
        w.add(d)
    rec = w.finish()
    flat = np.concatenate(ids)
    n_val = 10
    vw = ShardWriter(out / "validation/sequences", tok.token_dtype)
    for i in range(n_val):
        vw.add(flat[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1])
    val = vw.finish()
    plan = {
        "text": {
            "weight": 1.0,
            "share": 1.0,
            "planned_tokens": rec["tokens"],
            "available_tokens": rec["tokens"],
            "epochs": 1.0,
        }
    }
    atomic_write_json(out / PLAN, {"sources": plan, "total_tokens": rec["tokens"], "seed": 0})
    manifest = {
        "format": FORMAT,
        "tokenizer": tok.meta(),
        "sources": {},
        "shards": [{**rec, "path": rel, "source": "text", "split": "train"}],
        "mixture_plan": PLAN,
        "validation": {
            **val,
            "path": "validation/sequences",
            "seq_len": SEQ_LEN + 1,
            "num_sequences": n_val,
        },
    }
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="session", autouse=True)
def hf_offline(tmp_path_factory):
    """No hub access and a private HF cache for every test of this package."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    home = tmp_path_factory.mktemp("hf_home")
    os.environ.update(
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home)
    )
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory) -> Path:
    return make_eval_data_dir(tmp_path_factory.mktemp("eval_data"))


def train_tiny(data_dir: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """4 steps of the tiny MoE recipe, checkpoints at steps 2 and 4 (about 10-20 s)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    overrides = [
        f"data.data_dir={data_dir}",
        f"data.seq_len={SEQ_LEN}",
        f"run_dir={run_dir}",
        "max_steps=4",
        "checkpoint.interval=2",
        "checkpoint.keep_last=2",
        "schedule.warmup_steps=1",
        "batch.micro_batch=2",
        "batch.grad_accum=1",
        "eval.interval=0",
        "logging.wandb_mode=disabled",
        "model.d_model=32",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_hidden=32",
        f"model.max_seq_len={MAX_SEQ_LEN}",
        "model.vocab_size=320",
        *extra,
    ]
    cmd = [sys.executable, "-m", "pretrain", "--config", "configs/train/tiny_cpu.yaml", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, eval_data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    proc = train_tiny(eval_data_dir, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir
