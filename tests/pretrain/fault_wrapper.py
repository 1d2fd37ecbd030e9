"""Test-only launcher of `python -m pretrain` that injects faults (none in production code).

MOP_TEST_KILL_AT_STEP=k          SIGKILL itself before step k+1 (after k completed steps)
MOP_TEST_KILL_IN_SAVE_STEP=k     during the save of step k: half-write a file, then SIGKILL
MOP_TEST_SIGTERM_AT_STEP=k       send itself SIGTERM while step k+1 runs
MOP_TEST_NAN_STEPS=a,b,...       the loss of steps a, b (0-based attempted steps) becomes NaN
"""

from __future__ import annotations

import os
import signal
import sys

from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

from pretrain import trainer
from pretrain.__main__ import main


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


KILL_AT = _int_env("MOP_TEST_KILL_AT_STEP")
KILL_IN_SAVE = _int_env("MOP_TEST_KILL_IN_SAVE_STEP")
SIGTERM_AT = _int_env("MOP_TEST_SIGTERM_AT_STEP")
NAN_STEPS = {int(s) for s in os.environ.get("MOP_TEST_NAN_STEPS", "").split(",") if s}
CURRENT = {"step": -1}

_train_step = trainer.Trainer.train_step


def train_step(self):
    CURRENT["step"] = self.state.step
    if KILL_AT is not None and self.state.step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if SIGTERM_AT is not None and self.state.step == SIGTERM_AT:
        os.kill(os.getpid(), signal.SIGTERM)
    return _train_step(self)


_lm_loss = trainer.lm_loss


def lm_loss(logits, targets):
    loss = _lm_loss(logits, targets)
    if CURRENT["step"] in NAN_STEPS:
        loss = loss * float("nan")  # keeps the graph: gradients become NaN too
    return loss


_save = torch_checkpoint_engine.TorchCheckpointEngine.save


def save(self, state_dict, path):
    if KILL_IN_SAVE is not None and f"step_{KILL_IN_SAVE:08d}" in str(path):
        with open(path, "wb") as fh:
            fh.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(self, state_dict, path)


trainer.Trainer.train_step = train_step
trainer.lm_loss = lm_loss
torch_checkpoint_engine.TorchCheckpointEngine.save = save

if __name__ == "__main__":
    sys.exit(main())
