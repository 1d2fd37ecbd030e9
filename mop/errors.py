"""User-facing errors: one clear line, no traceback, a non-zero exit code.

Exit codes (the README's "When something goes wrong" lists them for users):
  2   bad input: a config value, a path or a command-line argument (`UserError`, `ConfigError`)
  3   bad data: a file that is missing, damaged or inconsistent (`DataError`)
 65   training stopped: too many non-finite steps in a row (pretrain/trainer.py)
 66   damaged state: no intact checkpoint left to resume from (`DamagedStateError`)
 67   training stopped: repeated loss spikes after spike.max_rollbacks rollbacks (pretrain/spike.py)
 75   stopped by a signal after a checkpoint: requeue the job (EX_TEMPFAIL, pretrain/stop.py)
130   interrupted (Ctrl-C)
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """A problem with the user's input (config, files, arguments). Printed as one line."""

    exit_code = 2


class ConfigError(UserError):
    """A config value is missing, unknown or out of range."""


class DataError(UserError):
    """Input or output data is malformed, corrupted or inconsistent."""

    exit_code = 3


class DamagedStateError(DataError):
    """Saved state (a checkpoint) is damaged and nothing intact is left to fall back on.

    Exit 66 (EX_NOINPUT): distinct from a bad input (2, 3), a non-finite loss (65) and the
    requeue code (75), so slurm/train.sbatch does not requeue a job that would fail the same
    way on every restart."""

    exit_code = 66


def one_line(text: object) -> str:
    """`text` on one line: messages that quote a parser (pyarrow, YAML) may hold newlines."""
    return " ".join(str(text).split())


def cli_entry(main: F) -> F:
    """Wrap a CLI main(): UserError -> `error: ...` (one line) on stderr and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
            return code
        except BrokenPipeError:
            # `... --dry-run | head`: the reader closed the pipe; stop quietly, as a process
            # killed by SIGPIPE would, and keep Python's exit-time flush from raising again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except UserError as exc:
            sys.stdout.flush()  # what was printed before stays before the error line
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]


def check_dir_target(path: str, what: str) -> None:
    """Refuse an output directory path that names an existing file (or sits under one)."""
    from pathlib import Path

    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                at = "" if q == p else f" (its parent {q} is a file)"
                raise UserError(f"{what} {path} is an existing file, not a directory{at}")
            return
