"""`--help` of every entry point: every subcommand and flag explained, with examples.

The parsers are captured in-process (every entry point builds a `mop.cli.ArgumentParser`):
parsing is stopped at its start and the parser walked, subcommands included. One subprocess
checks that `python -m pretrain --help` says how to resume, how to override any config field
and where the outputs go.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from mop.cli import ArgumentParser

REPO = Path(__file__).resolve().parents[1]

# module -> callable that builds its parser and parses (argv is irrelevant: parsing is stopped)
ENTRY_POINTS = {
    "data_prep": "data_prep.__main__:main",
    "pretrain": "pretrain.__main__:main",
    "pretrain.model_info": "pretrain.model_info:main",
    "pretrain.doctor": "pretrain.doctor:main",
    "pretrain.memorization": "pretrain.memorization:main",
    "pretrain.model.hf_export": "pretrain.model.hf_export:main",
    "eval": "eval.__main__:main",
    "eval.export": "eval.export:main",
    "eval.report": "eval.report:main",
    "slurm.submit": "slurm.submit:main",
    "slurm.grid": "slurm.grid:main",
    "demo": "demo.__main__:main",
}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def capture_parser(target: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def stop(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(ArgumentParser, "parse_known_args", stop)
    module, func = target.split(":")
    with pytest.raises(_Captured) as info:
        getattr(importlib.import_module(module), func)(["--help"])
    return info.value.parser


def walk(parser: argparse.ArgumentParser, path: str = ""):
    """(command path, parser) for the parser and every subcommand below it."""
    yield path or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path or parser.prog} {name}")


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_every_flag_and_subcommand_is_explained_with_examples(module, monkeypatch) -> None:
    parser = capture_parser(ENTRY_POINTS[module], monkeypatch)
    for where, p in walk(parser):
        undocumented = [
            "/".join(a.option_strings) or a.dest
            for a in p._actions
            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
        ]
        assert not undocumented, f"{where}: no help text for {undocumented}"
        subcommands = any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
        text = f"{p.description or ''}\n{p.epilog or ''}"
        if not subcommands:  # a leaf command shows how it is called
            assert "python -m " in text or "torchrun" in text, f"{where}: no example in --help"
    top = f"{parser.description or ''}\n{parser.epilog or ''}"
    assert "python -m " in top, f"{module}: no example in --help"


def test_pretrain_help_says_how_to_resume_override_and_where_outputs_go() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pretrain", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "Resume: run the same command again" in text
    assert "checkpoint.resume=never" in text
    assert "Override any config field: dotted key=value" in text
    for output in ("run_dir", "metrics.jsonl", "checkpoints/", "config.yaml"):
        assert output in text
    # the spike guard's knobs, how to check them, and its exit code
    for knob in ("spike.loss_ratio", "spike.enabled=false", "fault.spike_at_step", "67"):
        assert knob in text
