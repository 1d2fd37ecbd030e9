"""Memorization (theory) task: n Gaussian sequences with arbitrary +-1 labels, as tensors.

The paper's theory task: sequences X_i of N vectors in R^m, each labelled y_i in {-1, +1}
at random; a model must fit the labels (predicted at the last token). Choices:

- X_i has i.i.d. N(0, 1) entries (float32), shape [n, N, m]; defaults N = 16, m = 32.
- y_i is uniform on {-1, +1} (int8), independent of X: nothing to generalise, only to store.
- Test = the training set itself: memorization is measured as accuracy on the examples
  that were trained on, so no separate test file is written (the manifest says so).
- Files: DIR/train_x.npy and DIR/train_y.npy, plain .npy (deterministic bytes, memory-mappable,
  `torch.from_numpy(np.load(...))`), config.json, and manifest.json written last with
  shapes, dtypes and sha256 of both files. Use `load_memorization(DIR)` to read them checked.
- Seeds: X from stream (seed, 0) and y from (seed, 1), generated in fixed chunks of 4,096
  sequences so memory stays bounded and the bytes do not depend on anything but the args.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.synthetic.writer import CONFIG, MANIFEST, SYNTHETIC_FORMAT_VERSION, prepare_out_dir
from mop.errors import ConfigError, DataError
from mop.fileio import atomic_path, atomic_write_json, read_json, sha256_file
from mop.progress import progress

TASK = "memorization"
TENSOR_FORMAT = "mop-synthetic-tensors-v1"
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
    shape = (cfg.size, cfg.seq_len, cfg.dim)
    with atomic_path(out / X_FILE) as tmp:
        x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        with progress(total=cfg.size, desc="memorization", unit="seq") as bar:
            for lo in range(0, cfg.size, _CHUNK):
                hi = min(lo + _CHUNK, cfg.size)
                x[lo:hi] = rng_x.standard_normal((hi - lo, cfg.seq_len, cfg.dim), dtype=np.float32)
                bar.update(hi - lo)
        x.flush()
        del x  # close the map before the file is renamed
    y = (rng_y.integers(0, 2, size=cfg.size, dtype=np.int8) * 2 - 1).astype(np.int8)
    with atomic_path(out / Y_FILE) as tmp, open(tmp, "wb") as fh:
        np.save(fh, y)
    config = cfg.to_json()
    atomic_write_json(out / CONFIG, config)
    manifest = {
        "format": TENSOR_FORMAT,
        "task": {"name": TASK, "config": config},
        "tensors": {
            "x": _record(out / X_FILE, shape, "float32"),
            "y": _record(out / Y_FILE, (cfg.size,), "int8"),
        },
        "splits": {"train": ["x", "y"], "test": ["x", "y"]},  # test = train, by design
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _record(path: Path, shape: tuple[int, ...], dtype: str) -> dict:
    return {"file": path.name, "shape": list(shape), "dtype": dtype, "sha256": sha256_file(path)}


def load_memorization(
    out_dir: str | os.PathLike, verify: bool = True, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(X [n, N, m] float32, y [n] int8 in {-1, +1}) of a finished run, checked against its manifest."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise DataError(f"{out} has no {MANIFEST}: the memorization run did not finish")
    manifest = read_json(out / MANIFEST)
    if manifest.get("format") != TENSOR_FORMAT:
        raise DataError(f"{out / MANIFEST} is not a memorization manifest ({TENSOR_FORMAT})")
    arrays = []
    for key in ("x", "y"):
        rec = manifest["tensors"][key]
        path = out / rec["file"]
        if verify and sha256_file(path) != rec["sha256"]:
            raise DataError(f"{path} does not match the sha256 in its manifest: corrupted")
        arr = np.load(path, mmap_mode="r" if mmap else None)
        if list(arr.shape) != rec["shape"] or arr.dtype.name != rec["dtype"]:
            raise DataError(f"{path}: shape/dtype {arr.shape}/{arr.dtype} differ from manifest")
        arrays.append(arr)
    return arrays[0], arrays[1]
