"""Layout of a data directory and its manifests.

    DIR/config.yaml                      resolved config of the last command
    DIR/tokenizer.json|tokenizer.model   tokenizer + tokenizer_meta.json (sha256, EOS, vocab)
    DIR/shards/<label>/<split>/uNNNNN-KKKK.{bin,idx}   packed documents (split: train|val)
    DIR/parts/<label>/uNNNNN.json        per-input-unit fragment, rewritten after each shard
    DIR/manifest.json                    global manifest (written by `merge`)
    DIR/mixture_plan.json                tokens per source for the training mixture
    DIR/validation/sequences.{bin,idx}   fixed held-out validation sequences
    DIR/logs/                            per-task summaries (timings; not part of the data)

A shard exists for readers only once a fragment (and later the manifest) lists it, so a
killed job never exposes a half-written shard.
"""

from __future__ import annotations

import os
from pathlib import Path

from mop.errors import DataError
from mop.fileio import atomic_write_json, read_json

FORMAT = "mop-shards-v1"
MANIFEST = "manifest.json"
PLAN = "mixture_plan.json"


def fragment_path(out_dir: Path, label: str, unit: int) -> Path:
    return out_dir / "parts" / label / f"u{unit:05d}.json"


def shard_relpath(label: str, split: str, unit: int, k: int) -> str:
    return f"shards/{label}/{split}/u{unit:05d}-{k:04d}"


def shard_records(doc: dict) -> list[dict]:
    """Every shard record of a manifest or a fragment: its shards, then the validation
    sequences (a merged manifest's)."""
    records = list(doc.get("shards", []))
    if isinstance(doc.get("validation"), dict) and doc["validation"].get("path"):
        records.append(doc["validation"])
    return records


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)


def load_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST} in {data_dir}: the data directory is incomplete "
            "(run `python -m data_prep merge --config ...` after all tokenize tasks finish)"
        )
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_tokenizer(manifest: dict, expected_sha256: str, where: str = "") -> None:
    """Refuse shards made with another tokenizer than the one the caller uses."""
    got = manifest.get("tokenizer", {}).get("sha256")
    if got != expected_sha256:
        raise DataError(
            f"shards{(' in ' + where) if where else ''} were made with tokenizer "
            f"{str(got)[:12]}..., not {expected_sha256[:12]}...: use the matching tokenizer "
            "or re-tokenize"
        )
