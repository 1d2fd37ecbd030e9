"""Common output of the tensor synthetic tasks (memorization, length-2 path): .npy + manifest.

Layout of an output directory DIR:

    DIR/<split>_x.npy, <split>_y.npy   float32 inputs [n, N, m] and int8 +-1 labels [n]
    DIR/config.json                    the task's config (task, seed, every parameter)
    DIR/manifest.json                  written last: {"format": "mop-synthetic-tensors-v1",
                                       "task": {"name", "config"}, "tensors": {key: {file,
                                       shape, dtype, sha256}}, "splits": {split: [x key, y key]}}

A split names the two tensors it reads; memorization's "test" split names the training
tensors (test = train, by design), the length-2-path task has its own held-out test tensors.
`load_split(DIR, split)` reads a split checked against the manifest (sha256, shape, dtype).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep.synthetic.writer import CONFIG, MANIFEST
from mop.errors import DataError
from mop.fileio import atomic_path, atomic_write_json, read_json, sha256_file
from mop.progress import progress

TENSOR_FORMAT = "mop-synthetic-tensors-v1"


def write_x_chunks(
    path: Path, shape: tuple[int, ...], chunks: Iterator[np.ndarray], desc: str
) -> None:
    """Stream float32 chunks (along the first axis) into a .npy of `shape`, atomically."""
    with atomic_path(path) as tmp:
        x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        lo = 0
        with progress(total=shape[0], desc=desc, unit="seq") as bar:
            for chunk in chunks:
                x[lo : lo + len(chunk)] = chunk
                lo += len(chunk)
                bar.update(len(chunk))
        if lo != shape[0]:
            raise ValueError(f"{path.name}: {lo} rows written, {shape[0]} expected")
        x.flush()
        del x  # close the map before the file is renamed


def write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def tensor_record(path: Path) -> dict:
    """Manifest entry of a written .npy (shape and dtype read back from its header)."""
    arr = np.load(path, mmap_mode="r")
    return {
        "file": path.name,
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "sha256": sha256_file(path),
    }


def finish_tensor_task(
    out: Path, task: str, config: dict, files: dict[str, str], splits: dict[str, list[str]]
) -> dict:
    """config.json, then the manifest (last: the commit mark); returns the manifest.

    `files` maps tensor keys to file names already written in `out`."""
    atomic_write_json(out / CONFIG, config)
    manifest = {
        "format": TENSOR_FORMAT,
        "task": {"name": task, "config": config},
        "tensors": {key: tensor_record(out / name) for key, name in files.items()},
        "splits": splits,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def tensor_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a finished tensor task (refuses an unfinished or foreign directory)."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise DataError(f"{out} has no {MANIFEST}: the synthetic run did not finish")
    manifest = read_json(out / MANIFEST)
    if manifest.get("format") != TENSOR_FORMAT:
        raise DataError(f"{out / MANIFEST} is not a tensor task manifest ({TENSOR_FORMAT})")
    return manifest


def task_name(out_dir: str | os.PathLike) -> str:
    return str(tensor_manifest(out_dir)["task"]["name"])


def load_split(
    out_dir: str | os.PathLike, split: str = "train", verify: bool = True, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(x float32, y int8 in {-1, +1}) of one split, checked against the manifest."""
    out = Path(out_dir)
    manifest = tensor_manifest(out)
    keys = manifest.get("splits", {}).get(split)
    if not keys:
        raise DataError(f"{out / MANIFEST} has no {split!r} split")
    arrays = []
    for key in keys:
        rec = manifest["tensors"][key]
        path = out / rec["file"]
        if verify and sha256_file(path) != rec["sha256"]:
            raise DataError(f"{path} does not match the sha256 in its manifest: corrupted")
        arr = np.load(path, mmap_mode="r" if mmap else None)
        if list(arr.shape) != rec["shape"] or arr.dtype.name != rec["dtype"]:
            raise DataError(f"{path}: shape/dtype {arr.shape}/{arr.dtype} differ from manifest")
        arrays.append(arr)
    return arrays[0], arrays[1]
