"""Token shards in Megatron's indexed-dataset format: `<stem>.bin` + `<stem>.idx`.

This module is the only code that reads or writes `.idx` files. A shard directory written
here is a Megatron-LM / GPT-NeoX dataset: megatron-core's `IndexedDataset(stem)` reads it
token for token, and `IndexedDatasetBuilder` (one `add_item` + `end_document` per document)
writes the same bytes (tests/data_prep/test_megatron_format.py checks both directions).

`.bin`: the token ids of the documents back to back (each ends in EOS), little-endian, in the
index's dtype. `.idx` (megatron-core's `_IndexWriter` layout, version 1):

    9 bytes  b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code (DType: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)
    u64      S, the number of sequences
    u64      D + 1, the number of document indices
    i32[S]   sequence lengths in tokens
    i64[S]   sequence pointers: byte offset of each sequence in .bin
    i64[D+1] document indices: document d is sequences [doc[d], doc[d + 1])

We write one sequence per document (Megatron's `preprocess_data.py` without
`--split-sentences` does the same), so doc = 0..S. The reader accepts any grouping (an
imported dataset may hold several sentences per document) as long as the sequences lie back
to back in .bin, which is what every Megatron/NeoX writer produces; a shard's index may cover
a leading part of its .bin (an imported source whose tail was held out for validation).

Cost of opening a shard is O(1): the header and sizes are checked, the arrays memory-mapped,
nothing is read per document. The O(S) checks (pointers back to back, ids in the
vocabulary) belong to whoever accepts foreign files (`check_structure`, used by
`import-megatron`); our own shards are covered by the sha256 of both files in the manifest.

Before 2026-12 the `.idx` was a NumPy `.npy` array of document offsets. Such a file is
refused with one line naming `python -m data_prep upgrade-index`, which rewrites the indexes
of a data directory in this format (the `.bin` files are unchanged; `upgrade_legacy_index`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mop.errors import DataError
from mop.fileio import atomic_path, sha256_file

BIN, IDX = ".bin", ".idx"
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices
# megatron.core.datasets.indexed_dataset.DType: the integer codes (6/7 are float64/float32)
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "uint16": 8}
CODE_DTYPES = {code: np.dtype(name) for name, code in DTYPE_CODES.items()}
LEGACY_MAGIC = b"\x93NUMPY"
UPGRADE_COMMAND = "python -m data_prep upgrade-index --data-dir"
_CHUNK_ITEMS = 1 << 22  # rows per write when an index is streamed to disk


def shard_file(stem: str | os.PathLike, suffix: str) -> Path:
    """`<stem>.bin` or `<stem>.idx`, appended as Megatron does (a prefix may hold dots)."""
    return Path(f"{os.fspath(stem)}{suffix}")


def token_dtype_code(dtype: np.dtype | str) -> int:
    """Megatron's code for a token dtype; refuses dtypes the format cannot name (uint32)."""
    name = np.dtype(dtype).name
    if name not in DTYPE_CODES:
        raise ValueError(
            f"dtype {name} has no code in Megatron's indexed-dataset format "
            f"(one of {sorted(DTYPE_CODES)}); token ids above 65,535 use int32"
        )
    return DTYPE_CODES[name]


def write_index(
    path: str | os.PathLike,
    dtype: np.dtype | str,
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray | None = None,
) -> str:
    """Write `path` (.idx) atomically; returns its sha256. `document_indices` None means one
    sequence per document. Sequences are laid back to back from byte 0 of the .bin."""
    code = token_dtype_code(dtype)
    itemsize = np.dtype(dtype).itemsize
    lengths = np.asarray(sequence_lengths)
    if lengths.size and (int(lengths.min()) < 0 or int(lengths.max()) > np.iinfo(np.int32).max):
        raise ValueError("sequence lengths must lie in [0, 2**31)")
    num_docs = lengths.size + 1 if document_indices is None else len(document_indices)
    sha = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:

        def put(data: bytes) -> None:
            fh.write(data)
            sha.update(data)

        put(HEADER.pack(MAGIC, VERSION, code, lengths.size, num_docs))
        for a in range(0, lengths.size, _CHUNK_ITEMS):
            put(lengths[a : a + _CHUNK_ITEMS].astype(np.int32).tobytes())
        start = 0
        for a in range(0, lengths.size, _CHUNK_ITEMS):
            chunk = lengths[a : a + _CHUNK_ITEMS].astype(np.int64) * itemsize
            ends = np.cumsum(chunk) + start
            put((ends - chunk).tobytes())
            start = int(ends[-1])
        for a in range(0, num_docs, _CHUNK_ITEMS):
            if document_indices is None:
                docs = np.arange(a, min(a + _CHUNK_ITEMS, num_docs), dtype=np.int64)
            else:
                docs = np.asarray(document_indices[a : a + _CHUNK_ITEMS], dtype=np.int64)
            put(docs.tobytes())
    return sha.hexdigest()


@dataclass(frozen=True)
class ShardIndex:
    """A parsed `.idx`: memory-mapped arrays, checked for shape (not content) on open."""

    path: Path
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], bytes
    document_indices: np.ndarray  # int64 [D + 1]

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def token_span(self) -> tuple[int, int]:
        """[first, end) token positions in .bin that the sequences cover."""
        if not self.num_sequences:
            return 0, 0
        size = self.dtype.itemsize
        first = int(self.sequence_pointers[0])
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * size
        if first < 0 or first % size or end % size or end < first:
            raise DataError(f"shard index {self.path} is damaged: sequence pointers out of order")
        return first // size, end // size


def read_index(path: str | os.PathLike) -> ShardIndex:
    """Parse a Megatron `.idx` (O(1) checks: header, version, dtype, sizes, end points)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(HEADER.size)
    if head.startswith(LEGACY_MAGIC):
        raise DataError(
            f"shard index {path} is in the NumPy layout of data_prep before 2026-12, not "
            f"Megatron's MMIDIDX: rewrite the directory's indexes with `{UPGRADE_COMMAND} "
            f"{_data_dir_of(path)}` (.bin files stay as they are)"
        )
    if len(head) < HEADER.size or not head.startswith(MAGIC):
        raise DataError(
            f"shard index {path} is damaged or not a Megatron indexed dataset: bad header "
            f"(expected {MAGIC!r} and {HEADER.size} header bytes)"
        )
    _, version, code, n_seq, n_doc = HEADER.unpack(head)
    if version != VERSION:
        raise DataError(f"shard index {path}: version {version}, only {VERSION} is known")
    if code not in CODE_DTYPES:
        raise DataError(f"shard index {path}: dtype code {code} is not an integer token dtype")
    want = HEADER.size + n_seq * (4 + 8) + n_doc * 8
    size = path.stat().st_size
    if size == want + n_seq and n_seq:
        raise DataError(f"shard index {path} is multimodal (sequence modes): not supported")
    if size != want or n_doc < 1:
        raise DataError(
            f"shard index {path} is damaged: {size} bytes, but its header ({n_seq} sequences, "
            f"{n_doc} document indices) needs {want} (truncated or not a Megatron index)"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = raw[HEADER.size : HEADER.size + 4 * n_seq].view(np.int32)
    at = HEADER.size + 4 * n_seq
    pointers = raw[at : at + 8 * n_seq].view(np.int64)
    docs = raw[at + 8 * n_seq : size].view(np.int64)
    if int(docs[0]) != 0 or int(docs[-1]) != n_seq:
        raise DataError(
            f"shard index {path} is damaged: document indices run from {int(docs[0])} to "
            f"{int(docs[-1])}, not from 0 to the {n_seq} sequences"
        )
    return ShardIndex(path, CODE_DTYPES[code], lengths, pointers, docs)


def check_structure(index: ShardIndex, bin_bytes: int) -> None:
    """The O(S) checks for a foreign index: sequences back to back inside .bin, document
    indices in order. One DataError naming the first fault."""
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(index.sequence_pointers)
    size = index.dtype.itemsize
    if lengths.size:
        if int(lengths.min()) < 0:
            raise DataError(f"shard index {index.path} is damaged: a negative sequence length")
        ends = pointers + lengths * size
        past = np.flatnonzero(ends > bin_bytes)
        if past.size:
            k = int(past[0])
            raise DataError(
                f"shard index {index.path}: sequence {k} ends at byte {int(ends[k])}, past the "
                f"end of its .bin ({bin_bytes} bytes): damaged or "
                "mismatched files"
            )
        expected = np.concatenate([[0], np.cumsum(lengths[:-1] * size)])
        off = np.flatnonzero(pointers != expected)
        if off.size:
            k = int(off[0])
            raise DataError(
                f"shard index {index.path}: sequence {k} starts at byte {int(pointers[k])}, "
                f"not {int(expected[k])} where the previous one ends (sequences must lie back "
                "to back from byte 0; damaged index)"
            )
    if index.num_documents and (np.diff(np.asarray(index.document_indices)) < 0).any():
        raise DataError(f"shard index {index.path} is damaged: document indices out of order")


class ShardWriter:
    """Append documents; `finish()` publishes the two files and returns the shard's record."""

    def __init__(self, stem: str | os.PathLike, dtype: np.dtype):
        self.stem = Path(stem)
        self.dtype = np.dtype(dtype)
        token_dtype_code(self.dtype)  # refuse a dtype the .idx cannot name before writing
        self._max_id = np.iinfo(self.dtype).max
        self._bin_ctx = atomic_path(shard_file(self.stem, BIN))
        self._bin_tmp = self._bin_ctx.__enter__()
        self._fh = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id = -1  # recorded, so a reader can check ids against a model's vocab

    def add(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document."""
        arr = np.asarray(tokens)
        self.add_batch(arr, np.asarray([arr.size], dtype=np.int64))

    def add_batch(self, flat: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append many documents given as one flat array and their lengths (same bytes as
        calling `add` per document, without the per-document Python overhead)."""
        flat = np.asarray(flat)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        if flat.size:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi > self._max_id:
                raise DataError(f"token id out of range for {self.dtype.name} in shard {self.stem}")
            self.max_token_id = max(self.max_token_id, hi)
        if int(doc_lengths.sum()) != flat.size:
            raise ValueError("doc_lengths do not add up to the number of tokens")
        data = flat.astype(self.dtype, copy=False).tobytes()
        self._fh.write(data)
        self._sha.update(data)
        self._lengths.append(doc_lengths)
        self.num_documents += doc_lengths.size
        self.num_tokens += int(flat.size)

    def finish(self) -> dict:
        self._fh.close()
        self._bin_ctx.__exit__(None, None, None)  # fsync + rename .bin into place
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        idx_sha = write_index(shard_file(self.stem, IDX), self.dtype, lengths)
        return {
            "name": self.stem.name,
            "tokens": self.num_tokens,
            "documents": self.num_documents,
            "dtype": self.dtype.name,
            "sha256": self._sha.hexdigest(),
            "idx_sha256": idx_sha,
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
    """Memory-mapped view of one shard: `tokens[a:b]` and `document(i)` are zero-copy.

    `dtype`, when given (the manifest's), must be the one the index names."""

    def __init__(self, stem: str | os.PathLike, dtype: np.dtype | str | None = None):
        self.stem = Path(stem)
        bin_path, idx_path = shard_file(self.stem, BIN), shard_file(self.stem, IDX)
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(f"shard file missing: {p}{_dangling(p)}")
        self.index = read_index(idx_path)
        self.dtype = self.index.dtype
        if dtype is not None and np.dtype(dtype) != self.dtype:
            raise DataError(
                f"shard {idx_path} holds {self.dtype.name} tokens, the manifest says "
                f"{np.dtype(dtype).name}: mismatched files"
            )
        size = bin_path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"shard {bin_path} size {size} is not a multiple of {self.dtype.name}")
        self._first, end = self.index.token_span()
        if end * self.dtype.itemsize > size:
            raise DataError(
                f"shard {self.stem}: index ends at token {end} but .bin holds "
                f"{size // self.dtype.itemsize} tokens (truncated or mismatched files)"
            )
        whole = np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        self.tokens = whole[self._first : end]

    def __len__(self) -> int:
        return self.index.num_documents

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document_start(self, doc: int) -> int:
        """Offset in `tokens` of document `doc` (`len(self)` gives the end)."""
        seq = int(self.index.document_indices[doc])
        if seq == self.index.num_sequences:
            return len(self.tokens)
        return int(self.index.sequence_pointers[seq]) // self.dtype.itemsize - self._first

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.document_start(i) : self.document_start(i + 1)]

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """Token offset of each document in `tokens`, plus the end: int64 [D + 1]."""
        seqs = np.asarray(self.index.document_indices)
        inner = seqs < self.index.num_sequences
        ptr = np.asarray(self.index.sequence_pointers)
        starts = np.full(len(seqs), len(self.tokens), dtype=np.int64)
        starts[inner] = ptr[seqs[inner]] // self.dtype.itemsize - self._first
        return starts


def verify_shard(stem: str | os.PathLike, record: dict) -> None:
    """Check a shard's files against its manifest record (sha256 of both files)."""
    stem = Path(stem)
    for suffix, key in ((BIN, "sha256"), (IDX, "idx_sha256")):
        path = shard_file(stem, suffix)
        if not path.is_file():
            raise DataError(f"shard file missing: {path}{_dangling(path)}")
        got = sha256_file(path)
        if got != record[key]:
            raise DataError(
                f"shard {path} is corrupted: sha256 {got[:12]}... does not match the "
                f"manifest's {record[key][:12]}...; delete it and re-run `tokenize` to rebuild"
            )
    ShardReader(stem, record.get("dtype"))  # the hashes match: is the layout a current one?


def check_shard_size(stem: str | os.PathLike, record: dict) -> None:
    """O(1): both files present, the index readable and its token count the record's."""
    reader = ShardReader(stem, record.get("dtype"))
    if reader.num_tokens != int(record["tokens"]):
        raise DataError(
            f"shard {reader.stem} holds {reader.num_tokens} tokens, the manifest says "
            f"{record['tokens']}: truncated or replaced"
        )


# -- the layout before 2026-12 -------------------------------------------------------------


def is_legacy_index(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC


def upgrade_legacy_index(stem: str | os.PathLike, record: dict) -> dict:
    """Rewrite a NumPy-offsets `.idx` as Megatron's, after checking it against its record
    and its .bin; returns the record's new `idx_sha256` and `dtype`. The .bin is untouched."""
    stem = Path(stem)
    idx_path = shard_file(stem, IDX)
    got = sha256_file(idx_path)
    if got != record.get("idx_sha256"):
        raise DataError(
            f"shard index {idx_path} does not match its manifest record (sha256 {got[:12]}...): "
            "damaged; rebuild the data directory"
        )
    try:
        offsets = np.load(idx_path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"shard index {idx_path} is damaged: {exc}") from None
    dtype = np.dtype(record["dtype"])
    if dtype == np.uint32:  # the same bytes for ids < 2**31; Megatron has no uint32 code
        dtype = np.dtype(np.int32)
    bin_tokens = shard_file(stem, BIN).stat().st_size // dtype.itemsize
    if offsets.ndim != 1 or not len(offsets) or int(offsets[-1]) != bin_tokens:
        raise DataError(f"shard index {idx_path} does not match {shard_file(stem, BIN)}")
    sha = write_index(idx_path, dtype, np.diff(np.asarray(offsets)))
    return {"idx_sha256": sha, "dtype": dtype.name}


# -- helpers ---------------------------------------------------------------------------------


def _dangling(path: Path) -> str:
    """Why a linked shard file is missing: its target moved (an imported source)."""
    if path.is_symlink():
        return f" (a link to {os.readlink(path)}, which has moved or is gone: put it back, or re-run import-megatron)"
    return ""


def _data_dir_of(path: Path) -> Path:
    """The data directory a shard file belongs to (the nearest parent with a manifest)."""
    for parent in path.parents:
        if (parent / "manifest.json").is_file() or (parent / "tokenizer_meta.json").is_file():
            return parent
    return path.parent
