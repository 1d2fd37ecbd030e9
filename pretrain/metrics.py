"""Metrics: metrics.jsonl always (rank 0), wandb (offline by default) when enabled.

Only values computed by the trainer and the resolved config reach wandb; never the environment
(tokens and cluster variables live there). On resume, lines of steps after the checkpoint are
dropped so that metrics.jsonl holds each step once, as the resumed run computes it; event
records (an `event` key: a spike rollback, pretrain/spike.py) are kept whatever their step.
After a rollback the steps since the save are logged again: readers take the last record of a
step. wandb plots against the trainer's `step` (its own counter only grows), so the replayed
steps are not dropped there either.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mop.fileio import atomic_write_text
from pretrain.config import LoggingConfig


def mfu(flops_per_token: float, tokens_per_s: float, devices: int, peak_tflops: float | None):
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    if not peak_tflops or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (devices * peak_tflops * 1e12)


def expert_load(stats: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Per-layer expert load from the model's expert_stats (MoE layers only)."""
    out: dict[str, Any] = {}
    for layer, s in enumerate(stats):
        if "tokens_per_expert_frac" in s:
            out[f"expert_load/layer{layer}"] = [
                round(float(x), 6) for x in s["tokens_per_expert_frac"]
            ]
        if "max_imbalance" in s:
            out[f"expert_imbalance/layer{layer}"] = float(s["max_imbalance"])
    return out


@torch.no_grad()
def source_expert_counts(
    stats: list[dict[str, torch.Tensor]], source_ids: torch.Tensor, num_sources: int
) -> torch.Tensor | None:
    """[sources, MoE layers, experts] int64: token-assignments per expert of one micro-batch,
    by the data source of each sequence (from the layers' `expert_counts_per_row`); None for a
    model without token-choice MoE layers. Summed over micro-batches and ranks by the trainer."""
    layers = [st["expert_counts_per_row"] for st in stats if "expert_counts_per_row" in st]
    if not layers:
        return None
    per_row = torch.stack(layers, dim=1)  # [B, L, E]
    out = torch.zeros((num_sources, *per_row.shape[1:]), dtype=torch.int64, device=per_row.device)
    return out.index_add_(0, source_ids.to(per_row.device), per_row)


def expert_load_from_counts(
    counts: torch.Tensor, labels: list[str], by_source: bool = True
) -> dict[str, Any]:
    """Per-layer expert load (share of the assignments, max share / mean share) of a whole
    step from `source_expert_counts` summed over the step, and the same share per source."""
    out: dict[str, Any] = {}
    total = counts.sum(dim=0).double()  # [L, E]
    num_experts = total.shape[1]
    for layer, row in enumerate(total):
        frac = row / row.sum().clamp_min(1.0)
        out[f"expert_load/layer{layer}"] = [round(float(x), 6) for x in frac]
        out[f"expert_imbalance/layer{layer}"] = float(frac.max() * num_experts)
    if by_source:
        for s, label in enumerate(labels):
            for layer, row in enumerate(counts[s].double()):
                if row.sum() > 0:  # a source absent from this step has no load to show
                    frac = row / row.sum()
                    out[f"expert_load_by_source/{label}/layer{layer}"] = [
                        round(float(x), 6) for x in frac
                    ]
    return out


LAUNCH_INPUTS_MODULE = "wandb.sdk.launch.inputs.internal"


def look_for_launch_inputs_only_when_staged(wandb: Any) -> None:
    """wandb.init ends by applying the W&B Launch inputs a script staged before it
    (`wandb.launch.manage_config_file` / `manage_wandb_config`); to look, it imports
    `wandb.sdk.launch`, whose public-API models take 1.4 s to build on the 2-core machine
    (bench/RESULTS.md, start-up). Inputs can only have been staged through the module that
    holds them, so when it is not imported there is nothing to apply and wandb skips the
    import; when it is, wandb looks as before. Idempotent."""
    run_cls = getattr(getattr(getattr(wandb, "sdk", None), "wandb_run", None), "Run", None)
    look = getattr(run_cls, "_detect_and_apply_job_inputs", None)
    if look is None or getattr(look, "only_when_staged", False):
        return  # another wandb (the look renamed or gone): left as it is

    def look_if_staged(run: Any) -> None:
        if LAUNCH_INPUTS_MODULE in sys.modules:
            look(run)

    look_if_staged.only_when_staged = True  # type: ignore[attr-defined]
    run_cls._detect_and_apply_job_inputs = look_if_staged


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggingConfig,
        config_dict: dict,
        rank: int,
        resume_step: int | None,
    ):
        self.active = rank == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        # Called with (step, values) of every record (rank 0): the training console.
        self.listeners: list[Callable[[int, dict[str, Any]], None]] = []
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if cfg.wandb_mode != "disabled":
            import wandb

            look_for_launch_inputs_only_when_staged(wandb)
            self._wandb = wandb.init(
                project=cfg.project,
                name=cfg.run_name,
                mode=cfg.wandb_mode,
                dir=str(run_dir),
                config=config_dict,
                resume="allow",
            )
            self._wandb.define_metric("step")
            self._wandb.define_metric("*", step_metric="step")

    def _truncate_after(self, step: int | None) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if step is not None and ("event" in rec or rec.get("step", 0) <= step):
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        rec = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._wandb is not None:
            scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
            self._wandb.log(scalars)  # `step` is among them: the x axis (define_metric)
        for listener in self.listeners:
            listener(step, values)

    def close(self) -> None:
        if not self.active:
            return
        self._fh.close()
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v
