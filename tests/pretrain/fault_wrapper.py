"""Test-only launcher of `python -m pretrain` that injects faults (none in production code).

MOP_TEST_KILL_AT_STEP=k          SIGKILL itself before step k+1 (after k completed steps)
MOP_TEST_KILL_AT_CALL=n          SIGKILL itself before its n-th attempted step (1-based; counts
                                 the steps replayed after a spike rollback, which KILL_AT_STEP
                                 cannot tell from the first time)
MOP_TEST_KILL_IN_SAVE_STEP=k     during the save of step k: half-write a file, then SIGKILL
MOP_TEST_KILL_IN_SAVE_AT=phase   with MOP_TEST_KILL_IN_SAVE_STEP: SIGKILL at a later point of
                                 that save instead: `record` (files written, before this rank
                                 records its share), `merge` (before rank 0 merges the record),
                                 `pointer` (record written, before the pointer moves)
MOP_TEST_KILL_RANK=r             kill faults only on rank r (default: every rank)
MOP_TEST_ENGINE_FORMAT=1         save in DeepSpeed's own files (format 1) also with ZeRO 1/2: a save
                                 as every run wrote before the layout-free format
MOP_TEST_SLOW_SAVE_S=x           each checkpoint file write first sleeps x seconds (a slow disk:
                                 a background save is still being written while training goes
                                 on, a stop signal or a kill arrives)
MOP_TEST_SIGTERM_AT_STEP=k       send itself SIGTERM while step k+1 runs
MOP_TEST_NAN_STEPS=a,b,...       the loss of steps a, b (0-based attempted steps) becomes NaN
"""

from __future__ import annotations

import os
import signal
import sys
import time

from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from pretrain import checkpoint, checkpoint_record, trainer
from pretrain.__main__ import main


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


KILL_AT = _int_env("MOP_TEST_KILL_AT_STEP")
KILL_AT_CALL = _int_env("MOP_TEST_KILL_AT_CALL")
KILL_IN_SAVE = _int_env("MOP_TEST_KILL_IN_SAVE_STEP")
KILL_IN_SAVE_AT = os.environ.get("MOP_TEST_KILL_IN_SAVE_AT", "files")
KILL_RANK = _int_env("MOP_TEST_KILL_RANK")
SIGTERM_AT = _int_env("MOP_TEST_SIGTERM_AT_STEP")
SLOW_SAVE = float(os.environ.get("MOP_TEST_SLOW_SAVE_S") or 0)
NAN_STEPS = {int(s) for s in os.environ.get("MOP_TEST_NAN_STEPS", "").split(",") if s}
CURRENT = {"step": -1, "calls": 0}

_train_step = trainer.Trainer.train_step


def train_step(self):
    CURRENT["step"] = self.state.step
    CURRENT["calls"] += 1
    if KILL_AT_CALL is not None and CURRENT["calls"] == KILL_AT_CALL:
        os.kill(os.getpid(), signal.SIGKILL)
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


def _killing(phase: str, path) -> bool:
    if KILL_IN_SAVE is None or phase != KILL_IN_SAVE_AT:
        return False
    if KILL_RANK is not None and int(os.environ.get("RANK", "0")) != KILL_RANK:
        return False
    return f"step_{KILL_IN_SAVE:08d}" in str(path)


def save(self, state_dict, path):
    if _killing("files", path):
        with open(path, "wb") as fh:
            fh.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(self, state_dict, path)


_write_data = dcp_filesystem._FileSystemWriter.write_data


def write_data(self, plan, planner):
    """DCP's write of this rank's files (in the background with checkpoint.async_save)."""
    if SLOW_SAVE:
        time.sleep(SLOW_SAVE)
    if _killing("files", self.path):
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(self.path, f"__{rank}_0.distcp"), "wb") as fh:
            fh.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_data(self, plan, planner)


def _kill_before(phase: str, fn):
    def wrapped(tag_dir, *args, **kwargs):
        if _killing(phase, tag_dir):
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(tag_dir, *args, **kwargs)

    return wrapped


def _move_pointer(ckpt_dir, tag):
    if _killing("pointer", f"{ckpt_dir}/{tag}"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _move_pointer_real(ckpt_dir, tag)


_move_pointer_real = checkpoint._move_pointer
checkpoint_record.entries = _kill_before("record", checkpoint_record.entries)
checkpoint_record.write_record = _kill_before("merge", checkpoint_record.write_record)
dcp_filesystem._FileSystemWriter.write_data = write_data
if os.environ.get("MOP_TEST_ENGINE_FORMAT") == "1":
    checkpoint.Target.layout_free = property(lambda self: False)
checkpoint._move_pointer = _move_pointer
trainer.Trainer.train_step = train_step
trainer.lm_loss = lm_loss
torch_checkpoint_engine.TorchCheckpointEngine.save = save

if __name__ == "__main__":
    sys.exit(main())
