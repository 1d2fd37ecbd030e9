"""The argument parser of every entry point: a usage mistake is one `error:` line too.

argparse prints the whole usage block and then `prog: error: ...`; a SLURM log or a
terminal then shows several lines of which only the last matters. `ArgumentParser` here
prints the one line, with the command and where to look (`--help`), and exits 2 like
argparse (and like every `UserError` of the project, see mop/errors.py). Subparsers made
with `add_subparsers` inherit the class, so subcommands behave the same.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and examples kept as written in the epilog."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        print(f"error: {self.prog}: {line} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def examples(*lines: str, notes: str = "") -> str:
    """An epilog: `examples:` and one command a line (then optional notes), for --help."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return f"{text}\n\n{notes.strip()}\n" if notes else text + "\n"


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device this machine does not have, before any model is built on it."""
    if device is None or device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        from mop.errors import UserError

        raise UserError(f"{flag} {device!r}: expected cpu, cuda or cuda:N")
    import torch  # only here: the check needs it, and a cpu run never pays for it

    from mop.errors import UserError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(
            f"{flag} {device}: no CUDA device on this machine (torch.cuda.is_available() is "
            "false); use --device cpu or run on a GPU node"
        )
    if index and int(index) >= count:
        raise UserError(f"{flag} {device}: this machine has {count} CUDA device(s)")
