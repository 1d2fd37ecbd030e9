"""`python -m data_prep upgrade-index --data-dir DIR`: indexes of before 2026-12 -> Megatron's.

Data directories written before 2026-12 hold each shard's document offsets as a NumPy `.npy`
file under the `.idx` name; readers now refuse them with one line naming this command. It
rewrites every such index in Megatron's MMIDIDX layout (`data_prep/shards.py`), after checking
it against the sha256 its record holds and against its `.bin`, and updates `idx_sha256` (and
a `uint32` dtype, which Megatron cannot name, to the byte-identical `int32`) in the manifest
and in the per-unit fragments under `parts/`, so `verify`, `merge` and a resumed `tokenize`
keep working. The `.bin` files are not touched: no token moves, and their sha256 stay valid.

Each index is replaced atomically, the fragments are rewritten next and the manifest last: a
killed run is finished by running the command again (an index already rewritten is checked
against its .bin and its record's counts, then kept).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.manifest import FORMAT, MANIFEST, shard_records
from data_prep.shards import (
    BIN,
    IDX,
    ShardReader,
    check_structure,
    is_legacy_index,
    shard_file,
    upgrade_legacy_index,
)
from data_prep.tokenizer import META_FILE
from mop.errors import DataError
from mop.fileio import atomic_write_json, read_json, sha256_file


def _current(stem: Path, record: dict) -> dict:
    """An index already in the current layout (an earlier run rewrote it): check, keep."""
    reader = ShardReader(stem)
    check_structure(reader.index, shard_file(stem, BIN).stat().st_size)
    if reader.num_tokens != int(record["tokens"]) or len(reader) != int(record["documents"]):
        raise DataError(
            f"shard index {shard_file(stem, IDX)} lists {len(reader)} documents / "
            f"{reader.num_tokens} tokens, its record {record['documents']} / {record['tokens']}: "
            "damaged; rebuild the data directory"
        )
    return {"idx_sha256": sha256_file(shard_file(stem, IDX)), "dtype": reader.dtype.name}


def upgrade_data_dir(data_dir: str | os.PathLike) -> tuple[int, int]:
    """Rewrite the legacy indexes of a data directory; returns (rewritten, already current)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d}")
    docs: list[tuple[Path, dict]] = []  # fragments first, the manifest last
    parts = d / "parts"
    if parts.is_dir():
        docs += [(p, read_json(p)) for p in sorted(parts.rglob("*.json"))]
    if (d / MANIFEST).is_file():
        docs.append((d / MANIFEST, read_json(d / MANIFEST)))
    if not docs:
        raise DataError(f"{d} is not a data directory: no {MANIFEST} and no parts/ fragments")
    if not isinstance(docs[-1][1], dict) or "shards" not in docs[-1][1]:
        return 0, 0  # the memorization task's tensors: no shards, nothing to rewrite
    updates: dict[str, dict] = {}
    rewritten = 0
    for path, doc in docs:
        if path.name == MANIFEST and doc.get("format") != FORMAT:
            raise DataError(f"{path} has format {doc.get('format')!r}, expected {FORMAT!r}")
        before = json.dumps(doc, sort_keys=True)
        for rec in shard_records(doc):
            rel = rec["path"]
            if rel not in updates:
                stem = d / rel
                if not shard_file(stem, IDX).is_file():
                    raise DataError(f"shard file missing: {shard_file(stem, IDX)}")
                if is_legacy_index(shard_file(stem, IDX)):
                    updates[rel] = upgrade_legacy_index(stem, rec)
                    rewritten += 1
                else:
                    updates[rel] = _current(stem, rec)
            rec.update(updates[rel])
        if isinstance(doc.get("tokenizer"), dict) and doc["tokenizer"].get("dtype") == "uint32":
            doc["tokenizer"]["dtype"] = "int32"
        if json.dumps(doc, sort_keys=True) != before:
            atomic_write_json(path, doc)
    meta = d / META_FILE
    if meta.is_file() and read_json(meta).get("dtype") == "uint32":
        atomic_write_json(meta, {**read_json(meta), "dtype": "int32"})
    return rewritten, len(updates) - rewritten
