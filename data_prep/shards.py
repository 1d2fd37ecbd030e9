"""Packed token shards: `<stem>.bin` (raw token ids) + `<stem>.idx` (document offsets).

`.bin` holds the concatenated documents (each ending in EOS) as uint16 or uint32;
`.idx` is a .npy int64 array of length documents+1 with each document's start offset, so
readers memory-map both and never copy. Both files are written to temporaries and renamed
into place; a shard counts as done only once the caller records it in a manifest.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from mop.errors import DataError
from mop.fileio import atomic_path, sha256_file

BIN, IDX = ".bin", ".idx"


class ShardWriter:
    """Append documents; `finish()` publishes the two files and returns the shard's record."""

    def __init__(self, stem: str | os.PathLike, dtype: np.dtype):
        self.stem = Path(stem)
        self.dtype = np.dtype(dtype)
        self._max_id = np.iinfo(self.dtype).max
        self._bin_ctx = atomic_path(self.stem.with_suffix(BIN))
        self._bin_tmp = self._bin_ctx.__enter__()
        self._fh = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._sha = hashlib.sha256()
        self._offsets = [0]
        self.num_tokens = 0
        self.max_token_id = -1  # recorded, so a reader can check ids against a model's vocab

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    def add(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document."""
        arr = np.asarray(tokens)
        self.add_batch(arr, np.asarray([arr.size], dtype=np.int64))

    def add_batch(self, flat: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append many documents given as one flat array and their lengths (same bytes as
        calling `add` per document, without the per-document Python overhead)."""
        flat = np.asarray(flat)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() > self._max_id):
            raise DataError(f"token id out of range for {self.dtype.name} in shard {self.stem}")
        if flat.size:
            self.max_token_id = max(self.max_token_id, int(flat.max()))
        if int(doc_lengths.sum()) != flat.size:
            raise ValueError("doc_lengths do not add up to the number of tokens")
        data = flat.astype(self.dtype, copy=False).tobytes()
        self._fh.write(data)
        self._sha.update(data)
        self._offsets.extend((self.num_tokens + np.cumsum(doc_lengths)).tolist())
        self.num_tokens += int(flat.size)

    def finish(self) -> dict:
        self._fh.close()
        self._bin_ctx.__exit__(None, None, None)  # fsync + rename .bin into place
        buf = io.BytesIO()
        np.save(buf, np.asarray(self._offsets, dtype=np.int64))
        idx_bytes = buf.getvalue()
        with atomic_path(self.stem.with_suffix(IDX)) as tmp:
            tmp.write_bytes(idx_bytes)
        return {
            "name": self.stem.name,
            "tokens": self.num_tokens,
            "documents": self.num_documents,
            "dtype": self.dtype.name,
            "sha256": self._sha.hexdigest(),
            "idx_sha256": hashlib.sha256(idx_bytes).hexdigest(),
            "max_token_id": self.max_token_id,
        }

    def abort(self) -> None:
        self._fh.close()
        err = RuntimeError("shard aborted")
        try:
            self._bin_ctx.__exit__(type(err), err, None)
        except RuntimeError:
            pass


class ShardReader:
    """Memory-mapped view of one shard; `document(i)` and `tokens[a:b]` are zero-copy."""

    def __init__(self, stem: str | os.PathLike, dtype: np.dtype | str):
        self.stem = Path(stem)
        bin_path, idx_path = self.stem.with_suffix(BIN), self.stem.with_suffix(IDX)
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(f"shard file missing: {p}")
        self.dtype = np.dtype(dtype)
        size = bin_path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"shard {bin_path} size {size} is not a multiple of {self.dtype.name}")
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r")
            if size
            else np.zeros(0, dtype=self.dtype)
        )
        try:
            self.offsets = np.load(idx_path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(
                f"shard index {idx_path} is damaged ({' '.join(str(exc).split())}): truncated "
                "or not written by data_prep; rebuild the data directory (or restore the file)"
            ) from None
        if self.offsets.ndim != 1 or len(self.offsets) == 0:
            raise DataError(f"shard index {idx_path} is damaged: not a 1-D offset array")
        if self.offsets[-1] != len(self.tokens):
            raise DataError(
                f"shard {self.stem}: index ends at {int(self.offsets[-1])} but .bin holds "
                f"{len(self.tokens)} tokens (truncated or mismatched files)"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]


def verify_shard(stem: str | os.PathLike, record: dict) -> None:
    """Check a shard's files against its manifest record (sha256 of both files)."""
    stem = Path(stem)
    for suffix, key in ((BIN, "sha256"), (IDX, "idx_sha256")):
        path = stem.with_suffix(suffix)
        if not path.is_file():
            raise DataError(f"shard file missing: {path}")
        got = sha256_file(path)
        if got != record[key]:
            raise DataError(
                f"shard {path} is corrupted: sha256 {got[:12]}... does not match the "
                f"manifest's {record[key][:12]}...; delete it and re-run `tokenize` to rebuild"
            )
