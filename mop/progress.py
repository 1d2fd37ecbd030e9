"""Progress bars with rate and ETA that also behave in SLURM log files."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    **kw: Any,
) -> tqdm:
    """A tqdm bar; in a non-interactive log it refreshes every 30 s instead of every 0.1 s."""
    interactive = sys.stderr.isatty()
    kw.setdefault("mininterval", 0.1 if interactive else 30.0)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("unit_scale", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, **kw)
