"""Common output of the text synthetic tasks: jsonl text, token shards and a manifest.

Layout of an output directory DIR (phone-book and shortest path):

    DIR/config.json              task, size, seed, every parameter, format version
    DIR/train.jsonl, test.jsonl  one example a line: `prompt`, `answer`, `text` (= prompt +
                                 answer); test lines add `prompt_tokens` and task fields
    DIR/tokenizer.json           char-level tokenizer over the task's alphabet
    DIR/tokenizer_meta.json      its sha256, EOS id, vocab size, token dtype
    DIR/shards/{train,test}/part-NNNNN.bin/.idx
                                 one document per example (`text` + EOS); a new shard is
                                 started before a document would push it past
                                 `shard_tokens` (documents are never split)
    DIR/shards/test/prompt_lengths.npy
                                 int64 [num_test]: tokens of each test document's prompt, so
                                 eval feeds `doc[:k]` and scores `doc[k:-1]` (the answer)
    DIR/manifest.json            written last: {"format": "mop-shards-v1", "tokenizer": ...,
                                 "shards": [record + path/source/split], "task": {...}}
                                 `task.train_packing` ("document", phone-book) tells
                                 `python -m pretrain` (data.packing=auto) to train one
                                 document per sample at position 0 instead of packing

Every file goes through a temporary and an atomic rename, and a run first deletes an old
manifest.json, so a killed run never leaves a directory that looks complete. Nothing
depends on time, worker count or file-system order: equal arguments give equal bytes.

Encoding: the tokenizer is `char_tokenizer(alphabet)`, one token per character, so instead
of calling it per document we map bytes through a lookup table built from the tokenizer
itself (and cross-check a sample of documents against `encode_batch`); this is what makes a
3e6-entry phone book take seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.shards import ShardWriter
from data_prep.tokenizer import HF_FILE, TextTokenizer
from mop.errors import DataError
from mop.fileio import atomic_path, atomic_write_json, read_json

SHARD_FORMAT = "mop-shards-v1"  # same manifest shape as the main tokenize/merge pipeline
SYNTHETIC_FORMAT_VERSION = 1  # bump when the text format or layout of a task changes
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SHARD_TOKENS = 50_000_000  # as data_prep ShardConfig.max_tokens
MANIFEST = "manifest.json"
CONFIG = "config.json"
PROMPT_LENGTHS = "prompt_lengths.npy"
SPLITS = ("train", "test")


def jsonl_line(row: dict[str, Any]) -> str:
    """One compact jsonl line with sorted keys (so equal rows give equal bytes)."""
    return json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n"


class CharEncoder:
    """Vectorised encoder for a char-level tokenizer: byte -> token id through a table."""

    def __init__(self, tok: TextTokenizer, alphabet: str):
        self.tok = tok
        self.eos_id = int(tok.eos_id)
        self.dtype = np.dtype(tok.token_dtype)
        self.lut = np.full(256, -1, dtype=np.int64)
        for ch in sorted(set(alphabet)):
            raw = ch.encode("utf-8")
            if len(raw) != 1 or ch in '"\\' or not ch.isprintable():
                # The fast paths build jsonl lines by template, which needs JSON-safe ASCII.
                raise ValueError(f"alphabet character {ch!r} is not printable JSON-safe ASCII")
            ids = tok.encode(ch)
            if len(ids) != 1:
                raise DataError(f"tokenizer maps {ch!r} to {len(ids)} tokens, expected 1")
            self.lut[raw[0]] = ids[0]
        self._checked = False

    def encode_chars(self, chars: np.ndarray) -> np.ndarray:
        """Token ids of a uint8 array of characters (any shape); refuses unknown bytes."""
        ids = self.lut[chars]
        if (ids < 0).any():
            bad = bytes([int(chars[ids < 0].flat[0])]).decode("latin-1")
            raise DataError(f"character {bad!r} is not in the task alphabet")
        return ids

    def encode_fixed(self, chars: np.ndarray) -> np.ndarray:
        """[docs, width] uint8 characters -> [docs, width + 1] token ids ending in EOS."""
        ids = np.empty((chars.shape[0], chars.shape[1] + 1), dtype=self.dtype)
        ids[:, :-1] = self.encode_chars(chars)
        ids[:, -1] = self.eos_id
        self._check([bytes(r).decode("ascii") for r in chars[:4]], ids[:4, :-1].tolist())
        return ids

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Documents -> (flat token ids with EOS after each, tokens per document incl. EOS)."""
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        chars = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8)
        doc_lengths = lengths + 1
        ends = np.cumsum(doc_lengths) - 1
        flat = np.empty(int(doc_lengths.sum()), dtype=self.dtype)
        is_text = np.ones(flat.size, dtype=bool)
        is_text[ends] = False
        flat[is_text] = self.encode_chars(chars)
        flat[ends] = self.eos_id
        starts = ends - lengths
        self._check(texts[:4], [flat[s:e].tolist() for s, e in zip(starts[:4], ends[:4])])
        return flat, doc_lengths

    def _check(self, texts: Sequence[str], ids: list[list[int]]) -> None:
        # Guard the lookup-table shortcut against the real tokenizer once per run.
        if self._checked or not texts:
            return
        if self.tok.encode_batch(list(texts)) != ids:
            raise DataError("char lookup table disagrees with the tokenizer's encode_batch")
        self._checked = True


class SplitWriter:
    """Streams one split: `<split>.jsonl`, shards under shards/<split>/, prompt lengths."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        dtype: np.dtype,
        source: str,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        with_prompt_lengths: bool = False,
    ):
        self.out_dir, self.split, self.source = Path(out_dir), split, source
        self.dtype, self.shard_tokens = np.dtype(dtype), int(shard_tokens)
        self.shard_dir = self.out_dir / "shards" / split
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl_ctx = atomic_path(self.out_dir / f"{split}.jsonl")
        self._jsonl_fh = open(self._jsonl_ctx.__enter__(), "wb")  # noqa: SIM115 - finish/abort
        self._shard: ShardWriter | None = None
        self.records: list[dict] = []
        self._prompt_lengths: list[np.ndarray] | None = [] if with_prompt_lengths else None
        self.num_documents = 0

    def add(
        self,
        jsonl: bytes,
        flat: np.ndarray,
        doc_lengths: np.ndarray,
        prompt_lengths: np.ndarray | None = None,
    ) -> None:
        """A batch of examples: their jsonl bytes and their tokens (each doc ending in EOS)."""
        self._jsonl_fh.write(jsonl)
        if self._prompt_lengths is not None:
            if prompt_lengths is None or len(prompt_lengths) != len(doc_lengths):
                raise ValueError("prompt_lengths must be given for every document")
            self._prompt_lengths.append(np.asarray(prompt_lengths, dtype=np.int64))
        self.num_documents += len(doc_lengths)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        while len(doc_lengths):
            if self._shard is None:
                stem = self.shard_dir / f"part-{len(self.records):05d}"
                self._shard = ShardWriter(stem, self.dtype)
            room = self.shard_tokens - self._shard.num_tokens
            fit = int(np.searchsorted(np.cumsum(doc_lengths), room, side="right"))
            if fit == 0 and self._shard.num_tokens == 0:
                fit = 1  # a document longer than a whole shard gets a shard of its own
            if fit == 0:
                self._close_shard()
                continue
            cut = int(doc_lengths[:fit].sum())
            self._shard.add_batch(flat[:cut], doc_lengths[:fit])
            flat, doc_lengths = flat[cut:], doc_lengths[fit:]

    def _close_shard(self) -> None:
        assert self._shard is not None
        record = self._shard.finish()
        rel = self._shard.stem.relative_to(self.out_dir).as_posix()
        self.records.append({**record, "path": rel, "source": self.source, "split": self.split})
        self._shard = None

    def finish(self) -> list[dict]:
        if self._shard is not None and self._shard.num_documents:
            self._close_shard()
        self._jsonl_fh.close()
        self._jsonl_ctx.__exit__(None, None, None)
        if self._prompt_lengths is not None:
            lengths = np.concatenate(self._prompt_lengths or [np.zeros(0, np.int64)])
            with atomic_path(self.shard_dir / PROMPT_LENGTHS) as tmp, open(tmp, "wb") as fh:
                np.save(fh, lengths)
        return self.records

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
        self._jsonl_fh.close()
        err = RuntimeError("split aborted")
        with contextlib.suppress(RuntimeError):  # the context re-raises what it is handed
            self._jsonl_ctx.__exit__(type(err), err, None)


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create DIR and drop an old manifest first: it must never vouch for half-new files."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    return out


def _remove_stale_shards(out_dir: Path, records: list[dict]) -> None:
    # A previous run with a larger size may have left more parts behind; drop them so the
    # directory holds exactly what the manifest lists.
    keep = {r["path"] for r in records}
    for split in SPLITS:
        for path in sorted((out_dir / "shards" / split).glob("part-*")):
            rel = path.relative_to(out_dir).with_suffix("").as_posix()
            if path.suffix in (".bin", ".idx") and rel not in keep:
                path.unlink()


def finish_text_task(
    out_dir: Path,
    task: str,
    config: dict[str, Any],
    tok: TextTokenizer,
    records: list[dict],
    train_packing: str | None = None,
) -> dict:
    """Write tokenizer files and config.json, then the manifest (last, as the commit mark).

    `train_packing` ("document" or None) is the manifest's hint to the trainer (see above)."""
    target = tok.save(out_dir)
    atomic_write_json(out_dir / CONFIG, config)
    _remove_stale_shards(out_dir, records)
    manifest = {
        "format": SHARD_FORMAT,
        "tokenizer": {**tok.meta(), "file": target.name},
        "shards": records,
        "task": {
            "name": task,
            "config": config,
            "test_jsonl": "test.jsonl",
            "train_jsonl": "train.jsonl",
            "test_prompt_lengths": f"shards/test/{PROMPT_LENGTHS}",
            **({"train_packing": train_packing} if train_packing else {}),
        },
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def write_text_task(
    out_dir: str | os.PathLike,
    task: str,
    config: dict[str, Any],
    tok: TextTokenizer,
    batches: dict[str, Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray | None]]],
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    train_packing: str | None = None,
) -> dict:
    """Drive both splits from batch iterators, then finish the task; returns the manifest.

    Each batch is (jsonl bytes, flat tokens, doc lengths, prompt lengths or None); test
    batches must carry prompt lengths.
    """
    out = prepare_out_dir(out_dir)
    records: list[dict] = []
    for split in SPLITS:
        writer = SplitWriter(
            out, split, tok.token_dtype, task, shard_tokens, with_prompt_lengths=split == "test"
        )
        try:
            for jsonl, flat, doc_lengths, prompt_lengths in batches[split]:
                writer.add(jsonl, flat, doc_lengths, prompt_lengths)
        except BaseException:
            writer.abort()
            raise
        records += writer.finish()
    return finish_text_task(out, task, config, tok, records, train_packing)


# -- reading (for eval and tests) ---------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_task_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a finished synthetic task directory (refuses an unfinished one)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{out_dir} has no {MANIFEST}: the synthetic run did not finish")
    return read_json(path)


def load_test_set(out_dir: str | os.PathLike) -> list[dict]:
    """Test examples of a finished text task: dicts with prompt, answer, text, prompt_tokens."""
    load_task_manifest(out_dir)
    return read_jsonl(Path(out_dir) / "test.jsonl")


def load_prompt_lengths(out_dir: str | os.PathLike) -> np.ndarray:
    return np.load(Path(out_dir) / "shards" / "test" / PROMPT_LENGTHS)


def tokenizer_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / HF_FILE
