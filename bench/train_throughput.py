"""Training throughput of the pipeline's own step against transformers, on one GPU (issue 14).

    python bench/train_throughput.py [--peak-tflops 989] [--out DIR] [--budget-s 300]
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs/train/paper_moe_d512_e8.yaml"
PAPER_LAYERS = 20
DEADLINE_ENV = "MOP_STEP_DEADLINE"  # set by bench/device_kit.py (epoch seconds)
RESERVE_S = 40.0  # the longest case (a compiled one) plus writing the JSON
ROW_KEYS = (
    "name", "impl", "model", "backend", "compile", "n_layers", "d_model", "num_experts",
    "status", "error", "seconds", "step_ms", "step_ms_min", "step_ms_max", "tokens_per_step",
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
    runs out, what is left is the compiled variants."""
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
        if "e64" in case.model:
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
    from pretrain.deepspeed_compat import keep_stage0_grad_norm
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
    ds_cfg = deepspeed_config(cfg, sizes, resolve_precision(cfg, cuda), cuda)
    torch.manual_seed(cfg.seed)
    with torch.device("cuda" if cuda else "cpu"):  # initialised where it trains: no H2D copy
        model = parallelize(build_model(cfg.model), cfg, mesh)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model), config=ds_cfg
    )
    keep_stage0_grad_norm(engine)
    data = RandomTokens(model_cfg.vocab_size, args.seq_len, args.micro_batch)
    trainer = Trainer(cfg, engine, data, None, sizes, mesh, "bench", callbacks=[])

    def step() -> None:
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
        return "smoke: inductor builds take minutes on a CPU (tests/pretrain/test_fast_step.py)"
    if case.compile and args.no_compile:
        return "--no-compile"
    return None


def run_case(case: Case, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    import torch

    from pretrain.metrics import mfu
    from pretrain.model.accounting import model_size

    row = empty_row(case)
    why = skip_reason(case, args, cuda)
    if why:
        row["error"] = why
        return row
    t0 = time.perf_counter()
    keep: list = []
    step = None
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
        step, tokens, keep = build(case, model_cfg, args, cuda)
        times = []
        for i in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            s = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - s)
        med = statistics.median(times)
        tps = tokens / med
        row.update(
            status="ok",
            n_layers=model_cfg.n_layers,
            d_model=model_cfg.d_model,
            num_experts=model_cfg.moe.num_experts if model_cfg.moe else None,
            step_ms=med * 1e3,
            step_ms_min=min(times) * 1e3,
            step_ms_max=max(times) * 1e3,
            tokens_per_step=tokens,
            tokens_per_s=tps,
            tflops=size.flops_per_token * tps / 1e12,
            mfu=mfu(size.flops_per_token, tps, 1, args.peak_tflops),
            peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            total_params=size.total_params,
            active_params=size.active_params,
            flops_per_token=size.flops_per_token,
            step_ms_per_layer=med * 1e3 / model_cfg.n_layers,
            tokens_per_s_20_layers_est=tps * model_cfg.n_layers / PAPER_LAYERS,
        )
    except Exception as exc:  # an OOM or a missing kernel must not cost the other cases
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        traceback.print_exc()
    finally:
        row["seconds"] = time.perf_counter() - t0
        del keep, step
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    theirs = {
        r["model"]: r["tokens_per_s"]
        for r in rows
        if r["impl"] == "transformers" and r["status"] == "ok"
    }
    for r in rows:
        if r["impl"] == "ours" and r["status"] == "ok" and theirs.get(r["model"]):
            r["ratio_vs_transformers"] = r["tokens_per_s"] / theirs[r["model"]]


def floors(rows: list[dict[str, Any]], smoke: bool) -> list[dict[str, Any]]:
    """The issue's floors against the best of our variants (backend, compile) per model."""
    out = []
    for model, _, _, mfu_floor, ratio_floor in MODELS:
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
    cols = ("name", "status", "n_layers", "step_ms", "tokens_per_s", "tflops", "mfu",
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
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (smoke: 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="default 16 (smoke: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM / H200 bf16")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip cases started later")
    p.add_argument("--only", nargs="*", default=[], help="run only cases whose name has one")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--set", nargs="*", default=[], help="train config overrides for ours")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON")
    args = p.parse_args(argv)
    defaults = (64, 2, 1, 2) if args.smoke else (2048, 16, 3, 10)
    for name, value in zip(("seq_len", "micro_batch", "warmup", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA device; use --smoke for the CPU check", file=sys.stderr)
        return 2
    start = time.perf_counter()
    budget = args.budget_s
    if os.environ.get(DEADLINE_ENV):  # under bench/device_kit.py: end before it kills us
        budget = min(budget, float(os.environ[DEADLINE_ENV]) - time.time() - RESERVE_S)
    rows = []
    for case in cases(args.smoke):
        if args.only and not any(s in case.name for s in args.only):
            continue
        if time.perf_counter() - start > budget:
            row = empty_row(case)
            row["error"] = f"time budget of {budget:.0f} s spent"
        else:
            print(f"[bench] {case.name} ...", flush=True)
            row = run_case(case, args, cuda)
        rows.append(row)
        print(f"[bench] {case.name}: {row['status']} {row['error'] or ''}", flush=True)
    add_ratios(rows)
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/train_throughput.py", *(argv or sys.argv[1:])]),
        "versions": versions(),
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "peak_tflops": args.peak_tflops,
        "ours": {"recipe": str(RECIPE.relative_to(REPO)), "overrides": args.set},
        "rows": rows,
        "floors": floors(rows, args.smoke),
    }
    print("\n" + format_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_throughput.json").write_text(json.dumps(result, indent=2, default=_json))
    return 0 if all(r["status"] != "failed" for r in rows) else 1


def _json(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


if __name__ == "__main__":
    sys.exit(main())
