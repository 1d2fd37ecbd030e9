"""Tokenise one input unit (one file / hub shard of one source) into packed shards.

Resumable at shard granularity: after each shard is published, the unit's fragment
(`parts/<label>/uNNNNN.json`) is rewritten atomically with the shards so far and the
number of input rows consumed. A re-run skips complete units and continues a partial one
from its last recorded row. Shard boundaries depend only on the rows, so the output is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import numpy as np

from data_prep.config import DataPrepConfig, SourceConfig
from data_prep.decontam import NgramIndex
from data_prep.loading import Document, SkippedRow, open_source
from data_prep.manifest import fragment_path, shard_relpath
from data_prep.shards import ShardWriter
from data_prep.tokenizer import TextTokenizer
from mop.errors import DataError
from mop.fileio import atomic_write_json, read_json, sha256_bytes

SPLITS = ("train", "val")


@dataclass
class UnitResult:
    label: str
    unit: int
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    decontaminated: int = 0
    resumed: bool = False
    already_done: bool = False
    seconds: float = 0.0


def is_heldout(label: str, unit: int, row: int, fraction: float) -> bool:
    """Deterministic held-out assignment from the document's identity alone (not order)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{label}/{unit}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


def output_fingerprint(cfg: DataPrepConfig, source: SourceConfig, tok: TextTokenizer) -> str:
    """Hash of everything that changes a unit's shards; a mismatch on resume is refused."""
    parts = [
        tok.hash,
        source.model_dump_json(exclude={"weight"}),
        cfg.shards.model_dump_json(exclude={"encode_batch_documents"}),
        repr(cfg.validation.fraction),
        cfg.decontamination.model_dump_json() if cfg.decontamination.enabled else "no-decontam",
    ]
    return sha256_bytes("\n".join(parts).encode())


def _new_state(source: SourceConfig, unit: int, fingerprint: str, tok: TextTokenizer) -> dict:
    return {
        "source": source.label,
        "registry": source.source,
        "unit": unit,
        "fingerprint": fingerprint,
        "tokenizer_sha256": tok.hash,
        "rows_consumed": 0,
        "next_shard": {s: 0 for s in SPLITS},
        "shards": [],
        "skipped": {},
        "decontaminated": 0,
        "complete": False,
    }


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(items, size)):
        yield batch


Pending = tuple[list, "Future | None"]  # a batch of items and the encode of its documents


def submit_encode(pool: Executor, batch: list, tok: TextTokenizer) -> Pending:
    texts = [it.text for it in batch if isinstance(it, Document)]
    return batch, pool.submit(tok.encode_batch, texts) if texts else None


def _resolved(pending: Pending) -> tuple[list, list[list[int]]]:
    batch, future = pending
    return batch, future.result() if future is not None else []


def encoded_batches(
    items: Iterator,
    size: int,
    tok: TextTokenizer,
    pool: Executor,
    first: Pending | None = None,
    on_all_submitted: Callable[[], None] | None = None,
) -> Iterator[tuple[list, list[list[int]]]]:
    """(batch of items, token ids of its documents), in input order.

    The tokenizer encodes one batch on `pool`'s thread while the caller packs the previous one
    and this generator reads the next: reading, rendering and packing are Python work that
    would otherwise leave the cores idle between encode calls (the tokenizer releases the GIL).
    `first`: a batch whose encode was submitted ahead (`open_unit`). `on_all_submitted` runs
    once every batch is submitted, while the last one encodes: the next unit opens then.
    Which rows land in which shard does not depend on timing: the bytes are the same.
    """
    ahead = first
    for batch in _batched(items, size):
        pending = submit_encode(pool, batch, tok)
        if ahead is not None:
            yield _resolved(ahead)
        ahead = pending
    if on_all_submitted is not None:
        on_all_submitted()
    if ahead is not None:
        yield _resolved(ahead)


@dataclass
class OpenedUnit:
    """A unit ready to tokenise: its result so far, its fragment state (None once complete),
    its remaining rows and, when opened ahead, the encode of its first batch in flight. An
    error met while opening ahead waits here to be raised when the unit's turn comes."""

    result: UnitResult
    state: dict | None = None
    items: Iterator | None = None
    first: Pending | None = None
    error: Exception | None = None
    started: float = field(default_factory=time.perf_counter)


def open_unit(
    cfg: DataPrepConfig,
    source: SourceConfig,
    unit: int,
    tok: TextTokenizer,
    pool: Executor | None = None,
) -> OpenedUnit:
    """Check the unit's fragment (resume, or refuse other settings) and open its rows; with
    `pool`, also read its first batch and submit that batch's encode."""
    opened = OpenedUnit(UnitResult(source.label, unit))
    try:
        _open(cfg, source, tok, opened)
        if pool is not None and opened.items is not None:
            first = next(_batched(opened.items, cfg.shards.encode_batch_documents), None)
            opened.first = submit_encode(pool, first, tok) if first else None
    except Exception as exc:  # raised by tokenize_unit at the unit's turn, not in another's
        if pool is None:
            raise
        opened.error = exc
    return opened


def _open(
    cfg: DataPrepConfig, source: SourceConfig, tok: TextTokenizer, opened: OpenedUnit
) -> None:
    out = Path(cfg.output_dir)
    label, unit, result = source.label, opened.result.unit, opened.result
    frag_path = fragment_path(out, label, unit)
    fingerprint = output_fingerprint(cfg, source, tok)
    state = read_json(frag_path) if frag_path.is_file() else None
    if state is not None:
        if state.get("tokenizer_sha256") != tok.hash:
            raise DataError(
                f"{frag_path} was written with tokenizer {state.get('tokenizer_sha256', '?')[:12]}..."
                f" but the output directory's tokenizer is {tok.hash[:12]}...: use a new output_dir"
            )
        if state.get("fingerprint") != fingerprint:
            raise DataError(
                f"{frag_path} was written with other settings (source, shard size, validation "
                "fraction or decontamination changed): use a new output_dir or delete it"
            )
        if state["complete"]:
            result.already_done = True
            _fill_totals(result, state)
            return
        result.resumed = state["rows_consumed"] > 0
    else:
        state = _new_state(source, unit, fingerprint, tok)
    _remove_stale_temporaries(out, label, unit)
    start_row = state["rows_consumed"]
    handle = open_source(source)
    opened.state = state
    opened.items = (it for it in handle.iter_unit(unit) if it.row >= start_row)


def tokenize_unit(
    cfg: DataPrepConfig,
    source: SourceConfig,
    unit: int,
    tok: TextTokenizer,
    decontam: NgramIndex | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    encoder: Executor | None = None,
    opened: OpenedUnit | None = None,
    open_next: Callable[[], None] | None = None,
) -> UnitResult:
    """Tokenise one unit, resuming from its fragment if a previous run was killed.

    `encoder`: a one-thread pool shared by the units of a task, with `opened` (this unit,
    opened ahead by `open_unit` with that pool) and `open_next` (called when this unit's last
    batch is submitted): the next unit opens and its first batch encodes while this one
    writes its last shard, so the encoder does not wait at unit boundaries."""
    if opened is None:
        opened = open_unit(cfg, source, unit, tok)
    if opened.error is not None:
        raise opened.error
    result = opened.result
    if result.already_done:
        return result
    if encoder is None:
        with ThreadPoolExecutor(1, thread_name_prefix="encode") as own:
            return _tokenize_opened(cfg, source, tok, decontam, on_progress, own, opened, None)
    return _tokenize_opened(cfg, source, tok, decontam, on_progress, encoder, opened, open_next)


def _tokenize_opened(
    cfg: DataPrepConfig,
    source: SourceConfig,
    tok: TextTokenizer,
    decontam: NgramIndex | None,
    on_progress: Callable[[int, int], None] | None,
    encoder: Executor,
    opened: OpenedUnit,
    open_next: Callable[[], None] | None,
) -> UnitResult:
    out = Path(cfg.output_dir)
    label, unit, result = source.label, opened.result.unit, opened.result
    frag_path = fragment_path(out, label, unit)
    state = opened.state
    assert state is not None and opened.items is not None
    skipped = Counter(state["skipped"])
    writers: dict[str, ShardWriter] = {}
    start_row = state["rows_consumed"]

    def checkpoint(rows_consumed: int, complete: bool) -> None:
        for split in SPLITS:
            writer = writers.pop(split, None)
            if writer is None:
                continue
            record = writer.finish()
            k = state["next_shard"][split]
            state["shards"].append(
                {
                    **record,
                    "path": shard_relpath(label, split, unit, k),
                    "source": label,
                    "split": split,
                    "unit": unit,
                }
            )
            state["next_shard"][split] = k + 1
        state["rows_consumed"] = rows_consumed
        state["skipped"] = dict(sorted(skipped.items()))
        state["complete"] = complete
        atomic_write_json(frag_path, state)

    def writer_for(split: str) -> ShardWriter:
        if split not in writers:
            k = state["next_shard"][split]
            writers[split] = ShardWriter(
                out / shard_relpath(label, split, unit, k), tok.token_dtype
            )
        return writers[split]

    last_row = start_row - 1
    # Documents wait here per split and reach their writer in one add_batch per encode
    # batch (or earlier, when a shard fills): same bytes as one add() per document.
    pending: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    pending_tokens = dict.fromkeys(SPLITS, 0)

    def flush() -> None:
        for split in SPLITS:
            docs = pending[split]
            if not docs:
                continue
            lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
            flat = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
            writer_for(split).add_batch(flat, lengths)
            docs.clear()
            pending_tokens[split] = 0

    try:
        batches = encoded_batches(
            opened.items,
            cfg.shards.encode_batch_documents,
            tok,
            encoder,
            first=opened.first,
            on_all_submitted=open_next,
        )
        for batch, ids_of_docs in batches:
            encoded = iter(ids_of_docs)
            batch_tokens = 0
            for item in batch:
                last_row = item.row
                if isinstance(item, SkippedRow):
                    skipped[item.reason] += 1
                    continue
                ids = next(encoded)
                if decontam is not None and decontam.contaminated(ids):
                    state["decontaminated"] += 1
                    continue
                ids.append(tok.eos_id)
                heldout = is_heldout(label, unit, item.row, cfg.validation.fraction)
                split = "val" if heldout else "train"
                pending[split].append(ids)
                pending_tokens[split] += len(ids)
                batch_tokens += len(ids)
                written = writers[split].num_tokens if split in writers else 0
                if written + pending_tokens[split] >= cfg.shards.max_tokens:
                    flush()
                    checkpoint(item.row + 1, complete=False)
            flush()
            if on_progress is not None:
                on_progress(len(ids_of_docs), batch_tokens)
        checkpoint(last_row + 1, complete=True)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    _fill_totals(result, state)
    result.seconds = time.perf_counter() - opened.started
    return result


def _fill_totals(result: UnitResult, state: dict) -> None:
    # train and held-out shards together: everything this unit wrote
    result.documents = sum(s["documents"] for s in state["shards"])
    result.tokens = sum(s["tokens"] for s in state["shards"])
    result.skipped = Counter(state["skipped"])
    result.decontaminated = state["decontaminated"]


def _remove_stale_temporaries(out: Path, label: str, unit: int) -> None:
    """Temporaries of a killed run are garbage; published shards are overwritten identically."""
    for split in SPLITS:
        d = out / "shards" / label / split
        if d.is_dir():
            for tmp in d.glob(f".u{unit:05d}-*.tmp"):
                tmp.unlink(missing_ok=True)
