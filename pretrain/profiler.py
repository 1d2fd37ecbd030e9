"""`python -m pretrain ... --profile FROM:TO`: a torch profiler trace of training steps FROM..TO.

A trainer callback (the loop stays unchanged): it starts the profiler once step FROM-1 has
ended (or at once when the run starts at step FROM-1, e.g. FROM=1 on a fresh start), stops it
after step TO (or the run's last step), and writes a Chrome/Perfetto trace per rank to
`<run_dir>/profile/steps_FROM-TO_rank<R>.json` (open it in chrome://tracing or Perfetto).
CPU activity always, CUDA kernels when a GPU is used; shapes and memory are recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mop.errors import UserError
from pretrain.trainer import Callback


def parse_profile_range(text: str) -> tuple[int, int]:
    """'5:8' -> (5, 8): steps counted as the trainer logs them (1-based), both included."""
    try:
        first, last = (int(x) for x in text.split(":"))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise UserError(f"--profile {text!r}: want FROM:TO with 1 <= FROM <= TO, e.g. 5:8")
    return first, last


class ProfilerCallback(Callback):
    """See the module docstring."""

    def __init__(self, steps: tuple[int, int], run_dir: str | Path, rank: int, start_step: int):
        self.first, self.last = steps
        self.path = Path(run_dir) / "profile" / f"steps_{self.first}-{self.last}_rank{rank}.json"
        self._prof: torch.profiler.profile | None = None
        if start_step == self.first - 1:
            self._start()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True
        )
        self._prof.__enter__()

    def on_step_end(self, trainer, result) -> None:
        step = trainer.state.step
        if self._prof is None:
            if step == self.first - 1:
                self._start()
            return
        if step >= self.last or step >= trainer.cfg.max_steps or trainer.stopping:
            self._prof.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._prof.export_chrome_trace(str(self.path))
            self._prof = None
            if trainer.mesh.rank == 0:
                print(
                    f"[train] profiler trace of steps {self.first}-{step}: {self.path}", flush=True
                )
