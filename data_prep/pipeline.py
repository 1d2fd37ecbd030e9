"""Orchestration of the tokenizer and tokenize stages on one machine or a SLURM array.

Work is a list of (source, unit) pairs in config order; array task i of n takes every
n-th pair starting at i, so the split is deterministic and needs no coordination. Within
a task, units run in a process pool (`workers`); each unit resumes on its own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

from data_prep.config import DataPrepConfig
from data_prep.decontam import NgramIndex, build_index, iter_eval_texts
from data_prep.loading import Document, open_source
from data_prep.manifest import MANIFEST
from data_prep.pack import OpenedUnit, UnitResult, open_unit, tokenize_unit
from data_prep.tokenizer import (
    META_FILE,
    TextTokenizer,
    load_tokenizer_dir,
    train_bpe,
    train_sentencepiece,
)
from mop.config import save_resolved
from mop.errors import ConfigError, DataError
from mop.fileio import atomic_write_json, read_json
from mop.progress import eta, fmt_duration, progress, say

DECONTAM_INDEX = "decontam_ngrams.npy"


@dataclass(frozen=True)
class WorkItem:
    source_index: int
    label: str
    unit: int


def array_task_from_env() -> tuple[int, int]:
    """(task index, task count) of a SLURM array job, 0-based even for `--array=1-8`."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    task_id = int(os.environ["SLURM_ARRAY_TASK_ID"])
    task_min = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    return task_id - task_min, count


def list_work(cfg: DataPrepConfig) -> list[WorkItem]:
    items = []
    for i, src in enumerate(cfg.sources):
        handle = open_source(src)
        items.extend(WorkItem(i, src.label, u) for u in range(handle.num_units))
    return items


def split_work(items: list[WorkItem], task_index: int, num_tasks: int) -> list[WorkItem]:
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ConfigError(
            f"--task-index {task_index} must be in [0, --num-tasks) with --num-tasks {num_tasks} >= 1"
        )
    return items[task_index::num_tasks]


# -- tokenizer stage --------------------------------------------------------------------------


def sample_mixture_texts(cfg: DataPrepConfig, n_documents: int) -> list[str]:
    """Deterministic sample: each source's share of `n_documents` by weight, from its start."""
    total_weight = sum(s.weight for s in cfg.sources) or 1.0
    texts: list[str] = []
    for src in cfg.sources:
        want = max(1, round(n_documents * src.weight / total_weight)) if src.weight > 0 else 0
        handle = open_source(src)
        got = 0
        for unit in range(handle.num_units):
            docs = (it.text for it in handle.iter_unit(unit) if isinstance(it, Document))
            chunk = list(islice(docs, want - got))
            texts.extend(chunk)
            got += len(chunk)
            if got >= want:
                break
    if not texts:
        raise DataError("no documents found in the configured sources to train a tokenizer on")
    return texts


def run_tokenizer_stage(cfg: DataPrepConfig) -> TextTokenizer:
    out = Path(cfg.output_dir)
    tcfg = cfg.tokenizer
    if tcfg.kind == "pretrained":
        tok = TextTokenizer(tcfg.path, eos_token=tcfg.eos_token)
    else:
        t0 = time.perf_counter()
        texts = sample_mixture_texts(cfg, tcfg.sample_documents)
        print(
            f"[tokenizer] training {tcfg.kind} (vocab {tcfg.vocab_size}) on {len(texts)} documents"
        )
        trainer = train_bpe if tcfg.kind == "bpe" else train_sentencepiece
        kwargs = {"min_frequency": tcfg.min_frequency} if tcfg.kind == "bpe" else {}
        tok = trainer(texts, tcfg.vocab_size, eos_token=tcfg.eos_token, **kwargs)
        print(f"[tokenizer] trained in {time.perf_counter() - t0:.1f}s")
    _refuse_other_tokenizer(out, tok)
    tok.save(out)
    save_resolved(cfg, out / "config.yaml")
    print(
        f"[tokenizer] {tok.kind}, vocab {tok.vocab_size}, eos {tok.eos_token!r}={tok.eos_id}, "
        f"sha256 {tok.hash[:16]}... -> {out}"
    )
    return tok


def _refuse_other_tokenizer(out: Path, tok: TextTokenizer) -> None:
    meta = out / META_FILE
    if not meta.is_file():
        return
    old = read_json(meta)["sha256"]
    has_shards = (out / "parts").is_dir() and any((out / "parts").rglob("*.json"))
    if old != tok.hash and (has_shards or (out / MANIFEST).is_file()):
        raise DataError(
            f"{out} holds shards of another tokenizer ({old[:12]}..., new {tok.hash[:12]}...): "
            "choose a new output_dir or delete the old one"
        )


# -- tokenize stage ---------------------------------------------------------------------------


def prepare_decontamination(cfg: DataPrepConfig, tok: TextTokenizer) -> NgramIndex | None:
    dcfg = cfg.decontamination
    if not dcfg.enabled:
        return None
    if not dcfg.eval_files:
        raise ConfigError("decontamination.enabled needs decontamination.eval_files")
    index = build_index(
        iter_eval_texts(dcfg.eval_files, dcfg.eval_fields), tok.encode_batch, dcfg.ngram
    )
    print(
        f"[decontam] {index.hashes.size} distinct {dcfg.ngram}-grams from {len(dcfg.eval_files)} file(s)"
    )
    return index


def _worker_init(out_dir: str, decontam_path: str | None) -> None:
    global _W_TOK, _W_DECONTAM
    _W_TOK = load_tokenizer_dir(out_dir)
    _W_DECONTAM = NgramIndex.load(decontam_path) if decontam_path else None


def _worker_run(args: tuple[DataPrepConfig, int, int]) -> UnitResult:
    cfg, source_index, unit = args
    return tokenize_unit(cfg, cfg.sources[source_index], unit, _W_TOK, _W_DECONTAM)


def tokenize_in_turn(
    cfg: DataPrepConfig,
    items: list[WorkItem],
    tok: TextTokenizer,
    decontam: NgramIndex | None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[UnitResult]:
    """The units one after another in this process, with one encoder thread for all: while a
    unit's last batch encodes, the next unit is opened and its first batch submitted, so the
    encoder does not wait while a unit writes its last shard and the next file opens (~50 ms
    per unit boundary, 5% of a 20,000-document bench pass in 5,000-document units)."""
    with ThreadPoolExecutor(1, thread_name_prefix="encode") as encoder:
        opened: OpenedUnit | None = None
        for i, item in enumerate(items):
            ahead: list[OpenedUnit] = []
            nxt = items[i + 1] if i + 1 < len(items) else None
            open_next = partial(_open_ahead, ahead, cfg, nxt, tok, encoder) if nxt else None
            src = cfg.sources[item.source_index]
            yield tokenize_unit(
                cfg,
                src,
                item.unit,
                tok,
                decontam,
                on_progress=on_progress,
                encoder=encoder,
                opened=opened,
                open_next=open_next,
            )
            opened = ahead[0] if ahead else None


def _open_ahead(
    into: list[OpenedUnit],
    cfg: DataPrepConfig,
    item: WorkItem,
    tok: TextTokenizer,
    encoder: ThreadPoolExecutor,
) -> None:
    into.append(open_unit(cfg, cfg.sources[item.source_index], item.unit, tok, encoder))


def run_tokenize_task(
    cfg: DataPrepConfig, task_index: int = 0, num_tasks: int = 1, workers: int | None = None
) -> dict:
    """Tokenise this task's share of the units; returns (and logs) the summary."""
    out = Path(cfg.output_dir)
    tok = load_tokenizer_dir(out)
    items = split_work(list_work(cfg), task_index, num_tasks)
    workers = min(workers or cfg.workers, max(1, len(items)))
    decontam = prepare_decontamination(cfg, tok)
    t0 = time.perf_counter()
    results: list[UnitResult] = []
    print(f"[tokenize] task {task_index}/{num_tasks}: {len(items)} unit(s), {workers} worker(s)")
    if workers == 1:
        with progress(desc="tokenize", unit="doc") as bar:

            def tick(docs: int, tokens: int) -> None:
                bar.update(docs)
                bar.set_postfix_str(f"{tokens_done[0] + tokens:,} tok", refresh=False)
                tokens_done[0] += tokens

            tokens_done = [0]
            for res in tokenize_in_turn(cfg, items, tok, decontam, on_progress=tick):
                results.append(res)
                say(unit_line(res, len(results), len(items), time.perf_counter() - t0))
    else:
        decontam_path = None
        if decontam is not None:
            decontam_path = str(out / DECONTAM_INDEX)
            decontam.save(decontam_path)
        ctx = mp.get_context("spawn")  # fork after tokenizers' thread pool started is unsafe
        args = [(cfg, it.source_index, it.unit) for it in items]
        with (
            ctx.Pool(workers, initializer=_worker_init, initargs=(str(out), decontam_path)) as pool,
            progress(total=len(items), desc="tokenize", unit="unit") as bar,
        ):
            for res in pool.imap_unordered(_worker_run, args):
                results.append(res)
                bar.update(1)
                say(unit_line(res, len(results), len(items), time.perf_counter() - t0))
    summary = summarize(results, time.perf_counter() - t0, task_index, num_tasks)
    atomic_write_json(
        out / "logs" / f"tokenize-task{task_index:05d}-of-{num_tasks:05d}.json", summary
    )
    # Only a finished task replaces config.yaml: a failed one leaves the previous config in place.
    save_resolved(cfg, out / "config.yaml")
    print_summary(summary)
    return summary


def unit_line(res: UnitResult, done: int, total: int, elapsed: float) -> str:
    """One finished unit: rows/s and tokens/s of the unit, ETA of the task at the rate so far."""
    head = f"[tokenize] unit {done}/{total} {res.label}/u{res.unit:05d}"
    left = f"ETA {fmt_duration(eta(done, total, elapsed))}"
    if res.already_done:
        return f"{head}: already done; {left}"
    rows = res.documents + sum(res.skipped.values())
    secs = max(res.seconds, 1e-9)
    return (
        f"{head}: {rows:,} rows, {res.tokens:,} tokens in {fmt_duration(res.seconds)} "
        f"({rows / secs:,.0f} rows/s, {res.tokens / secs:,.0f} tokens/s"
        f"{', resumed' if res.resumed else ''}); {left}"
    )


def summarize(results: list[UnitResult], seconds: float, task_index: int, num_tasks: int) -> dict:
    skipped: Counter = Counter()
    for r in results:
        skipped.update(r.skipped)
    fresh = [r for r in results if not r.already_done]
    new_tokens = sum(r.tokens for r in fresh)
    return {
        "task_index": task_index,
        "num_tasks": num_tasks,
        "units": len(results),
        "units_already_done": len(results) - len(fresh),
        "units_resumed": sum(r.resumed for r in results),
        "documents": sum(r.documents for r in results),
        "tokens": sum(r.tokens for r in results),
        "tokens_this_run": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 else 0.0,
        "rows_skipped": dict(sorted(skipped.items())),
        "decontaminated": {
            label: sum(r.decontaminated for r in results if r.label == label)
            for label in sorted({r.label for r in results})
        },
    }


def print_summary(summary: dict) -> None:
    print(
        f"[tokenize] done: {summary['units']} unit(s) ({summary['units_already_done']} already done, "
        f"{summary['units_resumed']} resumed), {summary['documents']:,} documents, "
        f"{summary['tokens']:,} tokens, {summary['tokens_per_second']:,.0f} tokens/s this run"
    )
    if summary["rows_skipped"]:
        print(f"[tokenize] rows skipped: {json.dumps(summary['rows_skipped'])}")
    if any(summary["decontaminated"].values()):
        print(
            f"[tokenize] documents dropped by decontamination: {json.dumps(summary['decontaminated'])}"
        )
    sys.stdout.flush()
