"""What a training run prints (rank 0): start-up phases, a banner, a line every
`logging.log_interval` steps, one per checkpoint and per validation pass, and a summary.

On an interactive terminal a live tqdm bar runs under the lines; in a SLURM log or a pipe only
plain lines are written, so `grep '^\\[train\\] step'` reads a run. The step and eval lines
show the values metrics.jsonl receives (the console listens to the MetricsLogger), so the two
never disagree. Other ranks print nothing.

Start-up is quiet: `quiet_third_party` pins DeepSpeed's logger at WARNING, `filter_known_chatter`
drops DeepSpeed's op-build print of a normal CPU start, matched by its exact text, so any
other message still shows, and ignores the one torch deprecation warning DeepSpeed's ZeRO
triggers on every multi-process start (`KNOWN_WARNINGS`, by exact message). (DS_ACCELERATOR,
set by pretrain.launch, avoids DeepSpeed's accelerator-guess warning.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mop.progress import eta, fmt_bytes, fmt_duration, interactive, say

if TYPE_CHECKING:  # importing the trainer imports torch: the console must print before that
    from pretrain.trainer import StepResult, Trainer

PREFIX = "[train]"
_IMPORTED = time.monotonic()


def process_age() -> float:
    """Seconds since this process started (interpreter start-up included), from /proc."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):  # not Linux
        return time.monotonic() - _IMPORTED


# Exact lines DeepSpeed prints on every normal start; nothing else is swallowed.
KNOWN_CHATTER = (
    # deepspeed/comm/torch.py build_shm_op: a bare print() on every CPU start
    re.compile(r"^DeepSpeed \S+ built successfully$"),
)


def announce_start(argv: list[str]) -> None:
    """The first line of a training process (rank 0), printed before torch is imported."""
    from pretrain.launch import dist_env

    if dist_env().rank == 0 and not {"--dry-run", "-h", "--help"} & set(argv):
        print(f"{PREFIX} starting: importing torch ... (+{process_age():.1f}s)", flush=True)


# Warnings every normal start prints, from code that is not ours: (message regex, category).
KNOWN_WARNINGS = (
    # DeepSpeed's ZeRO calls it on every multi-process start, once per rank (torch 2.13)
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
)


def quiet_third_party() -> None:
    """DeepSpeed logs INFO lines (config dumps, timers) from every rank: keep it at WARNING.
    Ignore the `KNOWN_WARNINGS` by their exact message; every other warning still shows."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class _ChatterFilter(io.TextIOBase):
    """A stream that forwards each complete line at once, unless it is `KNOWN_CHATTER` (so a
    message printed while a start-up phase hangs still shows)."""

    def __init__(self, real: TextIO):
        self.real, self._partial = real, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if not any(p.search(line) for p in KNOWN_CHATTER):
                self.real.write(line + "\n")
        self.real.flush()
        return len(text)

    def close_block(self) -> None:
        if self._partial and not any(p.search(self._partial) for p in KNOWN_CHATTER):
            self.real.write(self._partial)
        self.real.flush()


@contextlib.contextmanager
def filter_known_chatter(stream_name: str = "stdout") -> Iterator[None]:
    """In the block, `sys.<stream_name>` drops the known DeepSpeed start-up lines
    (`KNOWN_CHATTER`) and passes every other line through as it is written."""
    real = getattr(sys, stream_name)
    filtered = _ChatterFilter(real)
    setattr(sys, stream_name, filtered)
    try:
        yield
    finally:
        setattr(sys, stream_name, real)
        filtered.close_block()


def peak_memory_bytes() -> tuple[int, str]:
    """Peak device memory allocated by torch on CUDA, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "peak mem"
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_label(config_path: str, overrides: list[str]) -> str:
    """The model's name as the user chose it: the model YAML's stem (from `model=` on the
    command line or in the train config), else 'inline'."""
    import yaml

    for o in reversed(overrides):
        if o.startswith("model="):
            return Path(o.split("=", 1)[1]).stem
    with open(config_path, encoding="utf-8") as fh:
        raw = (yaml.safe_load(fh) or {}).get("model")
    return Path(raw).stem if isinstance(raw, str) else "inline"


class Console:
    """Rank 0's console; on other ranks every method is a no-op. It is one of the trainer's
    callbacks (on_step_end, on_checkpoint); it does not subclass trainer.Callback, whose
    module imports torch, so any other `on_*` hook is answered with a no-op."""

    def __init__(
        self,
        rank: int = 0,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ):
        self.active = rank == 0
        self.stream = sys.stdout if stream is None else stream
        self.bar_enabled = interactive(self.stream) if bar is None else bar
        self._bar = None
        self.max_steps = 0
        self.start_step = 0
        self._fit_t0: float | None = None
        self._window: tuple[int, float] | None = None  # (step, time) of the last step line
        self.last: dict[str, Any] = {}  # newest value of each logged metric
        self.last_checkpoint: str | None = None

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    # Plain output ------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        if not self.active:
            return
        if self._bar is not None:
            say(f"{PREFIX} {text}", self.stream)
        else:
            self.stream.write(f"{PREFIX} {text}\n")
            self.stream.flush()

    def phase(self, what: str) -> None:
        """A start-up phase, with the seconds since the process started."""
        self.line(f"{what} ... (+{process_age():.1f}s)")

    # Banner -------------------------------------------------------------------------------------
    def banner(self, trainer: Trainer, model_name: str, precision: str, resumed: str | None):
        from pretrain.model.accounting import model_size
        from pretrain.model_info import experts_of, human

        cfg, sizes, mesh, st = trainer.cfg, trainer.sizes, trainer.mesh, trainer.state
        ms = model_size(cfg.model, seq_len=cfg.data.seq_len)
        m = cfg.model
        kind = cfg.model.ffn if cfg.model.ffn == "dense" else f"{m.ffn} {experts_of(m)}"
        self.max_steps, self.start_step = cfg.max_steps, st.step
        self.line(
            f"model {model_name}: {human(ms.total_params)} params, {human(ms.active_params)} "
            f"active per token ({kind}, {m.n_layers} layers, d {m.d_model})"
        )
        self.line(
            f"layout: world {sizes.world_size} (dp {mesh.dp}, tp {mesh.tp}, ep {mesh.ep}), "
            f"ZeRO-{cfg.zero_stage}, {precision}, global batch {sizes.global_batch} x "
            f"{cfg.data.seq_len} tokens (micro {sizes.micro_batch} x accum {sizes.grad_accum} "
            f"x dp {mesh.dp})"
        )
        total_tokens = cfg.max_steps * sizes.tokens_per_step
        self.line(
            f"plan: {cfg.max_steps:,} steps x {human(sizes.tokens_per_step)} tokens = "
            f"{human(total_tokens)} tokens"
        )
        self.line(f"run dir: {cfg.run_dir} (checkpoints: {cfg.checkpoint_dir})")
        if cfg.logging.peak_tflops is None:
            self.line("MFU: not shown; set logging.peak_tflops to the device's peak TFLOP/s")
        self.line(spike_guard_line(cfg))
        at = cfg.fault.spike_at_step
        if at is not None and at in trainer.guard.fault_fired_at:
            self.line(f"fault: fault.spike_at_step={at} already fired in this run (once per run)")
        elif at is not None:
            self.line(
                f"fault: the update of step {at} will be damaged on purpose "
                f"(fault.spike_at_step; lr x{cfg.fault.spike_lr_factor:g}, once per run)"
            )
        if resumed:
            self.line(resume_line(trainer, resumed, human(st.tokens)))
        else:
            self.line("fresh start")

    # Callback hooks -----------------------------------------------------------------------------
    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not self.active:
            return
        now = time.monotonic()
        if self._fit_t0 is None:
            self._fit_t0 = now - result.seconds
            self._window = (trainer.state.step - 1, self._fit_t0)
            if self.bar_enabled:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=self.max_steps,
                    initial=trainer.state.step - 1,
                    desc="train",
                    unit="step",
                    file=self.stream,
                    dynamic_ncols=True,
                )
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"loss {result.loss:.4f}", refresh=False)

    def on_checkpoint(self, trainer: Trainer, tag: str, seconds: float, path: Path) -> None:
        if not self.active:
            return
        self.last_checkpoint = str(path)
        done = getattr(trainer, "last_save", None)
        waited = (
            f", {done.waited_s:.1f}s of it waiting for the previous save"
            if (done is not None and done.waited_s >= 0.05)
            else ""
        )
        blocked = "" if done is None else f", loop blocked {done.blocking_s:.2f}s{waited}"
        self.line(
            f"checkpoint {tag} saved in {seconds:.1f}s ({fmt_bytes(dir_bytes(path))}{blocked})"
        )

    def on_metrics(self, step: int, values: dict[str, Any]) -> None:
        """MetricsLogger listener: a step line for a training record, an eval line for a
        validation record."""
        if not self.active:
            return
        if values.get("event") == "rollback":
            self.line(rollback_line(values))
            return
        self.last.update(values)
        if "val_loss" in values:
            self.line(
                f"eval step {step}: val loss {values['val_loss']:.4f}, "
                f"ppl {values.get('val_ppl', float('nan')):.2f}"
            )
        if "loss" in values:
            self.line(self.step_line(step, values))

    def step_line(self, step: int, v: dict[str, Any]) -> str:
        from pretrain.model_info import human

        now = time.monotonic()
        left = None
        if self._window is not None:
            w_step, w_t = self._window
            left = eta(step - w_step, self.max_steps - w_step, now - w_t)
        self._window = (step, now)
        mem, mem_label = peak_memory_bytes()
        gn = v.get("grad_norm")
        mfu = v.get("mfu")
        skipped = "" if v.get("step_applied", True) else " | SKIPPED (non-finite)"
        return (
            f"step {step}/{self.max_steps} | loss {v['loss']:.4f} | lr {v['lr']:.2e} | "
            f"grad norm {'-' if gn is None else f'{gn:.3f}'} | "
            f"{human(v.get('tokens_per_s', 0.0))} tok/s | "
            f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
            f"{mem_label} {fmt_bytes(mem)} | ETA {fmt_duration(left)}{skipped}"
        )

    # Summary ------------------------------------------------------------------------------------
    def summary(self, trainer: Trainer, code: int) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        from pretrain.model_info import human
        from pretrain.trainer import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, SPIKE_EXIT_CODE

        st, cfg = trainer.state, trainer.cfg
        how = {
            0: "done",
            REQUEUE_EXIT_CODE: f"stopped by a signal (exit {REQUEUE_EXIT_CODE}: requeue to resume)",
            NONFINITE_EXIT_CODE: f"stopped: non-finite steps (exit {NONFINITE_EXIT_CODE})",
            SPIKE_EXIT_CODE: f"stopped: repeated loss spikes (exit {SPIKE_EXIT_CODE})",
        }.get(code, f"exit {code}")
        train_s = 0.0 if self._fit_t0 is None else time.monotonic() - self._fit_t0
        ran = st.step - self.start_step
        rollbacks = len(trainer.guard.rollbacks)
        rolled = f", {rollbacks} rolled back" if rollbacks else ""
        self.line(
            f"{how}: step {st.step}/{cfg.max_steps} ({ran:,} this run, {st.skipped_steps} "
            f"skipped{rolled}), {human(st.tokens)} tokens; training {fmt_duration(train_s)}, wall "
            f"{fmt_duration(process_age())}"
        )
        losses = [f"loss {self.last['loss']:.4f}"] if "loss" in self.last else []
        if "val_loss" in self.last:
            losses.append(f"val loss {self.last['val_loss']:.4f} (ppl {self.last['val_ppl']:.2f})")
        if losses:
            self.line("final " + ", ".join(losses))
        run = Path(cfg.run_dir)
        outputs = f"outputs: {run / 'metrics.jsonl'}, {run / 'config.yaml'}"
        if self.last_checkpoint:
            outputs += f", last checkpoint {self.last_checkpoint}"
        self.line(outputs)


def resume_line(trainer, tag: str, tokens: str) -> str:
    """`resumed from step_X (...)`: with the layout it was saved in when that differs."""
    st, cfg = trainer.state, trainer.cfg
    togo = f"{max(cfg.max_steps - st.step, 0):,} steps to go"
    loaded = getattr(trainer, "resumed", None)
    if loaded is None or not loaded.layout_changed:
        return f"resumed from {tag} (step {st.step}, {tokens} tokens seen); {togo}"
    from pretrain.checkpoint import describe

    return (
        f"resumed from {tag} (saved with {describe(loaded.saved)}; now {describe(loaded.now)}): "
        f"step {st.step}, {tokens} tokens seen, state resharded in {loaded.seconds:.1f}s; {togo}"
    )


def spike_guard_line(cfg) -> str:
    """The banner's account of the spike guard's thresholds (spike.*, pretrain/spike.py)."""
    c = cfg.spike
    if not c.enabled:
        return "spike guard: off (spike.enabled=false): loss spikes are trained through"
    norm = f" or grad norm > {c.grad_norm_ratio:g}x" if c.grad_norm_ratio > 0 else ""
    return (
        f"spike guard: roll back when {c.min_suspicious} of {c.window} steps have loss > "
        f"{c.loss_ratio:g}x{norm} the median of the last {c.history} (and > {c.zscore:g} "
        f"spreads), or are non-finite; at most {c.max_rollbacks} per {c.rollback_span} steps, "
        "then exit 67"
    )


def rollback_line(v: dict[str, Any]) -> str:
    """One line for a rollback record of metrics.jsonl (pretrain/spike.py)."""
    a, b = v["skip_samples"]
    first, last = v["skip_steps"]
    losses = [x for x in v.get("losses", []) if x is not None]
    ref = v.get("reference_loss")
    seen = f"; loss up to {max(losses):.4g} vs median {ref:.4g}" if losses and ref else ""
    back = v.get("to_tag") or "no save"
    head = f"LOSS SPIKE at step {v['at_step']} ({v['why']}, first at step {v['first_step']}{seen})"
    skip = f"samples {a}-{b - 1} (the batches of steps {first}-{last})"
    if v.get("stopped"):
        return f"{head}: set aside the saves after {back}, which skips {skip} on a rerun; stopping"
    lr = ""
    if v.get("lr_factor", 1.0) != 1.0 and v.get("lr_until_step") is not None:
        lr = f"; lr x{v['lr_factor']:g} until step {v['lr_until_step']}"
    return f"ROLLBACK {v['rollback']}: {head}: back to {back}, skipping {skip}{lr}"
