"""`python -m ... --dry-run | head`: a reader that closes the pipe early stops the command
quietly (exit 141, as SIGPIPE would), never with a BrokenPipeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["slurm.submit", "--dry-run", "sweep", "--grid", "configs/reproduce/phonebook_gpu.yaml"],
        ["pretrain", "--config", "configs/train/tiny_cpu.yaml", "--dry-run"],
    ],
    ids=["slurm.submit", "pretrain"],
)
def test_dry_run_into_closed_pipe_has_no_traceback(argv: list[str]) -> None:
    # The reader is gone before the first write (deterministic, unlike racing a real `head`).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141, (proc.returncode, proc.stderr)
