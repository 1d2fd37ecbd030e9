"""Decontamination: drop documents that share a long token n-gram with an evaluation set.

N-grams are hashed to uint64 with a polynomial over token ids (wrapping arithmetic), so an
index of a few million evaluation n-grams is one sorted array and a document check is a
vectorised `np.isin`. A 64-bit hash collision would only ever drop an extra document.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mop.errors import DataError

_BASE = np.uint64(1_000_003)


def _powers(n: int) -> np.ndarray:
    powers = np.ones(n, dtype=np.uint64)
    for i in range(n - 2, -1, -1):
        powers[i] = powers[i + 1] * _BASE
    return powers


def ngram_hashes(tokens: np.ndarray | list[int], n: int) -> np.ndarray:
    """uint64 hash of every length-n window of `tokens` (empty if the text is shorter)."""
    arr = np.asarray(tokens, dtype=np.uint64)
    if arr.size < n:
        return np.zeros(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(arr, n)
    with np.errstate(over="ignore"):
        return (windows * _powers(n)).sum(axis=1, dtype=np.uint64)


class NgramIndex:
    """Sorted unique n-gram hashes of the evaluation sets."""

    def __init__(self, hashes: np.ndarray, n: int):
        self.hashes = np.unique(np.asarray(hashes, dtype=np.uint64))
        self.n = n

    def contaminated(self, tokens: np.ndarray | list[int]) -> bool:
        if self.hashes.size == 0:
            return False
        doc = ngram_hashes(tokens, self.n)
        return bool(doc.size) and bool(np.isin(doc, self.hashes, assume_unique=False).any())

    def save(self, path: str | os.PathLike) -> None:
        from mop.fileio import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.concatenate([[np.uint64(self.n)], self.hashes]))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NgramIndex:
        data = np.load(path)
        return cls(data[1:], int(data[0]))


def iter_eval_texts(files: Iterable[str], fields: list[str]) -> Iterator[str]:
    """Every string (or list-of-string) field of every row of local evaluation files."""
    import datasets

    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DataError(f"decontamination eval file not found: {path}")
        builder = "parquet" if path.suffix == ".parquet" else "json"
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        for row in ds:
            for key, value in row.items():
                if fields and key not in fields:
                    continue
                yield from _strings(value)


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def build_index(texts: Iterable[str], encode_batch, n: int, batch: int = 256) -> NgramIndex:
    """Tokenise evaluation texts with the training tokenizer and collect their n-grams."""
    parts: list[np.ndarray] = []
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) >= batch:
            parts.extend(ngram_hashes(ids, n) for ids in encode_batch(buf))
            buf = []
    if buf:
        parts.extend(ngram_hashes(ids, n) for ids in encode_batch(buf))
    hashes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    return NgramIndex(hashes, n)
