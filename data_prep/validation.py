"""Held-out validation sequences: per source, held-out tokens cut into fixed-length rows.

`merge` feeds each source's held-out shards (documents chosen by hash, never trained on);
`import-megatron` the last documents of each imported source. Both write
`validation/sequences.{bin,idx}`, one sequence per row, and the manifest record returned here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data_prep.shards import ShardWriter

VALIDATION_STEM = "validation/sequences"


def allocate(total: int, weights: list[float]) -> list[int]:
    """Split `total` by weight with the largest-remainder rule (sums exactly to total)."""
    wsum = sum(weights)
    if wsum <= 0:
        return [0] * len(weights)
    raw = [total * w / wsum for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def write_validation(
    out: Path,
    dtype,
    seq_len: int,
    wanted: dict[str, int],
    heldout: dict[str, Iterable],
    tag: str = "merge",
    short_hint: str = "raise validation.fraction",
) -> dict:
    """`validation/sequences`: per source, its held-out token chunks (in order) concatenated
    and cut into `wanted[label]` sequences of `seq_len`; returns the manifest record."""
    writer = ShardWriter(out / VALIDATION_STEM, dtype)
    per_source = {}
    try:
        for label, want in wanted.items():
            got = 0
            buf = np.zeros(0, dtype=dtype)
            for tokens in heldout[label]:
                if got >= want:
                    break
                buf = np.concatenate([buf, tokens])
                while len(buf) >= seq_len and got < want:
                    writer.add(buf[:seq_len])
                    buf = buf[seq_len:]
                    got += 1
            if got < want:
                print(
                    f"[{tag}] warning: source {label!r} has held-out tokens for {got} of "
                    f"{want} validation sequences; {short_hint}"
                )
            per_source[label] = got
        record = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {
        **record,
        "path": VALIDATION_STEM,
        "seq_len": seq_len,
        "num_sequences": record["documents"],
        "per_source": per_source,
    }
