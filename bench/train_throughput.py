"""Training throughput of the pipeline's own step against transformers, on one GPU (issue 14).

    python bench/train_throughput.py [--peak-tflops 989] [--out DIR] [--budget-s 300]
    python bench/train_throughput.py --cpu            # CPU profile: >= 100 ms steps, same keys
    python bench/train_throughput.py --smoke          # CPU, tiny shapes, the same JSON keys

Ours: the step `python -m pretrain` runs (Trainer.train_step: DeepSpeed engine, bf16, ZeRO-1,
the recipe configs/train/paper_moe_d512_e8.yaml with the model swapped), fed by random tokens
instead of shards. Theirs: the same architecture as transformers' MistralForCausalLM /
MixtralForCausalLM (pretrain.model.hf_export.hf_config, SDPA attention) trained by a plain loop:
bf16 weights, torch AdamW, the same batch and sequence length. Per case: median step time over
`--steps` timed steps after `--warmup` untimed ones, tokens/s, model TFLOP/s and MFU from our
FLOP accounting (pretrain/model/accounting.py: active parameters, full attention matrix), and
peak memory. The E=64 model does not fit one GPU with Adam: it runs with as many layers as fit
(`layers_that_fit`) and reports the layer count and per-layer figures.

`--cpu` is the CPU profile (issue 21): d_model 256, 4 layers, sequence 256, vocabulary 256 (the
CPU grids' tokenizers are that small; at 32,000 the LM head is two thirds of the FLOPs), micro-
batch 8, fp32, E=64 shrunk to 16 experts; ours and theirs of one model built together and
stepped in turn (2 warm-up + 6 timed steps each), the whole list run twice (`--repeats`) and
the step times pooled, so the machine's load hits both sides alike; `step_cpu_ms` is the
process's CPU time per step beside the wall time. Both sides run under the host-memory setting
`python -m pretrain` uses on a CPU (pretrain/host_memory.py). Eager only, as the CPU grids run
(`compile` is off by default); `--cpu-compile` adds ours with `compile=true`, stepped in turn
with the other two (inductor's C++ build: tens of seconds per model at these shapes, in the
case's `seconds`), and the floors then take the better of the two as on a GPU. `--smoke` only
checks that the kit runs: its steps are too short to time.

Every case runs inside try/except (an OOM or a missing kernel is recorded, the rest runs); cases
past `--budget-s` are recorded as skipped. Writes train_throughput.json into --out (or $OUT).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs/train/paper_moe_d512_e8.yaml"
PAPER_LAYERS = 20
DEADLINE_ENV = "MOP_STEP_DEADLINE"  # set by bench/device_kit.py (epoch seconds)
CPU_MODEL_OVERRIDES = ["d_model=256", "n_layers=4", "max_seq_len=256", "vocab_size=256"]
# The CPU profile's floors on ours/transformers (issue 21; its goal is 1.5 for every case).
# dense_d2048 is dense_d1024's model at CPU shapes, so it is not run there.
CPU_RATIO_FLOORS = {"dense_d1024": 1.2, "moe_d1024_e8": 1.0, "moe_d1024_e64": 1.0}
RESERVE_S = 40.0  # the longest case (a compiled one) plus writing the JSON
ROW_KEYS = (
    "name", "impl", "model", "backend", "compile", "n_layers", "d_model", "num_experts",
    "status", "error", "seconds", "step_ms", "step_ms_min", "step_ms_max", "step_cpu_ms",
    "tokens_per_step",
    "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "total_params", "active_params",
    "flops_per_token", "step_ms_per_layer", "tokens_per_s_20_layers_est", "ratio_vs_transformers",
)  # fmt: skip
# (model name, model config file, MoE backend or None, floor on MFU, floor on ours/theirs)
MODELS = (
    ("dense_d1024", "configs/model/dense_d1024.yaml", None, None, 1.5),
    ("dense_d2048", "configs/model/dense_d2048.yaml", None, 0.45, 1.5),
    ("moe_d1024_e8", "configs/model/moe_d1024_e8.yaml", ("torch", "megablocks"), 0.30, 3.0),
    ("moe_d1024_e64", "configs/model/moe_d1024_e64.yaml", ("torch", "megablocks"), 0.20, 3.0),
)


@dataclass(frozen=True)
class Case:
    name: str
    impl: str  # "ours" | "transformers"
    model: str
    model_file: str
    backend: str | None
    compile: bool


def cases(smoke: bool) -> list[Case]:
    """Without compile first (ours and theirs per model), then ours compiled: when the budget
    runs out, what is left is the compiled variants. (`smoke` is kept for the kit's callers:
    the case list is the same for every profile.)"""
    plain, compiled = [], []
    for model, path, backends, _, _ in MODELS:
        for backend in backends or (None,):
            suffix = f"_{backend}" if backend else ""
            plain.append(Case(f"{model}{suffix}", "ours", model, path, backend, False))
            compiled.append(Case(f"{model}{suffix}_compile", "ours", model, path, backend, True))
        plain.append(Case(f"{model}_transformers", "transformers", model, path, None, False))
    return plain + compiled


# Shapes -------------------------------------------------------------------------------------
def model_config(case: Case, args: argparse.Namespace):
    from mop.config import load_config
    from pretrain.config import resolve_path
    from pretrain.model.config import ModelConfig

    over = []
    if case.backend:
        over.append(f"moe.backend={case.backend}")
    if args.smoke:  # tiny: the same code paths, seconds on a CPU
        over += ["d_model=64", "n_layers=2", "vocab_size=256", "max_seq_len=64", "ffn_hidden=128"]
    elif args.cpu:  # big enough that a step is arithmetic (>= 100 ms), not per-call overhead
        over += CPU_MODEL_OVERRIDES
    if (args.smoke or args.cpu) and "e64" in case.model:
        over.append("moe.num_experts=16")
    cfg = load_config(ModelConfig, resolve_path(case.model_file), over)
    if cfg.max_seq_len < args.seq_len:
        cfg = cfg.model_copy(update={"max_seq_len": args.seq_len})
    return cfg


def layers_that_fit(model_cfg, seq_len: int, micro_batch: int, mem_bytes: float) -> int:
    """The most layers (<= the config's) whose training state and activations fit in
    `mem_bytes`, with a 15% margin: 18 bytes per parameter (bf16 weight and gradient, fp32
    master, fp32 gradient partition, two fp32 Adam moments, as DeepSpeed's bf16 ZeRO-1 keeps
    them); per token and layer about 34 d bytes of activations (Korthikanti et al. 2022, with
    SDPA's flash kernel) plus 6 f bytes per expert assignment (gate, up, product in bf16);
    logits in bf16 and fp32 with their gradient (10 bytes per vocabulary entry and token)."""
    from pretrain.model.accounting import model_size

    one = model_size(model_cfg.model_copy(update={"n_layers": 1}), seq_len)
    two = model_size(model_cfg.model_copy(update={"n_layers": 2}), seq_len)
    per_layer_params = two.total_params - one.total_params
    fixed_params = one.total_params - per_layer_params
    tokens = seq_len * micro_batch
    k_f = model_cfg.moe.top_k * model_cfg.expert_ffn_dim if model_cfg.moe else 0
    per_layer = 18 * per_layer_params + tokens * (34 * model_cfg.d_model + 6 * k_f)
    fixed = 18 * fixed_params + tokens * model_cfg.vocab_size * 10
    fit = int((0.85 * mem_bytes - fixed) // per_layer)
    return max(1, min(model_cfg.n_layers, fit))


# Ours ---------------------------------------------------------------------------------------
class RandomTokens:
    """Stands in for pretrain.data.TrainData: the same micro-batches (one source), random ids."""

    labels = ["random"]

    def __init__(self, vocab: int, seq_len: int, micro: int, seed: int = 0) -> None:
        import torch

        from pretrain.data import Batch

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (micro, seq_len + 1), generator=g)
        self.batch = Batch(
            input_ids=ids[:, :-1].contiguous(),
            targets=ids[:, 1:].contiguous(),
            source_ids=torch.zeros(micro, dtype=torch.int64),
            sample_ids=list(range(micro)),
        )

    def micro_batches(self, first: int, global_batch: int, dp: int, rank: int, micro: int):
        return [self.batch] * (global_batch // dp // micro)


_DIST_READY = False


def _init_single_process(cuda: bool) -> None:
    """torch.distributed with a world of one, as `python -m pretrain` starts it (once)."""
    global _DIST_READY
    if _DIST_READY:
        return
    from pretrain.launch import DistEnv, init_distributed, prepare_env

    de = DistEnv(0, 1, 0)
    prepare_env(de, cuda)
    init_distributed(de, cuda)
    _DIST_READY = True


def ours(case: Case, model_cfg, args: argparse.Namespace, cuda: bool):
    """A step closure over the pipeline's Trainer.train_step, and what to free afterwards."""
    import deepspeed
    import torch

    from mop.config import load_config
    from pretrain.__main__ import param_groups
    from pretrain.config import TrainConfig, derived_sizes, resolve_precision
    from pretrain.deepspeed_compat import keep_stage0_grad_norm, reduce_gradients_in_place
    from pretrain.deepspeed_config import deepspeed_config
    from pretrain.model.transformer import build_model
    from pretrain.parallel import build_mesh, parallelize
    from pretrain.trainer import Trainer

    _init_single_process(cuda)
    run_dir = tempfile.mkdtemp(prefix="mop_bench_")
    cfg = load_config(
        TrainConfig,
        str(RECIPE),
        [
            f"data.seq_len={args.seq_len}",
            f"batch.micro_batch={args.micro_batch}",
            "batch.grad_accum=1",
            f"compile={str(case.compile).lower()}",
            f"precision={'bf16' if cuda else 'fp32'}",
            f"run_dir={run_dir}",
            "logging.wandb_mode=disabled",
            *args.set,
        ],
    )
    cfg = cfg.model_copy(update={"model": model_cfg})
    if cfg.deterministic:  # as pretrain/__main__.py sets it up
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    sizes = derived_sizes(cfg, 1)
    mesh = build_mesh(cfg, 1, 0)
    ds_cfg = deepspeed_config(cfg, sizes, resolve_precision(cfg, cuda))
    torch.manual_seed(cfg.seed)
    with torch.device("cuda" if cuda else "cpu"):  # initialised where it trains: no H2D copy
        model = parallelize(build_model(cfg.model), cfg, mesh)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model), config=ds_cfg
    )
    keep_stage0_grad_norm(engine)
    reduce_gradients_in_place(engine)  # as python -m pretrain does
    data = RandomTokens(model_cfg.vocab_size, args.seq_len, args.micro_batch)
    trainer = Trainer(cfg, engine, data, None, sizes, mesh, "bench", callbacks=[])

    def step() -> None:
        if cfg.deterministic:  # again per step: the CPU profile interleaves ours and theirs
            torch.use_deterministic_algorithms(True, warn_only=True)
        trainer.train_step()

    return step, sizes.tokens_per_step, [trainer, engine, model]


# Theirs -------------------------------------------------------------------------------------
def transformers_step(model_cfg, args: argparse.Namespace, cuda: bool):
    """The same architecture in transformers, a plain bf16 AdamW loop (bf16 weights and
    moments: the cheapest thing a user would write), SDPA attention; Mixtral with its own
    load-balancing loss on, as ours trains with one."""
    import torch
    from transformers import AutoModelForCausalLM

    from pretrain.model.hf_export import hf_config

    # ours may have switched deterministic algorithms on (the recipe's default); theirs runs
    # as a plain loop would
    torch.use_deterministic_algorithms(False)
    hf = hf_config(model_cfg)
    if model_cfg.ffn == "moe":
        hf.output_router_logits = True
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = RandomTokens(model_cfg.vocab_size, args.seq_len, args.micro_batch)
    ids = data.batch.input_ids.to(next(model.parameters()).device)

    def step() -> None:
        torch.use_deterministic_algorithms(False)
        loss = model(input_ids=ids, labels=ids).loss  # labels are shifted inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, args.micro_batch * args.seq_len, [model, opt]


# Measuring ----------------------------------------------------------------------------------
def empty_row(case: Case) -> dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(
        name=case.name,
        impl=case.impl,
        model=case.model,
        backend=case.backend,
        compile=case.compile,
        status="skipped",
    )
    return row


def skip_reason(case: Case, args: argparse.Namespace, cuda: bool) -> str | None:
    if case.backend == "megablocks" and not cuda:
        return "megablocks needs CUDA (the smoke run keeps the torch backend)"
    if case.compile and args.smoke:
        return "smoke: its steps are too short to repay an inductor build"
    if case.compile and args.no_compile:
        return "--no-compile"
    if args.cpu and case.compile and not args.cpu_compile:
        return "cpu: eager only, as the CPU grids run (--cpu-compile adds the compiled variant)"
    if args.cpu and case.model not in CPU_RATIO_FLOORS:
        return "cpu: at CPU shapes this is the model of dense_d1024"
    return None


@dataclass
class Built:
    """One case ready to step: its row (status "ok" once built) and what to time and free."""

    row: dict[str, Any]
    step: Any = None
    keep: list | None = None
    started: float = 0.0
    times: list[tuple[float, float]] = field(default_factory=list)  # (wall, CPU) per step


def build_case(case: Case, args: argparse.Namespace, cuda: bool) -> Built:
    """Build one case (skipped or failed rows come back without a step)."""
    import torch

    from pretrain.model.accounting import model_size

    row = empty_row(case)
    why = skip_reason(case, args, cuda)
    if why:
        row["error"] = why
        return Built(row)
    built = Built(row, started=time.perf_counter())
    # The last case's engine is only freed once its reference cycles are collected: before
    # the peak-memory reset, not after it.
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        model_cfg = model_config(case, args)
        if cuda:
            mem = torch.cuda.get_device_properties(0).total_memory
            n = layers_that_fit(model_cfg, args.seq_len, args.micro_batch, mem)
            model_cfg = model_cfg.model_copy(update={"n_layers": n})
            torch.cuda.reset_peak_memory_stats()
        size = model_size(model_cfg, seq_len=args.seq_len)
        build = ours if case.impl == "ours" else lambda c, m, a, g: transformers_step(m, a, g)
        built.step, tokens, built.keep = build(case, model_cfg, args, cuda)
        row.update(
            status="ok",
            n_layers=model_cfg.n_layers,
            d_model=model_cfg.d_model,
            num_experts=model_cfg.moe.num_experts if model_cfg.moe else None,
            tokens_per_step=tokens,
            total_params=size.total_params,
            active_params=size.active_params,
            flops_per_token=size.flops_per_token,
        )
    except Exception as exc:  # an OOM or a missing kernel must not cost the other cases
        fail(built, exc)
    return built


def fail(built: Built, exc: Exception) -> None:
    built.row["status"] = "failed"
    built.row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    built.step = None
    traceback.print_exc()


def timed_step(built: Built, cuda: bool) -> tuple[float, float] | None:
    """Wall and process CPU seconds of one step of `built` (None once it has failed)."""
    import torch

    if built.step is None:
        return None
    try:
        if cuda:
            torch.cuda.synchronize()
        s, c = time.perf_counter(), time.process_time()
        built.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - s, time.process_time() - c
    except Exception as exc:
        fail(built, exc)
        return None


def finish(built: Built, cuda: bool) -> None:
    """Record the case's seconds and peak memory, then free it."""
    import torch

    if built.started:
        built.row["seconds"] = time.perf_counter() - built.started
    if cuda and built.row["status"] == "ok":
        built.row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    built.step = built.keep = None
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


def run_cases(group: list[Case], args: argparse.Namespace, cuda: bool) -> list[Built]:
    """Build the cases of `group`, warm each up, then time `--steps` steps of each, the cases
    taking turns step by step (on a GPU a group is one case: two models do not fit)."""
    built = [build_case(c, args, cuda) for c in group]
    times: list[list[tuple[float, float]]] = [[] for _ in built]
    for i in range(args.warmup + args.steps):
        for b, ts in zip(built, times):
            t = timed_step(b, cuda)
            if t is not None and i >= args.warmup:
                ts.append(t)
    for b, ts in zip(built, times):
        finish(b, cuda)
        b.times = ts
        if b.row["status"] == "ok" and not ts:
            b.row.update(status="failed", error=b.row["error"] or "no step timed")
    return built


def add_timing(row: dict[str, Any], times: list[tuple[float, float]], peak_tflops: float) -> None:
    """The row's timing fields from its timed steps' (wall, CPU) seconds (pooled over the
    rounds). `step_cpu_ms`: the process's CPU time per step, all threads (on a shared CPU the
    wall time also holds the waits for a core; the CPU time does not)."""
    from pretrain.metrics import mfu

    wall = [w for w, _ in times]
    med = statistics.median(wall)
    tps = row["tokens_per_step"] / med
    row.update(
        step_ms=med * 1e3,
        step_ms_min=min(wall) * 1e3,
        step_ms_max=max(wall) * 1e3,
        step_cpu_ms=statistics.median(c for _, c in times) * 1e3,
        tokens_per_s=tps,
        tflops=row["flops_per_token"] * tps / 1e12,
        mfu=mfu(row["flops_per_token"], tps, 1, peak_tflops),
        step_ms_per_layer=med * 1e3 / row["n_layers"],
        tokens_per_s_20_layers_est=tps * row["n_layers"] / PAPER_LAYERS,
    )


def add_ratios(rows: list[dict[str, Any]]) -> None:
    theirs = {
        r["model"]: r["tokens_per_s"]
        for r in rows
        if r["impl"] == "transformers" and r["status"] == "ok"
    }
    for r in rows:
        if r["impl"] == "ours" and r["status"] == "ok" and theirs.get(r["model"]):
            r["ratio_vs_transformers"] = r["tokens_per_s"] / theirs[r["model"]]


def floors(rows: list[dict[str, Any]], smoke: bool, cpu: bool = False) -> list[dict[str, Any]]:
    """The issue's floors against the best of our variants (backend, compile) per model: the
    GPU floors (issue 14), or under `cpu` the CPU profile's ratios (issue 21; no MFU floor)."""
    out = []
    for model, _, _, mfu_floor, ratio_floor in MODELS:
        if cpu:
            mfu_floor, ratio_floor = None, CPU_RATIO_FLOORS.get(model)
        mine = [r for r in rows if r["model"] == model and r["impl"] == "ours" and r["status"] == "ok"]  # fmt: skip
        for what, target in (("mfu", mfu_floor), ("ratio_vs_transformers", ratio_floor)):
            if target is None:
                continue
            values = [r[what] for r in mine if r[what] is not None]
            best = max(values) if values else None
            met = None if smoke or best is None else best >= target
            out.append({"floor": f"{model} {what}", "target": target, "value": best, "met": met})
    return out


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in ("torch", "deepspeed", "transformers", "megablocks", "grouped_gemm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ("name", "status", "n_layers", "step_ms", "step_cpu_ms", "tokens_per_s", "tflops", "mfu",
            "peak_mem_gib", "ratio_vs_transformers")  # fmt: skip
    cells = [
        [
            ("-" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
            for c in cols
        ]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no megablocks")
    p.add_argument(
        "--cpu", action="store_true", help="the CPU profile: d_model 256, 4 layers, seq 256"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="rounds over the cases, times pooled per case (default 1; --cpu: 2)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (cpu 256, smoke 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="default 16 (cpu 8, smoke 2)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (default 3; cpu 2, smoke 1)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 10; cpu 6, smoke 2)"
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM / H200 bf16")
    p.add_argument(
        "--budget-s", type=float, default=None, help="skip cases started later (300; cpu 3600)"
    )
    p.add_argument("--only", nargs="*", default=[], help="run only cases whose name has one")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument(
        "--cpu-compile",
        action="store_true",
        help="with --cpu: also ours with compile=true (inductor C++ build, tens of seconds)",
    )
    p.add_argument("--set", nargs="*", default=[], help="train config overrides for ours")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON")
    args = p.parse_args(argv)
    if args.smoke and args.cpu:
        p.error("--smoke and --cpu are two profiles: choose one")
    if args.cpu_compile and not args.cpu:
        p.error("--cpu-compile goes with --cpu")
    defaults = {
        "smoke": (64, 2, 1, 2, 1),
        "cpu": (256, 8, 2, 6, 2),
        "gpu": (2048, 16, 3, 10, 1),
    }["smoke" if args.smoke else "cpu" if args.cpu else "gpu"]
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.cpu else 300.0
    names = ("seq_len", "micro_batch", "warmup", "steps", "repeats")
    for name, value in zip(names, defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    on_cpu = args.smoke or args.cpu
    cuda = torch.cuda.is_available() and not on_cpu
    if not cuda and not on_cpu:
        print("error: no CUDA device; use --cpu (or --smoke) on a CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    budget = args.budget_s
    if os.environ.get(DEADLINE_ENV):  # under bench/device_kit.py: end before it kills us
        budget = min(budget, float(os.environ[DEADLINE_ENV]) - time.time() - RESERVE_S)
    load_before = os.getloadavg()
    selected = [
        c for c in cases(args.smoke) if not args.only or any(s in c.name for s in args.only)
    ]
    host_memory = None
    if not cuda:  # as python -m pretrain runs on a CPU; theirs runs in this process under it too
        from pretrain.host_memory import keep_freed_host_memory

        host_memory = "kept for reuse" if keep_freed_host_memory() else "allocator default"
    rows: dict[str, dict[str, Any]] = {}
    times: dict[str, list[tuple[float, float]]] = {c.name: [] for c in selected}
    # On a CPU the cases of one model (ours, theirs) take turns step by step, and the whole
    # list is run `--repeats` times: load from other processes hits both sides alike; each
    # case's step times are pooled over the rounds. On a GPU one case at a time.
    groups = [[c] for c in selected] if cuda else by_model(selected)
    for rnd in range(args.repeats):
        for group in groups:
            todo = [c for c in group if rows.get(c.name, {}).get("status") in (None, "ok")]
            if not todo:
                continue
            if time.perf_counter() - start > budget:
                for c in todo:
                    if c.name not in rows:
                        rows[c.name] = empty_row(c)
                        rows[c.name]["error"] = f"time budget of {budget:.0f} s spent"
                continue
            tag = f" (round {rnd + 1}/{args.repeats})" if args.repeats > 1 else ""
            print(f"[bench] {' + '.join(c.name for c in todo)}{tag} ...", flush=True)
            for b in run_cases(todo, args, cuda):
                name, row = b.row["name"], b.row
                if name in rows and rows[name]["seconds"] and row["seconds"]:
                    row["seconds"] += rows[name]["seconds"]
                rows[name] = row
                times[name] += b.times
                if row["status"] == "ok" and times[name]:
                    add_timing(row, times[name], args.peak_tflops)
                print(f"[bench] {name}: {row['status']} {row['error'] or ''}", flush=True)
    rows_list = [rows[c.name] for c in selected]
    add_ratios(rows_list)
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({cpu_name()})",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/train_throughput.py", *(argv or sys.argv[1:])]),
        "versions": versions(),
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "host_memory": host_memory,
        "peak_tflops": args.peak_tflops,
        "ours": {"recipe": str(RECIPE.relative_to(REPO)), "overrides": args.set},
        "rows": rows_list,
        "floors": floors(rows_list, args.smoke, args.cpu),
    }
    print("\n" + format_table(rows_list))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_throughput.json").write_text(json.dumps(result, indent=2, default=_json))
    return 0 if all(r["status"] != "failed" for r in rows_list) else 1


def by_model(selected: list[Case]) -> list[list[Case]]:
    """The cases grouped by model (eager, compiled and theirs step in turn), in the order of
    their first case."""
    groups: dict[str, list[Case]] = {}
    for c in selected:
        groups.setdefault(c.model, []).append(c)
    return list(groups.values())


def cpu_name() -> str:
    """The CPU model and core count, for the JSON's device field."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _json(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


if __name__ == "__main__":
    sys.exit(main())
