"""`python -m data_prep verify`: check every file of a data directory against its manifest.

Works on the three kinds of data directory the project writes: a tokenized mixture
(`merge`: shards, validation sequences, tokenizer), a synthetic text task (shards and the
char tokenizer) and the memorization task (tensors). Each file is re-hashed and compared
with the sha256 the manifest recorded; the first mismatch, missing file or malformed
manifest is a `DataError` naming the file (one line, exit 3).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from data_prep.manifest import FORMAT, MANIFEST
from data_prep.shards import verify_shard
from data_prep.synthetic.memorization import TENSOR_FORMAT
from mop.errors import DataError
from mop.fileio import read_json, sha256_file


def load_any_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of any data directory, checked to be a JSON object with a known format."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d}")
    path = d / MANIFEST
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST} in {d}: not a data directory, or its job did not finish "
            "(a tokenized mixture gets it from `merge`, a synthetic task when it completes)"
        )
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is damaged: it holds a {type(manifest).__name__}, not an object")
    return manifest


def _field(manifest: dict, key: str, path: Path, kind: type):
    value = manifest.get(key)
    if not isinstance(value, kind):
        raise DataError(f"{path} is damaged or incomplete: no valid {key!r} entry")
    return value


def verify_data_dir(
    data_dir: str | os.PathLike, on_file: Callable[[str], None] | None = None
) -> int:
    """Re-hash every file the manifest lists; returns how many were checked."""
    d = Path(data_dir)
    manifest = load_any_manifest(d)
    mpath = d / MANIFEST
    fmt = manifest.get("format")
    checked = 0
    if fmt == TENSOR_FORMAT:
        for key, rec in sorted(_field(manifest, "tensors", mpath, dict).items()):
            _check_file(d, rec, mpath, f"tensor {key!r}")
            checked += 1
            if on_file:
                on_file(rec["file"])
        return checked
    if fmt != FORMAT:
        raise DataError(f"{mpath} has format {fmt!r}, expected {FORMAT!r} or {TENSOR_FORMAT!r}")
    records = list(_field(manifest, "shards", mpath, list))
    if isinstance(manifest.get("validation"), dict):  # a tokenized mixture; synthetic has none
        records.append(manifest["validation"])
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            raise DataError(f"{mpath} is damaged: a shard record has no 'path'")
        try:
            verify_shard(d / rec["path"], rec)
        except KeyError as exc:
            raise DataError(f"{mpath} is damaged: shard {rec['path']} has no {exc}") from None
        checked += 1
        if on_file:
            on_file(rec["path"])
    tok = _field(manifest, "tokenizer", mpath, dict)
    _check_file(d, tok, mpath, "tokenizer")
    return checked + 1


def _check_file(d: Path, rec: dict, mpath: Path, what: str) -> None:
    if not isinstance(rec, dict) or not rec.get("file") or not rec.get("sha256"):
        raise DataError(f"{mpath} is damaged: the {what} record has no file or sha256")
    path = d / rec["file"]
    if not path.is_file():
        raise DataError(f"{what} file missing: {path}")
    got = sha256_file(path)
    if got != rec["sha256"]:
        raise DataError(
            f"{what} file {path} does not match {MANIFEST}: sha256 {got[:12]}... is not the "
            f"recorded {rec['sha256'][:12]}... (modified or corrupted; restore it or re-run "
            "the job that wrote the directory)"
        )
