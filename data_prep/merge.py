"""Merge step: per-unit fragments -> global manifest, mixture plan, validation sequences.

Run once after all tokenize tasks (a single-task `tokenize` runs it by itself). It
refuses to publish a manifest while any unit is missing or incomplete, and (by default)
re-checks every shard's sha256 against its fragment.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.config import DataPrepConfig
from data_prep.manifest import FORMAT, PLAN, fragment_path, write_manifest
from data_prep.mixture import plan_mixture
from data_prep.pipeline import list_work
from data_prep.shards import ShardReader, verify_shard
from data_prep.tokenizer import load_tokenizer_dir
from data_prep.validation import allocate, write_validation
from mop.errors import DataError
from mop.fileio import atomic_write_json, read_json
from mop.progress import progress


def merge(cfg: DataPrepConfig, verify: bool = True) -> dict:
    out = Path(cfg.output_dir)
    tok = load_tokenizer_dir(out)
    work = list_work(cfg)
    fragments, missing = [], []
    for item in work:
        path = fragment_path(out, item.label, item.unit)
        frag = read_json(path) if path.is_file() else None
        if frag is None or not frag.get("complete"):
            missing.append(f"{item.label}/u{item.unit:05d}")
            continue
        if frag["tokenizer_sha256"] != tok.hash:
            raise DataError(
                f"{path} was made with another tokenizer; re-tokenize into a new output_dir"
            )
        fragments.append(frag)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise DataError(
            f"{len(missing)} of {len(work)} unit(s) not finished: {shown}; re-run the tokenize "
            "task(s) that own them (finished units are skipped)"
        )
    shards = [s for frag in fragments for s in frag["shards"]]
    if verify:
        for rec in progress(shards, desc="verify", unit="shard"):
            verify_shard(out / rec["path"], rec)

    per_source: dict[str, dict] = {}
    for src in cfg.sources:
        frags = [f for f in fragments if f["source"] == src.label]
        skipped: Counter = Counter()
        for f in frags:
            skipped.update(f["skipped"])
        entry = {"source": src.source, "weight": src.weight, "units": len(frags)}
        for split in ("train", "val"):
            mine = [s for f in frags for s in f["shards"] if s["split"] == split]
            entry[f"{split}_tokens"] = sum(s["tokens"] for s in mine)
            entry[f"{split}_documents"] = sum(s["documents"] for s in mine)
        entry["rows_skipped"] = dict(sorted(skipped.items()))
        entry["decontaminated"] = sum(f["decontaminated"] for f in frags)
        per_source[src.label] = entry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_mixture(cfg, {k: v["train_tokens"] for k, v in per_source.items()})
    for w in caught:
        print(f"[merge] warning: {w.message}")
    atomic_write_json(out / PLAN, plan)

    validation = build_validation(cfg, out, shards, tok.token_dtype)
    manifest = {
        "format": FORMAT,
        "tokenizer": tok.meta(),
        "sources": per_source,
        "shards": shards,
        "mixture_plan": PLAN,
        "validation": validation,
    }
    write_manifest(out, manifest)
    n_train = sum(v["train_tokens"] for v in per_source.values())
    print(
        f"[merge] {len(shards)} shard(s), {n_train:,} training tokens from {len(per_source)} "
        f"source(s); validation {validation['num_sequences']} x {validation['seq_len']} tokens"
    )
    return manifest


def build_validation(cfg: DataPrepConfig, out: Path, shards: list[dict], dtype) -> dict:
    """Fixed validation sequences cut from the held-out documents, mixed by source weight."""

    def heldout(label: str):
        for rec in (s for s in shards if s["source"] == label and s["split"] == "val"):
            yield np.asarray(ShardReader(out / rec["path"], rec["dtype"]).tokens)

    labels = [s.label for s in cfg.sources]
    wanted = allocate(cfg.validation.num_sequences, [s.weight for s in cfg.sources])
    chunks = {label: heldout(label) for label in labels}
    return write_validation(out, dtype, cfg.validation.seq_len, dict(zip(labels, wanted)), chunks)
