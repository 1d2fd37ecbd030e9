"""The training loop: short, with logging, eval and checkpoint policy as callbacks.

Exit codes (also returned by `python -m pretrain`):

- 0 `max_steps` reached, or a callback called `request_stop` (train.stop_on_plateau); a
  final checkpoint is written.
- REQUEUE_EXIT_CODE = 75 (EX_TEMPFAIL, not `timeout`'s 124): SIGTERM or SIGUSR1 arrived (SLURM preemption / time limit signal);
  the current step was finished, a checkpoint written, and the job should be requeued. The
  sbatch templates requeue on this code; the next run resumes from the checkpoint.
- NONFINITE_EXIT_CODE = 65: `max_nonfinite_in_a_row` consecutive steps had a non-finite loss or
  gradient. Nothing is saved after the first of them, so the newest checkpoint is the last good
  one; lower the lr or inspect the data before resuming.
- 66 (mop.errors.DamagedStateError): resume found every checkpoint damaged (each one moved
  aside as step_X.damaged-N, pretrain/checkpoint.py); not requeued.
- SPIKE_EXIT_CODE = 67: a loss spike came with `spike.max_rollbacks` rollbacks already within
  `spike.rollback_span` steps (pretrain/spike.py). It was set aside like the others (the newest
  save is from before it, its data is skipped on the rerun); not requeued: a person should look.

Loss spikes (`spike.*`, on by default): after each step the spike guard judges the loss and the
gradient norm; a spike rolls the run back to the newest save from before it, skips the data
that led to it and goes on (pretrain/spike.py). Non-finite steps count as suspicious steps
there, so with the defaults a run of them rolls back before `max_nonfinite_in_a_row` ends it.

A step with a non-finite loss or gradient makes no optimizer update (DeepSpeed's ZeRO optimizer
skips it and leaves the lr schedule where it was); its samples are consumed, and it is counted
in `skipped_steps`. `max_steps` counts attempted steps.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mop.config import save_resolved, to_yaml
from mop.errors import DataError
from pretrain import checkpoint
from pretrain.config import DerivedSizes, TrainConfig
from pretrain.data import TrainData, ValidationSet
from pretrain.deepspeed_compat import step_without_update
from pretrain.metrics import (
    MetricsLogger,
    expert_load,
    expert_load_from_counts,
    mfu,
    source_expert_counts,
)
from pretrain.model.accounting import model_size
from pretrain.model.transformer import lm_loss
from pretrain.parallel import Mesh
from pretrain.parallel.mesh import collective_device
from pretrain.parallel.tensor import vocab_parallel_lm_loss
from pretrain.spike import SPIKE_EXIT_CODE, SpikeGuard
from pretrain.stop import stop_requested

REQUEUE_EXIT_CODE = 75
NONFINITE_EXIT_CODE = 65


@dataclass
class TrainState:
    """What the loop carries; saved as the checkpoint's client state."""

    step: int = 0
    samples: int = 0  # global samples consumed = position in the pure-function sample order
    tokens: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    aux_loss: float
    applied: bool
    grad_norm: float | None
    seconds: float
    expert_stats: list = field(default_factory=list)
    # [sources, MoE layers, experts] assignments of this rank's micro-batches (None: no MoE)
    expert_counts: torch.Tensor | None = None


def _all_reduce_mean(values: list[float], mesh: Mesh) -> list[float]:
    # Over the data-parallel group: the tp ranks of one dp group already hold the same values.
    if mesh.dp == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(mesh.dp_group))
    dist.all_reduce(t, group=mesh.dp_group)
    return (t / mesh.dp).tolist()


def batch_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The LM loss of this rank's logits: vocab-sharded under tensor parallel."""
    if mesh.tp > 1:
        return vocab_parallel_lm_loss(logits, targets, mesh.tp_group)
    return lm_loss(logits, targets)  # looked up at call time (the test fault wrapper wraps it)


def _grads_finite(model: torch.nn.Module) -> bool:
    """Whether every rank's (already all-reduced) gradients are finite: one host read however
    many parameters (a bool() per parameter waited for the device once each). The largest
    |gradient| is finite exactly when every gradient is (no sum that could overflow)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    biggest = torch.nn.utils.get_total_norm(grads, norm_type=math.inf, foreach=True)
    bad = (~torch.isfinite(biggest)).to(torch.float32).reshape(1)
    if dist.is_initialized():
        bad = bad.to(collective_device())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host tensors (a micro-batch) onto the engine's device. On CUDA they go through pinned
    (page-locked) memory with non_blocking=True: the copy is queued on the stream and the host
    goes on to the forward; a copy from pageable memory makes the host wait for it."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


class Callback:
    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        """Called on every rank after each step (collectives are allowed). `trainer.stopping`
        says whether this is the last step before a requeue (a stop signal arrived)."""

    def on_checkpoint(self, trainer: Trainer, tag: str, seconds: float, path: Path) -> None:
        """Called on every rank once a checkpoint is complete (the pointer moved)."""

    def on_rollback(self, trainer: Trainer, event: dict[str, Any]) -> None:
        """Called on every rank after a spike rollback (pretrain/spike.py; `event` is its
        rollbacks.json record); the state is already the save's, unless event["stopped"]."""


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        engine,
        data: TrainData,
        val: ValidationSet | None,
        sizes: DerivedSizes,
        mesh: Mesh,
        tokenizer_sha256: str,
        callbacks: list[Callback],
    ):
        self.cfg, self.engine, self.data, self.val = cfg, engine, data, val
        self.sizes, self.mesh, self.tokenizer_sha256 = sizes, mesh, tokenizer_sha256
        self.callbacks = callbacks
        self.state = TrainState()
        self.stopping = False  # all ranks agreed to stop after this step (stop signal)
        self.finished_reason: str | None = None  # set by request_stop: end after this step
        self.guard = SpikeGuard(cfg.spike, cfg.fault, data, cfg.checkpoint_dir, mesh.rank)

    def request_stop(self, reason: str) -> None:
        """A callback's way to end the run as finished (exit 0, after saving) this step.
        Callers must decide the same on every rank (e.g. from rank-averaged losses)."""
        self.finished_reason = reason

    # Signals ----------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return stop_requested()  # pretrain/stop.py: set by SIGTERM / SIGUSR1

    def _stop_agreed(self) -> bool:
        if self.mesh.world_size == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank signalled -> all stop together
        return bool(flag.item())

    # Checkpoints ------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        # One namespaced key: DeepSpeed keeps names such as `skipped_steps` for itself and
        # drops them from the client state it hands back.
        return {
            "mop": {
                **self.state.as_dict(),
                "tokenizer_sha256": self.tokenizer_sha256,
                "world_size": self.mesh.world_size,
                "global_batch": self.sizes.global_batch,
                "config_yaml": to_yaml(self.cfg),
                "spike": self.guard.state_dict(),  # skipped samples, detector (pretrain/spike.py)
            }
        }

    @property
    def checkpoint_target(self) -> checkpoint.Target:
        """One per run: it holds the save in flight and the checkpoint's process group."""
        target = self.__dict__.get("_checkpoint_target")
        if target is None:
            target = checkpoint.Target(
                self.engine,
                self.mesh,
                self.cfg.checkpoint_dir,
                async_save=self.cfg.checkpoint.async_save,
            )
            self._checkpoint_target = target
        return target

    def save(self) -> None:
        """Save the current step (collective); when is CheckpointCallback's choice. Returns
        once the loop may go on: with checkpoint.async_save the files are still being written
        (`report_checkpoints` tells the callbacks when a save is complete)."""
        checkpoint.save(
            self.checkpoint_target,
            self.state.step,
            self.client_state(),
            self.cfg.checkpoint.keep_last,
        )
        self.report_checkpoints()

    def report_checkpoints(self, wait: bool = False) -> None:
        """Call `on_checkpoint` for each save completed since the last call (on each rank
        when its own part is done: no collectives there); `wait`: first block until the save
        in flight is complete (the end of a run, before exit 75)."""
        target = self.checkpoint_target
        if wait:
            checkpoint.wait(target)
        for done in checkpoint.poll(target):
            self.last_save = done
            for cb in self.callbacks:
                cb.on_checkpoint(self, done.tag, done.total_s, done.path)

    def resume(self, force: bool = False) -> str | None:
        """Load the newest intact save (None: none). `force`: also with checkpoint.resume=never
        (a spike rollback returns to this run's own saves)."""
        if self.cfg.checkpoint.resume == "never" and not force:
            return None
        loaded = checkpoint.load(self.checkpoint_target)
        if loaded is None:
            return None
        self.resumed = loaded  # the banner says where it came from (layout, reshard time)
        cs = loaded.client_state["mop"]
        if cs.get("tokenizer_sha256") != self.tokenizer_sha256:
            raise DataError(
                f"checkpoint {loaded.tag} was trained with tokenizer "
                f"{str(cs.get('tokenizer_sha256'))[:12]}..., the data now uses "
                f"{self.tokenizer_sha256[:12]}...; point data.data_dir at matching shards"
            )
        for key in self.state.as_dict():
            setattr(self.state, key, int(cs[key]))
        self.guard.load_state_dict(cs.get("spike"))
        return loaded.tag

    # The loop ---------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        engine, st = self.engine, self.state
        t0 = time.perf_counter()
        skipped_before = engine.skipped_steps
        batches = self.data.micro_batches(
            st.samples,
            self.sizes.global_batch,
            self.mesh.dp,
            self.mesh.dp_rank,
            self.sizes.micro_batch,
        )
        # Loss sums stay on the device (float64, the order of the host sums they replace): no
        # host sync between micro-batches; one read after the optimizer step.
        sums = None
        counts = None
        for i, mb in enumerate(batches):
            input_ids, targets, source_ids = to_device(
                engine.device, mb.input_ids, mb.targets, mb.source_ids
            )
            out = engine(input_ids)
            mb_counts = source_expert_counts(out.expert_stats, source_ids, len(self.data.labels))
            if mb_counts is not None:
                counts = mb_counts if counts is None else counts + mb_counts
            lm = batch_lm_loss(out.logits, targets, self.mesh)
            loss = lm + out.aux_loss
            aux, expert_stats = out.aux_loss.detach(), out.expert_stats
            # The logits ([B, T, V], ~2 GB at the paper's shapes) are not needed by the
            # backward (the loss saved its own fp32 softmax): free them before it, and never
            # keep them into the next micro-batch's forward.
            del out
            engine.backward(loss)
            del loss
            boundary = i == len(batches) - 1
            if boundary and self.cfg.zero_stage == 0 and not _grads_finite(engine.module):
                step_without_update(engine)
            else:
                engine.step()  # DeepSpeed updates only at the accumulation boundary
            mb_sums = torch.stack([lm.detach(), aux]).double()
            sums = mb_sums if sums is None else sums + mb_sums
        lm_sum, aux_sum = sums.tolist()
        n = len(batches)
        lm_mean, aux_mean = _all_reduce_mean([lm_sum / n, aux_sum / n], self.mesh)
        applied = engine.skipped_steps == skipped_before
        norm = engine.get_global_grad_norm()
        return StepResult(
            loss=lm_mean + aux_mean,
            lm_loss=lm_mean,
            aux_loss=aux_mean,
            applied=applied and math.isfinite(lm_mean + aux_mean),
            grad_norm=None if norm is None else float(norm),
            seconds=time.perf_counter() - t0,
            expert_stats=expert_stats,
            expert_counts=counts,
        )

    def fit(self) -> int:
        """Run to max_steps; returns the process exit code (see the module docstring)."""
        st, cfg, guard = self.state, self.cfg, self.guard
        guard.begin(self)  # a fresh start saves step 0 (a spike's way back)
        while st.step < cfg.max_steps:
            guard.before_step(self)  # the lr of this step: a rollback's cool-down, the fault
            first = st.samples
            result = self.train_step()
            st.step += 1
            st.samples = self.data.batch_end(first, self.sizes.global_batch)
            st.tokens += self.sizes.tokens_per_step
            if result.applied:
                st.nonfinite_in_a_row = 0
            else:
                st.skipped_steps += 1
                st.nonfinite_in_a_row += 1
            spike = guard.observe(self, result, first)  # same inputs, same verdict on every rank
            self.stopping = self._stop_agreed()
            for cb in self.callbacks:
                cb.on_step_end(self, result)
            if spike is not None:
                if guard.roll_back(self, spike):
                    if self.mesh.rank == 0:
                        message = guard.stop_message(self)
                        print(f"[train] {message}", flush=True)
                        print(f"error: {message}", file=sys.stderr, flush=True)
                    return SPIKE_EXIT_CODE
                if self.stopping:
                    if self.mesh.rank == 0:
                        print(
                            f"[train] stop signal at a rollback (step {st.step}): exit "
                            f"{REQUEUE_EXIT_CODE}; the restart resumes before the spike"
                        )
                    return REQUEUE_EXIT_CODE
                continue
            if st.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                if self.mesh.rank == 0:
                    print(
                        f"[train] {st.nonfinite_in_a_row} non-finite steps in a row at step "
                        f"{st.step}: stopping; the newest checkpoint is the last good one",
                        flush=True,
                    )
                return NONFINITE_EXIT_CODE
            if self.finished_reason is not None and not self.stopping:
                if self.mesh.rank == 0:
                    print(f"[train] finished at step {st.step}: {self.finished_reason}")
                return 0
            if self.stopping:
                if self.mesh.rank == 0:
                    print(f"[train] stop signal after step {st.step}: exit {REQUEUE_EXIT_CODE}")
                return REQUEUE_EXIT_CODE
        return 0


class LoggingCallback(Callback):
    """metrics.jsonl / wandb every `log_interval` steps: loss, lr, grad norm, throughput, MFU,
    expert load per layer and per data source, skipped steps."""

    def __init__(self, logger: MetricsLogger, cfg: TrainConfig, flops_per_token: float):
        self.logger, self.cfg, self.flops_per_token = logger, cfg, flops_per_token
        self._seconds = 0.0
        self._steps = 0

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        self._seconds += result.seconds
        self._steps += 1
        st = trainer.state
        if st.step % self.cfg.logging.log_interval and st.step != self.cfg.max_steps:
            return
        tokens_per_s = trainer.sizes.tokens_per_step * self._steps / max(self._seconds, 1e-9)
        values: dict[str, Any] = {
            "loss": result.loss,
            "lm_loss": result.lm_loss,
            "aux_loss": result.aux_loss,
            "lr": trainer.engine.get_lr()[0],
            "grad_norm": result.grad_norm,
            "step_applied": result.applied,
            "skipped_steps": st.skipped_steps,
            "rollbacks": len(trainer.guard.rollbacks),
            "samples": st.samples,
            "tokens": st.tokens,
            "tokens_per_s": tokens_per_s,
        }
        m = mfu(
            self.flops_per_token,
            tokens_per_s,
            trainer.mesh.world_size,
            self.cfg.logging.peak_tflops,
        )
        if m is not None:
            values["mfu"] = m
        if result.expert_counts is not None:
            # The whole step's routing: every micro-batch of every data-parallel rank (tp
            # ranks of one dp rank hold the same counts; expert-parallel ranks are dp ranks).
            counts = result.expert_counts
            if trainer.mesh.dp > 1:
                # to(): a copy (the step's counts stay as they were) on the collective's device
                counts = counts.to(collective_device(trainer.mesh.dp_group), copy=True)
                dist.all_reduce(counts, group=trainer.mesh.dp_group)
            values.update(
                expert_load_from_counts(
                    counts.cpu(), trainer.data.labels, self.cfg.logging.expert_load_by_source
                )
            )
        else:
            values.update(expert_load(result.expert_stats))
        self.logger.log(st.step, values)
        self._seconds, self._steps = 0.0, 0

    def on_rollback(self, trainer: Trainer, event: dict[str, Any]) -> None:
        # At the step the spike was declared; an event record (kept through a resume's
        # truncation of later steps, pretrain/metrics.py). The console prints it from here.
        self.logger.log(event["at_step"], {"event": "rollback", **event})
        self._seconds, self._steps = 0.0, 0


class CheckpointCallback(Callback):
    """When to save: every `checkpoint.interval` steps, at `max_steps`, and before a requeue
    (stop signal); never right after a skipped (non-finite) step, so the newest save stays a
    good one. How many to keep (`keep_last`) is applied by each save. A background save is
    awaited when the run ends this step (a stop signal exits 75 only once it is complete), and
    each complete save is logged (`checkpoint_blocking_s`, `checkpoint_total_s`)."""

    def __init__(self, cfg: TrainConfig, logger: MetricsLogger | None = None):
        self.interval, self.max_steps = cfg.checkpoint.interval, cfg.max_steps
        self.logger = logger

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        step = trainer.state.step
        due = (
            trainer.stopping
            or trainer.finished_reason is not None  # request_stop: the run ends this step
            or step % self.interval == 0
            or step == self.max_steps
        )
        if result.applied and due and not trainer.guard.holds_save(trainer):
            trainer.save()
        ending = trainer.stopping or trainer.finished_reason is not None or step == self.max_steps
        trainer.report_checkpoints(wait=ending)

    def on_checkpoint(self, trainer: Trainer, tag: str, seconds: float, path: Path) -> None:
        done = trainer.last_save
        if self.logger is not None:
            self.logger.log(
                trainer.state.step,
                {
                    "checkpoint": tag,
                    "checkpoint_blocking_s": done.blocking_s,
                    # of which waiting for the previous save (one save in flight)
                    "checkpoint_waited_s": done.waited_s,
                    "checkpoint_total_s": seconds,
                },
            )


class EvalCallback(Callback):
    """Validation loss and perplexity on the fixed held-out sequences every `eval.interval`."""

    def __init__(self, logger: MetricsLogger, cfg: TrainConfig):
        self.logger, self.cfg = logger, cfg

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        ev = self.cfg.eval
        if not ev.interval or trainer.val is None or trainer.state.step % ev.interval:
            return
        model = trainer.engine.module
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)  # sum of token losses, token count
        with torch.no_grad():
            for inp, tgt in trainer.val.batches(
                trainer.mesh.dp, trainer.mesh.dp_rank, ev.batch_size, ev.max_batches
            ):
                logits = model(inp.to(trainer.engine.device)).logits
                count = int((tgt != -100).sum())
                if count:  # a filler batch (see ValidationSet.batches) only keeps ranks in step
                    loss = batch_lm_loss(logits, tgt.to(logits.device), trainer.mesh)
                    total[0] += float(loss) * count
                    total[1] += count
        model.train()
        if trainer.mesh.dp > 1:
            total = total.to(collective_device(trainer.mesh.dp_group))
            dist.all_reduce(total, group=trainer.mesh.dp_group)
            total = total.cpu()
        val_loss = float(total[0] / total[1].clamp_min(1))
        self.logger.log(trainer.state.step, {"val_loss": val_loss, "val_ppl": math.exp(val_loss)})


def flops_per_token(cfg: TrainConfig) -> float:
    return model_size(cfg.model, seq_len=cfg.data.seq_len).flops_per_token


def write_run_config(cfg: TrainConfig, rank: int) -> None:
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, Path(cfg.run_dir) / "config.yaml")
