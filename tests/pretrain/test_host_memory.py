"""CPU runs keep freed host memory for reuse (pretrain/host_memory.py, issue 21): a step's
large tensors, allocated again every step, no longer fault in fresh pages each time."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A step-like pattern: allocate and touch tensors of 48, 64 and 80 MB, free them, ten times;
# print the page faults of the last four rounds (the first ones grow the heap).
ROUNDS = """
import resource, sys, torch
from pretrain.host_memory import keep_freed_host_memory
print(keep_freed_host_memory() if sys.argv[1] == "keep" else "off")
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(mb * 2**18).fill_(1.0) for mb in (48, 64, 80)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[6:]))
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    state, kept = _faults("keep")
    _, default = _faults("off")
    pages = 4 * 192 * 2**20 // 4096  # four rounds of 192 MB
    assert state == "True"
    assert default > pages // 2  # glibc's default: a fresh mmap every round
    assert kept < pages // 20, (kept, default)


def test_the_cpu_entry_point_applies_it_before_deepspeed(monkeypatch):
    """python -m pretrain calls it on a CPU run, before anything big is allocated."""
    import inspect

    import pretrain.__main__ as entry

    source = inspect.getsource(entry.train)
    assert source.index("keep_freed_host_memory()") < source.index("import deepspeed")
