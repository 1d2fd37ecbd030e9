"""Stop training once the loss over one pass of the data stops improving (train.stop_on_plateau).

For a synthetic task the training data is the whole book, so the training loss averaged
over one pass (every entry once; `TrainData.samples_per_pass` samples) is the loss on the
book: when it stops falling the model is at its capacity, not at its budget. A pass ends
every ceil(samples_per_pass / global_batch) steps, counted from step 0, so the decision
depends only on the step and is the same after a resume (the pass in progress at a
preemption restarts its average; the best loss so far is not checkpointed, so a resumed
run starts its patience afresh). The losses are already averaged over ranks, so every rank
decides the same.
"""

from __future__ import annotations

import math

from pretrain.config import PlateauConfig
from pretrain.trainer import Callback, StepResult, Trainer


class PlateauStop(Callback):
    """Asks the trainer to stop after `patience` passes without a `min_delta` improvement."""

    def __init__(self, cfg: PlateauConfig, steps_per_pass: int, log=None):
        if steps_per_pass < 1:
            raise ValueError("steps_per_pass must be >= 1")
        self.cfg, self.steps_per_pass, self.log = cfg, steps_per_pass, log
        self.best = math.inf
        self.bad_passes = 0
        self._sum, self._count = 0.0, 0
        self.pass_losses: list[float] = []

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if math.isfinite(result.lm_loss):
            self._sum += result.lm_loss
            self._count += 1
        if trainer.state.step % self.steps_per_pass or not self._count:
            return
        loss = self._sum / self._count
        self._sum, self._count = 0.0, 0
        self.pass_losses.append(loss)
        if loss < self.best - self.cfg.min_delta:
            self.best, self.bad_passes = loss, 0
        else:
            self.best = min(self.best, loss)
            self.bad_passes += 1
        if self.log is not None:
            self.log(trainer.state.step, {"pass_loss": loss, "plateau_passes": self.bad_passes})
        if self.bad_passes >= self.cfg.patience:
            trainer.request_stop(
                f"loss over a pass of the data {loss:.4f} has not improved by more than "
                f"{self.cfg.min_delta:g} for {self.bad_passes} passes (best {self.best:.4f})"
            )


def steps_per_pass(samples_per_pass: int, global_batch: int) -> int:
    """Optimizer steps that show every sample of one pass at least once."""
    return max(1, -(-samples_per_pass // global_batch))
