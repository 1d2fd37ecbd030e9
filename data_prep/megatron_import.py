"""`python -m data_prep import-megatron`: train here on data tokenized for Megatron-LM or NeoX.

Each `--prefix P` (`P.bin` + `P.idx`, as Megatron-LM's and GPT-NeoX's `preprocess_data.py`
write them) becomes one source of the output directory, which `python -m pretrain ...
data.data_dir=DIR` then trains on like any merged directory (a mixture when there are
several prefixes). Every check comes before anything is written:

1. the tokenizer (tokenizer.json or a SentencePiece .model) loads, and `--out` is new, empty or
   an earlier import made with the same tokenizer (another tokenizer's data is refused);
2. each index is read and checked in full (`shards.check_structure`: header, sizes, sequences
   back to back inside the .bin, document indices in order), and the .bin is read once:
   its sha256 and every token id against the tokenizer's vocabulary.

Held-out data, as `merge` does it: the last documents of each source, as many as its share of
`--validation-sequences` x `--validation-seq-len` tokens needs (at most a tenth of the
source), are concatenated and cut into `validation/sequences.{bin,idx}` (a copy: small).
Training never sees them: the source's train index, written here, lists the documents before
them, over the whole .bin.

The .bin is never copied. It is hard-linked into `shards/<source>/train/` (the same inode: no
space, and moving or deleting the original later changes nothing here; rewriting the original
in place changes both, which `python -m data_prep verify` catches by sha256). Where a hard
link cannot be made (another file system, or not permitted) it is a symbolic link to the
absolute path: a reference, so if the original moves, opening the shard fails with one line
naming the link's target (put it back, or import again). The manifest's source entry records
which (`imported.link`).

The directory is built beside `--out` under a temporary name and renamed into place at the
end, so a failure or a kill leaves `--out` as it was; rerunning the same command gives the
same bytes.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import FORMAT, MANIFEST, PLAN, shard_relpath, write_manifest
from data_prep.mixture import plan_shares
from data_prep.shards import BIN, IDX, ShardReader, check_structure, shard_file, write_index
from data_prep.tokenizer import META_FILE, TextTokenizer
from data_prep.validation import allocate, write_validation
from mop.errors import ConfigError, DataError
from mop.fileio import atomic_write_json, read_json, sha256_file
from mop.progress import progress

IMPORT_MARK = "import-megatron"  # manifest["imported_with"]: a directory this command wrote
MAX_HELDOUT = 0.1  # at most this share of a source's tokens goes to validation
_SCAN_BYTES = 64 << 20


@dataclass
class Source:
    label: str
    prefix: Path
    reader: ShardReader  # over the whole prefix
    train_docs: int = 0
    train_tokens: int = 0
    bin_sha256: str = ""
    train_max_id: int = -1


def source_labels(prefixes: list[str], names: list[str] | None) -> list[str]:
    """`--source` names, else each prefix's file name; must be unique and path-safe."""
    if names is not None and len(names) != len(prefixes):
        raise ConfigError(
            f"--source names {len(names)} source(s) for {len(prefixes)} --prefix; give one "
            "name per prefix, in the same order"
        )
    labels = names or [prefix_path(p).name for p in prefixes]
    for label in labels:
        if not label or "/" in label or label.startswith("."):
            raise ConfigError(f"--source {label!r}: a source name is a plain file name")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"source names must be unique; repeated: {dupes} (name them: --source)")
    return labels


def check_out_dir(out: Path, tok: TextTokenizer) -> None:
    """`--out` must be new, empty, or an earlier import with this tokenizer."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a directory")
    if not any(out.iterdir()):
        return
    meta = out / META_FILE
    if meta.is_file():
        old = read_json(meta).get("sha256", "?")
        if old != tok.hash:
            raise DataError(
                f"--out {out} holds data of another tokenizer ({str(old)[:12]}..., this one "
                f"{tok.hash[:12]}...): choose a new --out or delete the old directory"
            )
    manifest = out / MANIFEST
    if not (manifest.is_file() and read_json(manifest).get("imported_with") == IMPORT_MARK):
        raise DataError(
            f"--out {out} is not empty and not an earlier import-megatron output: choose a new "
            "--out (an import never mixes with a tokenize or synthetic directory)"
        )


def prefix_path(prefix: str) -> Path:
    """The absolute prefix; `x.bin` or `x.idx` named instead of `x` is taken as `x`."""
    p = Path(prefix).absolute()
    if p.suffix in (BIN, IDX) and p.is_file():
        p = p.with_suffix("")
    return p


def open_source(label: str, prefix: str) -> Source:
    """Open one Megatron prefix and check its index in full against its .bin."""
    p = prefix_path(prefix)
    for suffix in (BIN, IDX):
        if not shard_file(p, suffix).is_file():
            raise DataError(f"--prefix {prefix}: {p.name + suffix} not found in {p.parent}")
    reader = ShardReader(p)
    bin_bytes = shard_file(p, BIN).stat().st_size
    check_structure(reader.index, bin_bytes)
    if reader.index.num_sequences and reader.index.token_span()[0] != 0:
        raise DataError(f"--prefix {prefix}: the first sequence does not start at byte 0")
    if reader.num_tokens != bin_bytes // reader.dtype.itemsize:
        raise DataError(
            f"--prefix {prefix}: the index covers {reader.num_tokens} tokens but "
            f"{p.name}.bin holds more (trailing data or mismatched files)"
        )
    if not len(reader):
        raise DataError(f"--prefix {prefix} holds no documents")
    return Source(label, p, reader)


def choose_heldout(src: Source, want_tokens: int) -> None:
    """Train on the documents before the held-out tail (whole documents, from the end)."""
    total, docs = src.reader.num_tokens, len(src.reader)
    want = min(want_tokens, int(total * MAX_HELDOUT))
    # the last document boundary with at least `want` tokens after it
    k = bisect.bisect_right(range(docs + 1), total - want, key=src.reader.document_start) - 1
    if want_tokens == 0:
        k = docs
    if k < 1:
        raise DataError(
            f"source {src.label!r} has {docs} document(s): none left to train on after holding "
            "out validation tokens; lower --validation-sequences"
        )
    src.train_docs, src.train_tokens = k, src.reader.document_start(k)


def scan(src: Source, vocab_size: int, bar) -> None:
    """One pass over the .bin: sha256 and the id range of the train part and of the rest."""
    tokens, sha = src.reader.tokens, hashlib.sha256()
    step = max(1, _SCAN_BYTES // src.reader.dtype.itemsize)
    top = -1
    for a in range(0, len(tokens), step):
        chunk = np.asarray(tokens[a : a + step])
        sha.update(chunk.tobytes())
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"--prefix {src.prefix} holds token id {bad}, outside the tokenizer's "
                f"vocabulary of {vocab_size}: it was tokenized with another tokenizer (pass that "
                "one with --tokenizer)"
            )
        if a < src.train_tokens:
            top = max(top, int(chunk[: src.train_tokens - a].max()))
        bar.update(chunk.size)
    src.bin_sha256, src.train_max_id = sha.hexdigest(), top


def _eos_warning(src: Source, eos_id: int) -> None:
    sample = range(min(len(src.reader), 1000))
    ends = [int(d[-1]) for d in (src.reader.document(i) for i in sample) if len(d)]
    if ends and not any(e == eos_id for e in ends):
        print(
            f"[import] warning: source {src.label!r}: no document ends in the tokenizer's EOS "
            f"({eos_id}); prepared without --append-eod? Packed training windows will run "
            "documents together"
        )


def link_bin(source_bin: Path, target: Path) -> str:
    """Hard link where possible, else a symbolic link to the absolute path; never a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source_bin, target)
        return "hard"
    except OSError:
        os.symlink(source_bin.resolve(), target)
        return "symlink"


def import_megatron(
    prefixes: list[str],
    tokenizer: str,
    out_dir: str,
    names: list[str] | None = None,
    weights: list[float] | None = None,
    validation_sequences: int = 5000,
    validation_seq_len: int = 2048,
) -> dict:
    out = Path(out_dir)
    if validation_sequences < 0 or validation_seq_len < 2:
        raise ConfigError("--validation-sequences must be >= 0 and --validation-seq-len >= 2")
    labels = source_labels(prefixes, names)
    if weights is not None and (len(weights) != len(prefixes) or min(weights) < 0):
        raise ConfigError(f"--weights needs {len(prefixes)} non-negative number(s), one per prefix")
    tok = TextTokenizer(tokenizer)
    check_out_dir(out, tok)
    sources = [open_source(label, p) for label, p in zip(labels, prefixes)]
    weight = {s.label: (weights[i] if weights else float(s.reader.num_tokens)) for i, s in
              enumerate(sources)}  # fmt: skip
    wanted = dict(zip(labels, allocate(validation_sequences, list(weight.values()))))
    for src in sources:
        choose_heldout(src, wanted[src.label] * validation_seq_len)
    total = sum(s.reader.num_tokens for s in sources)
    with progress(total=total, desc="import: check ids + sha256", unit="tok") as bar:
        for src in sources:
            scan(src, tok.vocab_size, bar)
    for src in sources:
        _eos_warning(src, tok.eos_id)

    tmp = out.parent / f".{out.name}.import-tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftovers
    try:
        manifest = _write(tmp, tok, sources, weight, wanted, validation_seq_len, weights is None)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write(tmp, tok, sources, weight, wanted, seq_len, by_tokens) -> dict:
    saved = tok.save(tmp)  # as tokenizer.json / tokenizer.model, whatever the source's name
    shards, entries = [], {}
    for src in sources:
        rel = shard_relpath(src.label, "train", 0, 0)
        how = link_bin(shard_file(src.prefix, BIN), shard_file(tmp / rel, BIN))
        index = src.reader.index
        n_seq = int(index.document_indices[src.train_docs])
        idx_sha = write_index(
            shard_file(tmp / rel, IDX),
            index.dtype,
            index.sequence_lengths[:n_seq],
            index.document_indices[: src.train_docs + 1],
        )
        shards.append(
            {
                "name": Path(rel).name,
                "path": rel,
                "source": src.label,
                "split": "train",
                "unit": 0,
                "tokens": src.train_tokens,
                "documents": src.train_docs,
                "dtype": index.dtype.name,
                "sha256": src.bin_sha256,
                "idx_sha256": idx_sha,
                "max_token_id": src.train_max_id,
            }
        )
        entries[src.label] = {
            "source": f"megatron:{src.prefix}",
            "weight": weight[src.label],
            "units": 1,
            "train_tokens": src.train_tokens,
            "train_documents": src.train_docs,
            "val_tokens": src.reader.num_tokens - src.train_tokens,
            "val_documents": len(src.reader) - src.train_docs,
            "rows_skipped": {},
            "decontaminated": 0,
            "imported": {
                "prefix": str(src.prefix),
                "link": how,
                "idx_sha256": sha256_file(shard_file(src.prefix, IDX)),
            },
        }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        budget = sum(s.train_tokens for s in sources)
        avail = {s.label: s.train_tokens for s in sources}
        plan = plan_shares(avail if by_tokens else weight, avail, budget)
    for w in caught:
        print(f"[import] warning: {w.message}")
    atomic_write_json(tmp / PLAN, plan)
    heldout = {s.label: iter([np.asarray(s.reader.tokens[s.train_tokens :])]) for s in sources}
    validation = write_validation(
        tmp, tok.token_dtype, seq_len, wanted, heldout, "import", "lower --validation-sequences"
    )
    manifest = {
        "format": FORMAT,
        "imported_with": IMPORT_MARK,
        "tokenizer": {**tok.meta(), "file": saved.name},
        "sources": entries,
        "shards": shards,
        "mixture_plan": PLAN,
        "validation": validation,
    }
    write_manifest(tmp, manifest)
    return manifest


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory into place (an empty or earlier-import `out` is replaced)."""
    old = out.parent / f".{out.name}.import-old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
