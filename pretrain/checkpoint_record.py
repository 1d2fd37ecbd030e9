"""What one save wrote: file names, sizes and checksums (`integrity.json`), and the check.

A save's files come from every rank (DeepSpeed's model and ZeRO partition files, rng and expert
shard files). Once all of them are on disk (a barrier), each rank checksums its share of the
save directory's files and writes a part record; after a second barrier rank 0 merges the parts
into `integrity.json`, and only then moves the `latest_complete` pointer (pretrain/checkpoint.py).
So a pointed-at save with a record has every file it had when it was complete, and a check
finds a file that went missing, was cut short, or had bytes changed since.

The checksum is CRC-32 (zlib), not a cryptographic hash: it guards against accidents
(truncation, bit rot, a copy cut short, a stray write), not tampering, and it is the cheapest
one in the standard library: measured on the 2-core CPU dev box, over 256 MiB in memory,
zlib.crc32 890 MiB/s, adler32 630 MiB/s, sha256 330 MiB/s, blake2b 150 MiB/s. Checkpoints run
to many GB, and the checksumming is shared over the ranks on save and on resume.

No torch here on purpose: eval and export read records without a process group.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from mop.fileio import atomic_write_json

RECORD = "integrity.json"
_PART = ".integrity_rank{}.json"  # one rank's share, merged into RECORD by rank 0
FORMAT = 1
_CHUNK = 1 << 22


def crc32_file(path: str | Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def saved_files(tag_dir: Path) -> dict[str, int]:
    """Name (relative, '/'-separated) -> size of every file of a save, without the record
    and its parts and without hidden temporary files (atomic writes in flight)."""
    out = {}
    for p in sorted(tag_dir.rglob("*")):
        rel = p.relative_to(tag_dir).as_posix()
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if p.is_file() and not hidden and rel != RECORD:
            out[rel] = p.stat().st_size
    return out


def shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Split files over `world` ranks with about equal bytes each (largest first to the least
    loaded rank): the same split on every rank for the same sizes."""
    load = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[r].append(name)
        load[r] += sizes[name]
    return out


def write_part(tag_dir: Path, rank: int, world: int) -> None:
    """This rank's share of the record (after every rank's files are on disk)."""
    sizes = saved_files(tag_dir)
    mine = shares(sizes, world)[rank]
    entries = {n: {"size": sizes[n], "crc32": crc32_file(tag_dir / n)} for n in mine}
    atomic_write_json(tag_dir / _PART.format(rank), entries)


def merge_parts(tag_dir: Path, world: int) -> None:
    """Rank 0, after every rank wrote its part: one record, then the parts go."""
    files: dict[str, dict] = {}
    parts = [tag_dir / _PART.format(r) for r in range(world)]
    for part in parts:
        files.update(json.loads(part.read_text(encoding="utf-8")))
    atomic_write_json(tag_dir / RECORD, {"format": FORMAT, "checksum": "crc32", "files": files})
    for part in parts:
        part.unlink()


def has_record(tag_dir: Path) -> bool:
    return (tag_dir / RECORD).is_file()


def read_record(tag_dir: Path) -> dict[str, dict] | None:
    """The recorded files, or None when the record itself is unreadable."""
    try:
        rec = json.loads((tag_dir / RECORD).read_text(encoding="utf-8"))
        files = rec["files"]
        well_formed = all(
            isinstance(e["size"], int) and isinstance(e["crc32"], str) for e in files.values()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return files if well_formed else None


def problem(tag_dir: Path, rank: int = 0, world: int = 1, checksum=None) -> str | None:
    """How a save with a record is damaged, or None when it is intact.

    Every file's presence and size is checked (a stat each); checksums are computed for this
    rank's share of the files (`shares`, so `world` ranks together read each file once), and
    only for the names `checksum(name)` accepts when given (eval skips optimizer files)."""
    if not tag_dir.is_dir():
        return "the directory does not exist"
    files = read_record(tag_dir)
    if files is None:
        return f"its {RECORD} is unreadable"
    for name in sorted(files):
        path = tag_dir / name
        if not path.is_file():
            return f"missing file {name}"
        size = path.stat().st_size
        if size != int(files[name]["size"]):
            return f"size mismatch in {name}: {size} bytes, {files[name]['size']} recorded"
    sizes = {n: int(e["size"]) for n, e in files.items()}
    for name in shares(sizes, world)[rank]:
        if checksum is not None and not checksum(name):
            continue
        if crc32_file(tag_dir / name) != files[name]["crc32"]:
            return f"checksum mismatch in {name}"
    return None
