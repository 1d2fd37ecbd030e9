"""Memorization (theory) task: n Gaussian sequences with arbitrary +-1 labels, as tensors.

The paper's theory task: sequences X_i of N vectors in R^m, each labelled y_i in {-1, +1}
at random; a model must fit the labels (predicted at the last token). Choices:

- X_i has i.i.d. N(0, 1) entries (float32), shape [n, N, m]; defaults N = 16, m = 32.
- y_i is uniform on {-1, +1} (int8), independent of X: nothing to generalise, only to store.
- Test = the training set itself: memorization is measured as accuracy on the examples
  that were trained on, so no separate test file is written (the manifest says so).
- Files: DIR/train_x.npy and DIR/train_y.npy, plain .npy (deterministic bytes, memory-mappable,
  `torch.from_numpy(np.load(...))`), config.json, and manifest.json written last with
  shapes, dtypes and sha256 of both files (the layout of `tensors.py`). Use
  `load_memorization(DIR)` to read them checked.
- Seeds: X from stream (seed, 0) and y from (seed, 1), generated in fixed chunks of 4,096
  sequences so memory stays bounded and the bytes do not depend on anything but the args.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.synthetic.tensors import (
    TENSOR_FORMAT,  # noqa: F401 (re-export: data_prep.verify reads it from here)
    finish_tensor_task,
    load_split,
    task_name,
    write_array,
    write_x_chunks,
)
from data_prep.synthetic.writer import SYNTHETIC_FORMAT_VERSION, prepare_out_dir
from mop.errors import ConfigError, DataError

TASK = "memorization"
X_FILE, Y_FILE = "train_x.npy", "train_y.npy"
_CHUNK = 4096  # sequences per draw; fixed, since the stream of draws defines the data
_MAX_BYTES = 64 << 30  # refuse absurd sizes with a clear message instead of a MemoryError


@dataclass(frozen=True)
class MemorizationConfig:
    size: int  # number of sequences n
    seed: int = 0
    seq_len: int = 16  # N
    dim: int = 32  # m

    def validate(self) -> None:
        for name, value in (
            ("--size", self.size),
            ("--seq-len", self.seq_len),
            ("--dim", self.dim),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        nbytes = 4 * self.size * self.seq_len * self.dim
        if nbytes > _MAX_BYTES:
            raise ConfigError(f"X would take {nbytes / 2**30:.1f} GiB (> 64 GiB); lower --size")

    def to_json(self) -> dict:
        return {
            "task": TASK,
            "format_version": SYNTHETIC_FORMAT_VERSION,
            **asdict(self),
            "x_distribution": "iid standard normal, float32",
            "labels": "uniform on {-1, +1}, int8, independent of X",
            "test": "the training set (memorization accuracy)",
        }


def write_memorization(out_dir: str | os.PathLike, cfg: MemorizationConfig) -> dict:
    """Write X [n, N, m] float32 and y [n] int8 plus config and manifest; returns the manifest."""
    cfg.validate()
    out = prepare_out_dir(out_dir)
    rng_x = np.random.default_rng([cfg.seed, 0])
    rng_y = np.random.default_rng([cfg.seed, 1])

    def chunks():
        for lo in range(0, cfg.size, _CHUNK):
            hi = min(lo + _CHUNK, cfg.size)
            yield rng_x.standard_normal((hi - lo, cfg.seq_len, cfg.dim), dtype=np.float32)

    write_x_chunks(out / X_FILE, (cfg.size, cfg.seq_len, cfg.dim), chunks(), TASK)
    y = (rng_y.integers(0, 2, size=cfg.size, dtype=np.int8) * 2 - 1).astype(np.int8)
    write_array(out / Y_FILE, y)
    files = {"x": X_FILE, "y": Y_FILE}
    splits = {"train": ["x", "y"], "test": ["x", "y"]}  # test = train, by design
    return finish_tensor_task(out, TASK, cfg.to_json(), files, splits)


def load_memorization(
    out_dir: str | os.PathLike, verify: bool = True, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(X [n, N, m] float32, y [n] int8 in {-1, +1}) of a finished run, checked against its manifest."""
    if task_name(out_dir) != TASK:
        raise DataError(f"{out_dir} is not a memorization task directory")
    return load_split(out_dir, "train", verify=verify, mmap=mmap)
