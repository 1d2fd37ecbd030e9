"""User-facing errors: one clear line, no traceback, a non-zero exit code."""

from __future__ import annotations

import functools
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


def cli_entry(main: F) -> F:
    """Wrap a CLI main(): UserError -> `error: ...` on stderr and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]
