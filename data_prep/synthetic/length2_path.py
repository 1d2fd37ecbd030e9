"""Length-2 path (the paper's reasoning theory task, Definition 2.1), as tensors.

A graph on |V| vertices with a fixed source s = 0 and destination d = |V| - 1: is there a
path of length 2, s - v - d? Only the edges that touch s or d decide it, so only those are
listed. Choices (the paper leaves the distribution open):

- Encoding: one token per edge {u, w}, the sum of the one-hot vectors of its two endpoints
  in R^|V| plus a zero "query" coordinate (input_dim = |V| + 1). The edges at s and at d
  come in one random order, then zero padding up to 2 * max_degree slots, then the query
  token e_s + e_d + e_query (the classifier reads the last position). Each token carries
  ONE edge, so no token holds both of a vertex's edges to s and d (an adjacency-row
  encoding would, and makes the task a per-token lookup: a dense width-8 model solves it).
- Distribution: the degrees of s and d are drawn independently and uniformly from
  [min_degree, max_degree] (default 2..4 at every |V|), the same law for both labels; a
  negative graph has disjoint neighbourhoods of s and d, a positive one shares EXACTLY one
  middle vertex (the hard case of set disjointness). Edge counts therefore say nothing
  about the label (in a G(n, p) graph with balanced labels they alone would decide 72% of
  the cases at |V| = 16 and 68% at |V| = 32), and a model must find the one vertex the two
  neighbourhoods share. Keeping the degrees the same at every |V| keeps the sequence the
  same length, so a larger |V| asks for more width only: more vertices to tell apart. (At
  |V| = 32 with degrees 4..8, none of the widths tried learned it within 3,000 steps.)
- Labels: y = +1 when the path exists. Training labels are an exact 50/50 shuffle; the
  test set holds `num_test` graphs (half of each label), all distinct and none of them a
  training graph (as an edge set, whatever the order of its tokens): accuracy is measured
  on graphs the model never saw.
- Files (`tensors.py`): train_x.npy [size, 2*max_degree + 1, |V| + 1] float32,
  train_y.npy [size] int8, test_x.npy, test_y.npy, config.json, manifest.json (last).
  `load_length2_path(DIR, split)` reads a split checked; `graph_edges(x)` decodes a row.
- Seeds: the training set from stream (seed, 0), the test set from (seed, 1), in fixed
  chunks of 4,096 graphs: the bytes depend on the arguments only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.synthetic.tensors import (
    finish_tensor_task,
    load_split,
    task_name,
    write_array,
    write_x_chunks,
)
from data_prep.synthetic.writer import SYNTHETIC_FORMAT_VERSION, prepare_out_dir
from mop.errors import ConfigError, DataError

TASK = "length2_path"
_CHUNK = 4096  # graphs per draw; fixed, since the stream of draws defines the data
_MAX_BYTES = 64 << 30
_STALL_DRAWS = 20  # chunks in a row that add no held-out graph: the space is used up


@dataclass(frozen=True)
class Length2PathConfig:
    size: int  # training graphs
    seed: int = 0
    vertices: int = 16  # |V|; s = 0, d = |V| - 1
    min_degree: int = 2
    max_degree: int = 4
    num_test: int = 2000

    @property
    def degrees(self) -> tuple[int, int]:
        return self.min_degree, self.max_degree

    @property
    def seq_len(self) -> int:
        return 2 * self.degrees[1] + 1

    @property
    def input_dim(self) -> int:
        return self.vertices + 1

    def validate(self) -> None:
        for name, value in (("--size", self.size), ("--num-test", self.num_test)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.vertices < 4:
            raise ConfigError(f"--vertices must be >= 4, got {self.vertices}")
        lo, hi = self.degrees
        if lo < 1 or hi < lo:
            raise ConfigError(f"need 1 <= --min-degree <= --max-degree, got {lo} and {hi}")
        if 2 * hi > self.vertices - 2:
            raise ConfigError(
                f"--max-degree {hi} is too large for --vertices {self.vertices}: disjoint "
                f"neighbourhoods of s and d need 2 * max_degree <= |V| - 2 = {self.vertices - 2}"
            )
        nbytes = 4 * (self.size + self.num_test) * self.seq_len * self.input_dim
        if nbytes > _MAX_BYTES:
            raise ConfigError(f"the tensors would take {nbytes / 2**30:.1f} GiB (> 64 GiB)")

    def to_json(self) -> dict:
        return {
            "task": TASK,
            "format_version": SYNTHETIC_FORMAT_VERSION,
            **asdict(self),
            "seq_len": self.seq_len,
            "input_dim": self.input_dim,
            "source": 0,
            "destination": self.vertices - 1,
            "encoding": "one token per edge at s or d: one-hot(u) + one-hot(w) over |V|, "
            "random order, zero padding, then the query token e_s + e_d + e_query",
            "distribution": "deg(s), deg(d) uniform on [min_degree, max_degree] for both "
            "labels; negatives: disjoint neighbourhoods; positives: exactly one shared vertex",
            "test": "num_test distinct graphs not in the training set, half of each label",
        }


def _draw(
    rng: np.random.Generator, cfg: Length2PathConfig, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Graphs for the given labels: (x [c, seq_len, |V| + 1] float32, key [c] bytes).

    The key packs the neighbourhood masks of s and d: equal keys = equal edge sets."""
    c, v = len(positive), cfg.vertices
    lo, hi = cfg.degrees
    deg_s = rng.integers(lo, hi + 1, c)
    deg_d = rng.integers(lo, hi + 1, c)
    middle = np.argsort(rng.random((c, v - 2)), axis=1) + 1  # a random order of 1..|V|-2
    slot = np.arange(hi)
    # s takes the first deg_s middle vertices; d the next deg_d, starting one earlier for a
    # positive graph so that exactly one vertex (middle[deg_s - 1]) is shared.
    start = deg_s - positive.astype(np.int64)
    nbr_s = middle[:, :hi]
    nbr_d = np.take_along_axis(middle, start[:, None] + slot[None, :], axis=1)
    valid = np.concatenate([slot < deg_s[:, None], slot < deg_d[:, None]], axis=1)
    verts = np.concatenate([nbr_s, nbr_d], axis=1)
    ends = np.concatenate([np.zeros((c, hi), np.int64), np.full((c, hi), v - 1)], axis=1)
    order = np.argsort(np.where(valid, rng.random(valid.shape), 2.0), axis=1, kind="stable")
    verts, ends, valid = (np.take_along_axis(a, order, axis=1) for a in (verts, ends, valid))
    x = np.zeros((c, cfg.seq_len, cfg.input_dim), np.float32)
    rows, cols = np.nonzero(valid)
    x[rows, cols, verts[rows, cols]] = 1.0
    x[rows, cols, ends[rows, cols]] = 1.0
    x[:, -1, [0, v - 1, v]] = 1.0  # the query token
    masks = np.zeros((c, 2, v), bool)
    masks[rows, (ends[rows, cols] != 0).astype(np.int64), verts[rows, cols]] = True
    keys = np.packbits(masks.reshape(c, -1), axis=1)
    return x, keys


def _as_keys(packed: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in packed]


def _labels(y01: np.ndarray) -> np.ndarray:
    return (y01.astype(np.int8) * 2 - 1).astype(np.int8)


def write_length2_path(out_dir: str | os.PathLike, cfg: Length2PathConfig) -> dict:
    """Write the training and held-out test graphs, config and manifest; returns the manifest."""
    cfg.validate()
    out = prepare_out_dir(out_dir)
    rng = np.random.default_rng([cfg.seed, 0])
    positive = rng.permutation(np.arange(cfg.size) % 2 == 1)  # exactly balanced
    seen: set[bytes] = set()

    def train_chunks():
        for lo in range(0, cfg.size, _CHUNK):
            x, keys = _draw(rng, cfg, positive[lo : lo + _CHUNK])
            seen.update(_as_keys(keys))
            yield x

    shape = (cfg.size, cfg.seq_len, cfg.input_dim)
    write_x_chunks(out / "train_x.npy", shape, train_chunks(), TASK)
    write_array(out / "train_y.npy", _labels(positive))
    test_x, test_pos = _held_out(cfg, seen)
    write_array(out / "test_x.npy", test_x)
    write_array(out / "test_y.npy", _labels(test_pos))
    files = {
        "x": "train_x.npy",
        "y": "train_y.npy",
        "test_x": "test_x.npy",
        "test_y": "test_y.npy",
    }
    splits = {"train": ["x", "y"], "test": ["test_x", "test_y"]}
    return finish_tensor_task(out, TASK, cfg.to_json(), files, splits)


def _held_out(cfg: Length2PathConfig, seen: set[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """`num_test` distinct graphs outside `seen`, half of each label, in drawing order."""
    rng = np.random.default_rng([cfg.seed, 1])
    quota = {True: cfg.num_test // 2, False: cfg.num_test - cfg.num_test // 2}
    xs, labels = [], []
    stalled = 0
    while any(quota.values()) and stalled < _STALL_DRAWS:
        before = len(labels)
        positive = rng.permutation(np.arange(_CHUNK) % 2 == 1)
        x, keys = _draw(rng, cfg, positive)
        for i, key in enumerate(_as_keys(keys)):
            label = bool(positive[i])
            if quota[label] and key not in seen:
                seen.add(key)
                quota[label] -= 1
                xs.append(x[i])
                labels.append(label)
        stalled = stalled + 1 if len(labels) == before else 0
    if any(quota.values()):
        raise ConfigError(
            f"found only {len(labels)} of --num-test {cfg.num_test} graphs outside the "
            f"training set: with --vertices {cfg.vertices} and degrees {cfg.degrees} there are "
            "too few distinct graphs; lower --size or --num-test, or raise --vertices"
        )
    return np.stack(xs), np.array(labels)


def graph_edges(x: np.ndarray) -> list[tuple[int, int]]:
    """The edges (u, w), u < w, that one encoded graph [seq_len, |V| + 1] lists."""
    edges = []
    for token in x[:-1]:  # the last position is the query
        ends = np.flatnonzero(token[:-1])
        if len(ends):
            edges.append((int(ends[0]), int(ends[1])))
    return edges


def load_length2_path(
    out_dir: str | os.PathLike, split: str = "train", verify: bool = True, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(x [n, seq_len, |V| + 1] float32, y [n] int8 in {-1, +1}) of one split, checked."""
    if task_name(out_dir) != TASK:
        raise DataError(f"{out_dir} is not a length-2-path task directory")
    return load_split(Path(out_dir), split, verify=verify, mmap=mmap)
