"""Loss-spike rollback (`spike.*`) and the fault that exercises it (`fault.spike_at_step`).

Detection. Each step is judged against the recent *normal* steps: the last `spike.history`
steps that were applied, finite and not suspicious by their loss. Their median and robust
spread (1.4826 x the median absolute deviation) of the loss and of the global gradient norm
are the reference. A step is suspicious when

- its loss is above `loss_ratio` x the median loss and more than `zscore` spreads above it, or
- its gradient norm (before clipping) is above `grad_norm_ratio` x the median norm and more
  than `zscore` spreads above it, or
- it was non-finite (skipped; see the trainer's docstring).

Both conditions of a test must hold: the ratio keeps a smooth late-training curve (tiny spread)
from alarming on harmless wiggles, the spread keeps a noisy small loss (a synthetic task near
zero) from alarming on its own noise. A spike is `min_suspicious` suspicious steps among the
last `window` steps, so one noisy step is never an alarm, and at least one of them must be a
loss or non-finite step: gradient-norm alarms alone never roll back. A model leaving a loss
plateau (a synthetic task before memorization starts, where the gradient is tiny) multiplies
its gradient norm tenfold while its loss stays on the plateau; clipped updates of that size do
not damage the weights, and damage that matters shows in the loss. Judging starts once the
reference holds `min_history` steps. The inputs are the rank-averaged loss and the global
norm, so every rank sees the same numbers and decides the same.

Which data, which save. Step k computes its loss with the weights after update k-1, on batch k,
then updates. If step F is the first suspicious step of a spike, either batch F is odd or update
F-1 damaged the weights. So the batches of steps F - skip_before .. D (D: the step the spike
was declared at) are skipped, and the run returns to the newest save from before update
F - max(skip_before, 1), i.e. a save of step <= F - 1 - max(skip_before, 1). Saves of later
steps are set aside (`step_X.spike-N`, never deleted; a background save in flight is awaited
first); while the window holds a loss or non-finite alarm no interval or stop-signal save
is taken (it would push a good save out of `keep_last`), only the final one. If `keep_last`
left no save that old, the newest intact save is used (a line says so). A fresh run saves
step 0 first, so a spike before the first interval save returns to the initial weights.

What survives. Skipped sample ranges are global sample indices of the pure-function sample
order (pretrain/data.py skips them), so they hold on any number of GPUs. They are kept in the
checkpoint's client state (`mop.spike`) and, from the moment of each rollback, in
`<checkpoint dir>/rollbacks.json`: a kill -9 right after a rollback restarts from the same
save with the same skip list. The reference statistics and the recent window are in the client
state too, so a resumed run judges its first steps like an uninterrupted one. A fresh start
(no save loaded) clears the file.

After a rollback the lr is multiplied by `lr_factor` for `lr_steps` steps (default: unchanged).
A spike with `max_rollbacks` rollbacks already within `rollback_span` steps of it is set aside
on disk like the others (so a rerun starts before it and skips its data), then the run stops
with SPIKE_EXIT_CODE = 67, which slurm/train.sbatch does not requeue: a person should look.

`fault.spike_at_step=N` applies the update of step N with its lr multiplied by
`fault.spike_lr_factor` (1000 by default): an update that damages every weight, through the
optimizer's own path (any ZeRO stage, precision or layout). It fires once per run: the step it
fired at is recorded in rollbacks.json and the client state, so the replay after the rollback
does not fire it again. A step with lr 0 (the first warm-up step) is not damaged by it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mop.fileio import atomic_write_json, read_json

if TYPE_CHECKING:
    from pretrain.config import FaultConfig, SpikeConfig
    from pretrain.data import TrainData
    from pretrain.trainer import StepResult, Trainer

SPIKE_EXIT_CODE = 67
LEDGER = "rollbacks.json"  # in the checkpoint directory
SET_ASIDE = "spike"  # a save set aside by a rollback: step_X.spike-N
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation of a normal

# Why a step is suspicious ("" = normal).
LOSS, GRAD_NORM, NONFINITE = "loss", "grad_norm", "non-finite"
DAMAGE = (LOSS, NONFINITE)  # what a rollback needs to see at least once in its window


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def robust_spread(values: list[float], center: float) -> float:
    return MAD_TO_SIGMA * median([abs(v - center) for v in values])


def _finite(x: float | None) -> bool:
    return x is not None and x == x and abs(x) != float("inf")


@dataclass
class StepRecord:
    """One observed step: its number, its global sample range [start, end), its numbers, and
    why it was suspicious ("" when it was not)."""

    step: int
    start: int
    end: int
    loss: float | None
    grad_norm: float | None
    applied: bool = True  # False: a non-finite step, skipped without an update
    why: str = ""


@dataclass
class Spike:
    """A detection at step `step` (D), `first` (F) being the window's first suspicious step."""

    step: int
    first: int
    counts: dict[str, int]
    reference_loss: float
    reference_grad_norm: float | None
    window: list[StepRecord]
    skip_steps: tuple[int, int]  # steps whose batches are skipped, inclusive
    skip_samples: tuple[int, int]  # global sample range [start, end)
    latest_save_step: int  # the newest save a rollback may return to

    def describe(self) -> str:
        parts = ", ".join(f"{why} {n}" for why, n in sorted(self.counts.items()))
        total = sum(self.counts.values())
        return f"{total} of the last {len(self.window)} steps suspicious: {parts}"


class SpikeDetector:
    """The reference statistics, the recent window and the verdict (module docstring)."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.history: deque[tuple[float, float | None]] = deque(maxlen=cfg.history)
        # Enough recent steps to know where the skipped batches before the window start.
        self.recent: deque[StepRecord] = deque(maxlen=cfg.window + max(cfg.skip_before, 1))

    @property
    def armed(self) -> bool:
        return len(self.history) >= self.cfg.min_history

    def _reference(self) -> tuple[float, float, float | None, float]:
        losses = [h[0] for h in self.history]
        norms = [h[1] for h in self.history if h[1] is not None]
        loss_med = median(losses)
        norm_med = median(norms) if norms else None
        norm_spread = robust_spread(norms, norm_med) if norms else 0.0
        return loss_med, robust_spread(losses, loss_med), norm_med, norm_spread

    def classify(self, loss: float, grad_norm: float | None, applied: bool) -> str:
        """Why a step is suspicious against the current reference ("" when it is not)."""
        if not applied or not _finite(loss) or (grad_norm is not None and not _finite(grad_norm)):
            return NONFINITE
        if not self.armed:
            return ""
        c = self.cfg
        loss_med, loss_spread, norm_med, norm_spread = self._reference()
        if loss > c.loss_ratio * loss_med and loss - loss_med > c.zscore * loss_spread:
            return LOSS
        if (
            c.grad_norm_ratio > 0
            and grad_norm is not None
            and norm_med is not None
            and grad_norm > c.grad_norm_ratio * norm_med
            and grad_norm - norm_med > c.zscore * norm_spread
        ):
            return GRAD_NORM
        return ""

    def window(self) -> list[StepRecord]:
        return list(self.recent)[-self.cfg.window :]

    @property
    def suspect(self) -> bool:
        """The window holds a step with damage in its loss (a save now might hold damaged
        weights); a gradient-norm alarm alone does not hold saves back."""
        return self.armed and any(r.why in DAMAGE for r in self.window())

    def observe(self, rec: StepRecord) -> Spike | None:
        """Record a step (its `why` filled in here); a Spike when the window says so."""
        armed = self.armed
        rec.why = self.classify(rec.loss, rec.grad_norm, rec.applied)
        self.recent.append(rec)
        if rec.why not in DAMAGE:
            # a gradient-norm alarm with a normal loss joins the reference, so a new gradient
            # level (a model leaving a plateau) becomes the normal one within history/2 steps
            self.history.append((float(rec.loss), rec.grad_norm))
        if not armed:
            return None
        win = self.window()
        bad = [r for r in win if r.why]
        if len(bad) < self.cfg.min_suspicious:
            return None
        if not any(r.why in DAMAGE for r in bad):  # no sign of damage in the loss
            return None
        first = bad[0].step
        before = max(self.cfg.skip_before, 1)
        skipped = [r for r in self.recent if r.step >= first - self.cfg.skip_before]
        loss_med, _, norm_med, _ = self._reference()
        counts: dict[str, int] = {}
        for r in bad:
            counts[r.why] = counts.get(r.why, 0) + 1
        return Spike(
            step=rec.step,
            first=first,
            counts=counts,
            reference_loss=loss_med,
            reference_grad_norm=norm_med,
            window=win,
            skip_steps=(skipped[0].step, rec.step),
            skip_samples=(skipped[0].start, rec.end),
            latest_save_step=first - 1 - before,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "recent": [asdict(r) for r in self.recent],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.history.clear()
        self.recent.clear()
        for loss, norm in (state or {}).get("history", []):
            self.history.append((float(loss), norm))
        for r in (state or {}).get("recent", []):
            self.recent.append(StepRecord(**r))


def set_lr_factor(engine, factor: float) -> None:
    """Every optimizer group's lr = the schedule's current value x factor. The schedule's value
    comes from the scheduler, not from the group, so calling it again never compounds."""
    sched = engine.lr_scheduler
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr * factor


def _json_float(x: float | None) -> float | None:
    return float(x) if _finite(x) else None


class SpikeGuard:
    """The trainer's side of the module: the detector, the rollbacks so far, the fault knob,
    and what a rollback does (module docstring). One per Trainer, on every rank."""

    def __init__(self, spike: SpikeConfig, fault: FaultConfig, data: TrainData, ckpt_dir, rank):
        self.cfg, self.fault, self.data = spike, fault, data
        self.ledger_path = Path(ckpt_dir) / LEDGER
        self.rank = rank
        self.detector = SpikeDetector(spike)
        self.rollbacks: list[dict[str, Any]] = []
        self.fault_fired_at: list[int] = []
        self.loaded = False  # a save's state was loaded (resume): not a fresh start
        self._lr_applied: float | None = 1.0  # None: unknown (after a load)

    # State: the checkpoint's client state and rollbacks.json -------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "rollbacks": [dict(e) for e in self.rollbacks],
            "fault_fired_at": list(self.fault_fired_at),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A save's state (None for a save from before this module), merged with what this
        process knows and with rollbacks.json: a rollback is never forgotten."""
        state = state or {}
        ledger = read_json(self.ledger_path) if self.ledger_path.is_file() else {}
        self.loaded = True
        self.detector.load_state_dict(state.get("detector"))
        events: dict[tuple, dict[str, Any]] = {}
        for e in [*self.rollbacks, *state.get("rollbacks", []), *ledger.get("rollbacks", [])]:
            events.setdefault((e["at_step"], *e["skip_samples"]), e)
        self.rollbacks = sorted(events.values(), key=lambda e: e["time"])
        fired = {*self.fault_fired_at, *state.get("fault_fired_at", [])}
        self.fault_fired_at = sorted(fired | set(ledger.get("fault_fired_at", [])))
        self.data.set_skipped(self.skip_ranges())
        self._lr_applied = None

    def skip_ranges(self) -> list[tuple[int, int]]:
        return [tuple(e["skip_samples"]) for e in self.rollbacks]

    def _write_ledger(self) -> None:
        if self.rank == 0:
            self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                self.ledger_path,
                {"rollbacks": self.rollbacks, "fault_fired_at": self.fault_fired_at},
            )

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[train] {text}", flush=True)

    # The loop's hooks ------------------------------------------------------------------------
    def begin(self, trainer: Trainer) -> None:
        """Before the first step. A fresh start forgets an earlier run's rollbacks and saves
        step 0, the rollback target until the first interval save."""
        if self.loaded:
            return
        if self.rank == 0:
            self.ledger_path.unlink(missing_ok=True)
        self.rollbacks, self.fault_fired_at = [], []
        self.data.set_skipped([])
        if self.cfg.enabled:
            trainer.save()

    def lr_factor(self, step: int) -> float:
        """The cool-down after the newest rollback, for step `step`."""
        last = next((e for e in reversed(self.rollbacks) if not e["stopped"]), None)
        if last is None or last["to_step"] is None:
            return 1.0
        return last["lr_factor"] if last["to_step"] < step <= last["lr_until_step"] else 1.0

    def _fault_fires(self, step: int) -> bool:
        return self.fault.spike_at_step == step and step not in self.fault_fired_at

    def _sync_lr(self, trainer: Trainer, factor: float) -> None:
        if factor != 1.0 or self._lr_applied != factor:
            set_lr_factor(trainer.engine, factor)
            self._lr_applied = factor

    def before_step(self, trainer: Trainer) -> None:
        step = trainer.state.step + 1
        factor = self.lr_factor(step)
        if self._fault_fires(step):
            factor *= self.fault.spike_lr_factor
            self._say(
                f"fault.spike_at_step={step}: the update of step {step} is applied with its "
                f"lr x{self.fault.spike_lr_factor:g} (a deliberate fault, once per run)"
            )
        self._sync_lr(trainer, factor)

    def observe(self, trainer: Trainer, result: StepResult, start: int) -> Spike | None:
        """After a step (its counters already advanced): judge it; a Spike to roll back."""
        st = trainer.state
        if self._fault_fires(st.step):
            self.fault_fired_at.append(st.step)
            self._write_ledger()
        self._sync_lr(trainer, self.lr_factor(st.step + 1))  # what the next step (and the log) uses
        rec = StepRecord(st.step, start, st.samples, result.loss, result.grad_norm, result.applied)
        spike = self.detector.observe(rec)
        return spike if self.cfg.enabled else None

    def holds_save(self, trainer: Trainer) -> bool:
        """Whether the save due now waits: the window holds a suspicious step. The final save
        of the run is taken anyway (with a warning)."""
        if not self.cfg.enabled or not self.detector.suspect:
            return False
        st = trainer.state
        bad = [r.step for r in self.detector.window() if r.why]
        if st.step >= trainer.cfg.max_steps or trainer.finished_reason is not None:
            self._say(
                f"warning: the final save holds steps above the spike thresholds ({bad}); "
                "look at metrics.jsonl before using it"
            )
            return False
        self._say(
            f"checkpoint of step {st.step} not taken: steps {bad} are above the spike "
            "thresholds (a save now could hold damaged weights)"
        )
        return True

    def roll_back(self, trainer: Trainer, spike: Spike) -> bool:
        """Collective. Set aside the saves from the spike on, record the rollback (its skipped
        samples), then, unless the run stops, load the newest save before the spike. True: too
        many rollbacks within the span, stop (exit 67)."""
        from pretrain import checkpoint

        c = self.cfg
        near = [e for e in self.rollbacks if abs(spike.step - e["at_step"]) < c.rollback_span]
        stop = len(near) >= c.max_rollbacks
        # A background save in flight must be complete (and told) before the saves are
        # looked at: it may be the newest one, of a step already inside the spike.
        trainer.report_checkpoints(wait=True)
        kept = checkpoint.set_aside_after(
            trainer.checkpoint_target, spike.latest_save_step, SET_ASIDE
        )
        to_step = None if kept is None else checkpoint.step_of(kept)
        event = {
            "at_step": spike.step,
            "first_step": spike.first,
            "to_step": to_step,
            "to_tag": kept,
            "skip_steps": list(spike.skip_steps),
            "skip_samples": list(spike.skip_samples),
            "why": spike.describe(),
            "reference_loss": _json_float(spike.reference_loss),
            "reference_grad_norm": _json_float(spike.reference_grad_norm),
            "losses": [_json_float(r.loss) for r in spike.window],
            "grad_norms": [_json_float(r.grad_norm) for r in spike.window],
            "lr_factor": c.lr_factor,
            "lr_until_step": None if to_step is None else to_step + c.lr_steps,
            "stopped": stop,
            "rollback": len(self.rollbacks) + 1,
            "time": time.time(),
        }
        self.rollbacks.append(event)
        self._write_ledger()  # before anything is loaded: a kill from here on keeps the skip
        self.data.set_skipped(self.skip_ranges())
        if not stop and not trainer.stopping:
            tag = trainer.resume(force=True)
            if tag is None:
                raise RuntimeError(f"rollback found no checkpoint in {trainer.cfg.checkpoint_dir}")
            if checkpoint.step_of(tag) != to_step:  # the intended save was damaged: an older one
                event["to_step"], event["to_tag"] = checkpoint.step_of(tag), tag
                event["lr_until_step"] = event["to_step"] + c.lr_steps
                self._write_ledger()
            if kept is not None and to_step is not None and to_step > spike.latest_save_step:
                self._say(
                    f"warning: no save from before step {spike.latest_save_step + 1} is left "
                    f"(checkpoint.keep_last={trainer.cfg.checkpoint.keep_last}): rolled back to "
                    f"{tag}, which may hold the damaging update"
                )
            trainer.finished_reason = None
        for cb in trainer.callbacks:
            hook = getattr(cb, "on_rollback", None)
            if hook is not None:
                hook(trainer, event)
        return stop

    def stop_message(self, trainer: Trainer) -> str:
        c = self.cfg
        last = self.rollbacks[-1]
        steps = [
            e["at_step"]
            for e in self.rollbacks
            if abs(last["at_step"] - e["at_step"]) < c.rollback_span
        ]
        back = "no save" if last["to_step"] is None else f"step {last['to_step']}"
        return (
            f"{len(steps)} loss spikes within {c.rollback_span} steps (at steps "
            f"{', '.join(map(str, steps))}; spike.max_rollbacks={c.max_rollbacks}): stopped "
            f"with exit {SPIKE_EXIT_CODE}. The newest save is {back}, from before the last "
            f"spike; the skipped samples are in {self.ledger_path} and metrics.jsonl. Inspect "
            "that data, lower optim.lr or set spike.lr_factor, or raise spike.max_rollbacks / "
            "spike.loss_ratio, then rerun the same command (it resumes there and skips the "
            "spike's data)"
        )
