"""Stop training once the loss over one pass of the data stops improving (train.stop_on_plateau).

For a synthetic task the training data is the whole book, so the training loss averaged
over one pass (every entry once; `TrainData.samples_per_pass` samples) is the loss on the
book: when it stops falling the model is at its capacity, not at its budget. A pass ends
every ceil(samples_per_pass / global_batch) steps, counted from step 0, so the decision
depends only on the step and is the same after a resume (the pass in progress at a
preemption restarts its average; the best loss so far is not checkpointed, so a resumed
run starts its patience afresh). The losses are already averaged over ranks, so every rank
decides the same.

The rule, pass by pass (loss L = the mean training loss of the pass):

1. L improves if L < best - min_delta; then best = L and the count of bad passes is 0.
2. Otherwise best = min(best, L) and, if the rule is armed, the count grows by one.
3. The rule is armed once some pass had L < armed_below (always, if armed_below is None)
   and at least min_passes passes are done; it stops the run when the count reaches
   patience.

Why arming: a phone book is first learned in format only (name letters and digits at chance,
2.10 nats per token over an entry) and memorized only after a plateau of tens of passes
whose length grows with the book; patience alone either stops there (the issue's
4,000-entry book, stopped at pass 46 with the digits at chance) or must be so long that
every run wastes it at the end. Passes before arming never count, so the first plateau
cannot stop a run however long it lasts; only max_steps ends a run that never learns.

What it does not know: the lr schedule. While the lr is high, a small book's pass loss can sit
on a noisy plateau that the decay would still lower (a 125-entry book, cosine over 5,000 steps,
stopped at step 1,210 recalling 88.8%: configs/reproduce/phonebook_cpu.yaml trains to max_steps
for that reason). Use it where passes are long enough to average the noise out, or with a
patience that covers the schedule.
"""

from __future__ import annotations

import math

from pretrain.config import PlateauConfig
from pretrain.trainer import Callback, StepResult, Trainer


class PlateauStop(Callback):
    """Asks the trainer to stop after `patience` armed passes without a `min_delta` improvement."""

    def __init__(self, cfg: PlateauConfig, steps_per_pass: int, log=None):
        if steps_per_pass < 1:
            raise ValueError("steps_per_pass must be >= 1")
        self.cfg, self.steps_per_pass, self.log = cfg, steps_per_pass, log
        self.best = math.inf
        self.bad_passes = 0
        self.crossed = cfg.armed_below is None  # the loss has gone below armed_below
        self._sum, self._count = 0.0, 0
        self.pass_losses: list[float] = []

    @property
    def armed(self) -> bool:
        return self.crossed and len(self.pass_losses) >= self.cfg.min_passes

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if math.isfinite(result.lm_loss):
            self._sum += result.lm_loss
            self._count += 1
        if trainer.state.step % self.steps_per_pass or not self._count:
            return
        loss = self._sum / self._count
        self._sum, self._count = 0.0, 0
        self.pass_losses.append(loss)
        if self.cfg.armed_below is not None and loss < self.cfg.armed_below:
            self.crossed = True
        if loss < self.best - self.cfg.min_delta:
            self.best, self.bad_passes = loss, 0
        else:
            self.best = min(self.best, loss)
            self.bad_passes += self.armed
        if self.log is not None:
            self.log(
                trainer.state.step,
                {
                    "pass_loss": loss,
                    "plateau_passes": self.bad_passes,
                    "plateau_armed": int(self.armed),
                },
            )
        if self.bad_passes >= self.cfg.patience:
            trainer.request_stop(
                f"loss over a pass of the data {loss:.4f} has not improved by more than "
                f"{self.cfg.min_delta:g} for {self.bad_passes} passes (best {self.best:.4f})"
            )


def steps_per_pass(samples_per_pass: int, global_batch: int) -> int:
    """Optimizer steps that show every sample of one pass at least once."""
    return max(1, -(-samples_per_pass // global_batch))
