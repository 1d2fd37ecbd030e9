"""Train a sequence classifier on a tensor theory task and record its accuracy.

    python -m pretrain.memorization --data DIR --model configs/model/X.yaml [key=value ...]
        --steps N [--lr 1e-3] [--batch-size 0] [--weight-decay 0] [--warmup 0]
        [--schedule constant] [--min-lr-ratio 0.1] [--target-accuracy 1.0] [--log-every 10]
        [--seed 0] [--device cpu] [--name NAME] --out RUN_DIR

DIR comes from `python -m data_prep synthetic memorization` (random labels to store: the
accuracy is on the training set) or `... synthetic length2-path` (the reasoning task: the
accuracy is on the held-out test graphs, the training accuracy is kept beside it). The model
YAML is read as a `ClassifierConfig` (a ModelConfig plus `input_dim`, causal=false by
default) and `input_dim` is taken from the data. Training: AdamW on BCE-with-logits against
(y + 1) / 2, plus the MoE auxiliary losses, full batch (`--batch-size 0`, the default) or
shuffled minibatches (every sequence once per epoch); an optional linear warmup, then a
constant lr or a cosine decay to `--min-lr-ratio` x lr (`--schedule`). `--target-accuracy`
stops early once the training accuracy reaches it at a log step.

RUN_DIR gets metrics.jsonl (one line per log step), model.safetensors, config.yaml (the
resolved config) and results.json with the task's `synthetic` section (`accuracy`, `n`; for
a task with a test split also `train_accuracy`, `n_test` and the graph size `vertices`) and
the model header (total/active parameters from `classifier_size`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mop.cli import check_device
from mop.config import apply_overrides, read_yaml, save_resolved, validate
from mop.errors import ConfigError, DataError, check_dir_target, cli_entry
from pretrain.model.config import ClassifierConfig

# torch is imported inside the functions: a bad flag or path is reported before it loads.
if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from pretrain.model.classifier import SequenceClassifier


def load_classifier_config(
    path: str | None, overrides: list[str] | None, input_dim: int, seq_len: int
) -> ClassifierConfig:
    """Model YAML + overrides as a ClassifierConfig whose input_dim matches the data."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    if data.get("input_dim", input_dim) != input_dim:
        raise ConfigError(f"input_dim={data['input_dim']} but the data has vectors of {input_dim}")
    data["input_dim"] = input_dim
    cfg = validate(ClassifierConfig, data)
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"sequences of {seq_len} vectors exceed max_seq_len={cfg.max_seq_len}")
    return cfg


@dataclass
class TensorTask:
    """A tensor task directory's splits: the test split is None where test = train."""

    name: str
    config: dict[str, Any]
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None

    def section(self, res: dict[str, Any], seed: int) -> dict[str, Any]:
        """The task's `synthetic` entry of results.json: `accuracy` is the held-out one
        where there is a test split (reasoning), the training one otherwise (memorization);
        `seed` is the run's (the report averages a model's seeds)."""
        n = int(len(self.train[1]))
        if self.test is None:
            return {"accuracy": res["accuracy"], "n": n, "seed": seed}
        out = {
            "accuracy": res["test_accuracy"],
            "train_accuracy": res["accuracy"],
            "n": n,
            "n_test": int(len(self.test[1])),
            "seed": seed,
        }
        for key in ("vertices", "min_degree", "max_degree"):
            if key in self.config:
                out[key] = self.config[key]
        return out


def load_task(data_dir: str) -> TensorTask:
    """The splits of a memorization or length-2-path directory, checked (no torch import)."""
    from data_prep.synthetic.tensors import load_split, tensor_manifest

    manifest = tensor_manifest(data_dir)
    splits = manifest.get("splits", {})
    train = load_split(data_dir, "train")
    test = None
    if splits.get("test") and splits["test"] != splits.get("train"):
        test = load_split(data_dir, "test")
        if test[0].shape[1:] != train[0].shape[1:]:
            raise DataError(f"{data_dir}: test and train sequences differ in shape")
    task = manifest["task"]
    return TensorTask(str(task["name"]), dict(task.get("config") or {}), train, test)


def model_header(cfg: ClassifierConfig, name: str) -> dict[str, Any]:
    """The `model` entry of results.json for a classifier."""
    from pretrain.model.classifier import classifier_size

    total, active = classifier_size(cfg)
    experts = None
    if cfg.ffn in ("moe", "soft_moe", "peer"):
        experts = getattr(cfg, cfg.ffn).num_experts
    return {
        "name": name,
        "ffn": cfg.ffn,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "num_experts": experts,
        "top_k": cfg.moe.top_k if cfg.ffn == "moe" else None,
        "total_params": total,
        "active_params": active,
    }


def _as_tensor(a: np.ndarray | Tensor) -> Tensor:
    import torch

    # np.array copies: memory-mapped inputs are read-only, which torch warns about.
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def classifier_accuracy(
    model: nn.Module,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    device: torch.device | str,
    batch_size: int = 1024,
) -> float:
    """Fraction of sequences whose logit sign matches the +-1 label (logit 0 counts as -1)."""
    import torch

    n = len(y)
    if n == 0:
        return 0.0
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            xb, yb = _as_tensor(x[lo : lo + batch_size]), _as_tensor(y[lo : lo + batch_size])
            yb = yb.to(device)
            out = model(xb.to(device, torch.float32))
            logit = out.logits if hasattr(out, "logits") else out
            pred = torch.where(logit.reshape(-1) > 0, 1, -1)
            correct += int((pred == yb.reshape(-1).long()).sum())
    model.train(was_training)
    return correct / n


def train_classifier(
    model: SequenceClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int = 0,
    weight_decay: float = 0.0,
    warmup: int = 0,
    log_every: int = 10,
    target_accuracy: float | None = None,
    seed: int = 0,
    log=None,
    schedule: str = "constant",
    min_lr_ratio: float = 0.1,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """AdamW on BCE-with-logits (+ MoE aux loss); returns {"steps", "accuracy", "loss"}
    (plus "test_accuracy" when a held-out `test` set (x, y) is given).

    `log(record)` is called at every log step (and the last) with step/loss/accuracy/lr
    (and test_accuracy). The lr follows `pretrain.schedule` (warmup, then constant or cosine).
    """
    import torch
    import torch.nn.functional as F

    from pretrain.config import ScheduleConfig
    from pretrain.schedule import lr_multiplier

    sched = ScheduleConfig(kind=schedule, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    target = (y.float() + 1) / 2
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    bs = n if batch_size <= 0 else min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    acc, test_acc, loss_val, step = 0.0, None, float("nan"), 0
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if bs == n:
            idx = None
        else:
            if pos + bs > n:  # new epoch: reshuffle so every sequence is seen once per epoch
                perm, pos = torch.randperm(n, generator=gen), 0
            idx, pos = perm[pos : pos + bs].to(device), pos + bs
        xb, tb = (x, target) if idx is None else (x[idx], target[idx])
        cur_lr = lr * lr_multiplier(step - 1, sched, steps)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        out = model(xb)
        loss = F.binary_cross_entropy_with_logits(out.logits.float(), tb) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())
        if step % log_every == 0 or step == steps:
            acc = classifier_accuracy(model, x, y, device)
            rec = {
                "step": step,
                "loss": loss_val,
                "accuracy": acc,
                "lr": cur_lr,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if test is not None:
                test_acc = classifier_accuracy(model, test[0], test[1], device)
                rec["test_accuracy"] = test_acc
            if log is not None:
                log(rec)
            if target_accuracy is not None and acc >= target_accuracy:
                break
    res = {"steps": step, "accuracy": acc, "loss": loss_val}
    if test is not None:
        res["test_accuracy"] = test_acc
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mop.cli import ArgumentParser, examples
    from mop.config import parse_args_with_overrides

    p = ArgumentParser(
        prog="python -m pretrain.memorization",
        description=__doc__.split("\n")[0],
        epilog=examples(
            "python -m pretrain.memorization --data data/mem --model "
            "configs/model/synth12_softmoe_d256_e8.yaml --steps 2000 --out runs/mem/softmoe",
            "python -m pretrain.memorization --data data/mem --model "
            "configs/model/synth12_dense_d256.yaml d_model=128 --steps 500 --out runs/mem/d128",
            "python -m pretrain.memorization --data data/l2p --model "
            "configs/model/demo_l2p_dense_d32.yaml --steps 1000 --lr 3e-3 --warmup 200 "
            "--batch-size 256 --schedule cosine --out runs/l2p/d32",
            notes="Outputs in --out: metrics.jsonl, model.safetensors, config.yaml, results.json.",
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        help="memorization or length2-path task dir (python -m data_prep synthetic)",
    )
    p.add_argument("--model", required=True, help="model YAML (configs/model/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted model overrides, e.g. d_model=64")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=0, help="0 = full batch (default)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="lr after the warmup: constant (default) or cosine decay to --min-lr-ratio x lr",
    )
    p.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="cosine's final lr / lr (default 0.1)"
    )
    p.add_argument(
        "--target-accuracy", type=float, default=None, help="stop once the training accuracy is"
    )
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (10)")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order seed (0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--name", default=None, help="model name in results.json (default: YAML stem)")
    p.add_argument("--out", required=True, help="run directory (created)")
    return parse_args_with_overrides(p, argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag in ("steps", "lr", "log_every"):
        if getattr(args, flag) <= 0:
            raise ConfigError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    if args.batch_size < 0 or args.warmup < 0:
        raise ConfigError("--batch-size and --warmup must be >= 0")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    check_dir_target(args.out, "--out")
    check_device(args.device)
    from mop.results import update_results

    # Data and model config are read and checked before torch is imported (fast errors).
    task = load_task(args.data)
    x_np, y_np = task.train
    cfg = load_classifier_config(args.model, args.overrides, x_np.shape[2], x_np.shape[1])
    import torch
    from safetensors.torch import save_file

    from pretrain.model.classifier import build_classifier

    torch.manual_seed(args.seed)
    model = build_classifier(cfg).to(args.device)
    x, y = _as_tensor(x_np), _as_tensor(y_np)
    test = None if task.test is None else (_as_tensor(task.test[0]), _as_tensor(task.test[1]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.yaml")
    started = time.time()
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as fh:

        def log(rec: dict) -> None:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            held = f" test_acc {rec['test_accuracy']:.4f}" if "test_accuracy" in rec else ""
            print(f"step {rec['step']}: loss {rec['loss']:.4f} acc {rec['accuracy']:.4f}{held}")

        res = train_classifier(
            model,
            x,
            y,
            args.steps,
            args.lr,
            batch_size=args.batch_size,
            weight_decay=args.weight_decay,
            warmup=args.warmup,
            log_every=args.log_every,
            target_accuracy=args.target_accuracy,
            seed=args.seed,
            log=log,
            schedule=args.schedule,
            min_lr_ratio=args.min_lr_ratio,
            test=test,
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    header = {
        "checkpoint": str(out.resolve()),
        "run_dir": str(out.resolve()),
        "step": res["steps"],
        "model": model_header(cfg, args.name or Path(args.model).stem),
    }
    meta = {
        "task": task.name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": str(args.device),
        "limit": None,
        "seconds": round(time.time() - started, 3),
        "data": str(Path(args.data).resolve()),
        "lr": args.lr,
        "batch_size": args.batch_size,
        "schedule": args.schedule,
    }
    section = task.section(res, args.seed)
    update_results(out, header, "synthetic", {task.name: section}, meta=meta)
    where = "held-out" if task.test is not None else "training"
    print(
        f"{task.name} accuracy {section['accuracy']:.4f} on {where} set "
        f"({section.get('n_test', section['n'])} sequences) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
