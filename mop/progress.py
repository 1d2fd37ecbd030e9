"""Progress for terminals and for SLURM logs: a live bar on an interactive terminal, plain
lines (no carriage returns, no bar glyphs) in a log file or a pipe."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm

# A non-interactive log gets one status line per this many seconds (a bar redraws every 0.1 s).
LOG_INTERVAL_S = 30.0
_PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"


def interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stdout) is a terminal a person watches."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like object without a tty
        return False


class _LineFile:
    """tqdm redraws its status with a leading '\\r' and padding; in a log that becomes one
    ever-growing line. This writer turns every redraw into its own plain line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    **kw: Any,
) -> tqdm:
    """A tqdm bar on stderr; when stderr is not a terminal, a plain status line every 30 s."""
    if interactive(sys.stderr):
        kw.setdefault("mininterval", 0.1)
        kw.setdefault("dynamic_ncols", True)
        out: Any = sys.stderr
    else:
        kw.setdefault("mininterval", LOG_INTERVAL_S)
        kw.setdefault("bar_format", _PLAIN_FORMAT if total is not None else _PLAIN_FORMAT_NO_TOTAL)
        out = _LineFile(sys.stderr)
    kw.setdefault("unit_scale", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=out, **kw)


def say(text: str, stream: TextIO | None = None) -> None:
    """Print one line without tearing a live bar (tqdm.write clears and redraws it)."""
    tqdm.write(text, file=sys.stdout if stream is None else stream)
    (sys.stdout if stream is None else stream).flush()


def fmt_duration(seconds: float | None) -> str:
    """12s, 3m05s, 2h07m, 3d04h; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def eta(done: float, total: float, seconds: float) -> float | None:
    """Seconds left at the average rate so far; None before anything was done."""
    if done <= 0 or seconds <= 0:
        return None
    return max(total - done, 0) * seconds / done
