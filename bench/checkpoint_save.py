"""Checkpoint saves: how long the training loop is blocked per save, synchronous against
background (`checkpoint.async_save`), side by side in one run (issue 19 item 4); and the load of
the layout-free format, the code path of every resume in any layout (issue 20 item 5).

    python bench/checkpoint_save.py --out DIR            # CPU: a 38M-parameter dense model
    python bench/checkpoint_save.py --smoke --out DIR    # seconds: a tiny model (kit check)
    python bench/checkpoint_save.py --d-model 2048 --layers 16 --out DIR   # GPU: ~1B params

One process, the real save (pretrain/checkpoint.py through a DeepSpeed ZeRO-1 engine built as
`python -m pretrain` builds it, after one training step so Adam's moments exist). Saves of the
two modes alternate (sync, async, sync, ...) so the machine's load hits both alike. Blocking
time = how long `save()` held the caller, the loop's `checkpoint_blocking_s`; total = until the
pointer moved, `checkpoint_total_s` (each async save is awaited before the next, so none
queues behind another). Goal (issue 19): async blocks at most 0.3x the sync save on CPU; under
1 s for a 1B-parameter model on a GPU.

Load: `checkpoint.load` of the newest save into the same engine: seconds, and the host memory
it needs beyond the engine's own (peak resident set during the load minus before it, via
/proc/self/clear_refs and VmHWM, Linux): DCP's read buffers, one stored box at a time. A load
in another layout runs the same code (DCP reads the overlapping parts of the saved boxes);
the estimate for the paper's largest model (configs/model/moe_d1024_e64.yaml) applies the
measured rate and memory per state byte to its state.

Writes checkpoint_save.json into --out (or $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.3
STATE_BYTES_PER_PARAM = 12  # fp32 master + Adam's two moments (ZeRO 1/2, format 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--saves", type=int, default=3, help="saves per mode")
    p.add_argument("--dir", help="where the saves go (default: a temporary directory)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="writes checkpoint_save.json")
    p.add_argument("--smoke", action="store_true", help="tiny model, one save per mode")
    args = p.parse_args(argv)
    if args.smoke:
        args.d_model, args.layers, args.vocab, args.saves = 64, 2, 512, 1
    return args


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def build_engine(args, run_dir: Path):
    """A ZeRO-1 engine of a dense model, built as pretrain/__main__.py builds one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from pretrain.launch import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mop.config import load_config
    from pretrain.__main__ import param_groups
    from pretrain.config import TrainConfig, derived_sizes, resolve_precision
    from pretrain.deepspeed_config import deepspeed_config
    from pretrain.launch import dist_env, init_distributed
    from pretrain.model.transformer import build_model
    from pretrain.parallel import build_mesh, init_process_groups, parallelize

    d = args.d_model
    over = [
        "model.ffn=dense",
        f"model.d_model={d}",
        f"model.n_layers={args.layers}",
        f"model.vocab_size={args.vocab}",
        f"model.n_heads={max(1, d // 64)}",
        f"model.n_kv_heads={max(1, d // 64)}",
        f"model.ffn_hidden={4 * d}",
        "data.seq_len=64",
        "data.data_dir=unused",
        f"run_dir={run_dir}",
        "batch.micro_batch=1",
        "batch.grad_accum=1",
    ]
    cfg = load_config(TrainConfig, REPO / "configs/train/tiny_cpu.yaml", over)
    sizes = derived_sizes(cfg, 1)
    ds_cfg = deepspeed_config(cfg, sizes, resolve_precision(cfg, cuda))
    init_distributed(dist_env(), cuda)
    mesh = init_process_groups(build_mesh(cfg, 1, 0))
    import deepspeed

    with torch.device("cuda" if cuda else "cpu"):
        model = parallelize(build_model(cfg.model), cfg, mesh)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model),
        config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
    )
    ids = torch.randint(0, args.vocab, (1, 65), device=engine.device)
    out = engine(ids[:, :-1])
    from pretrain.model.transformer import lm_loss

    engine.backward(lm_loss(out.logits, ids[:, 1:]) + out.aux_loss)
    engine.step()
    return cfg, engine, mesh


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    cfg, engine, mesh = build_engine(args, work)
    import torch

    from pretrain import checkpoint
    from pretrain.model.accounting import model_size
    from pretrain.model.config import ModelConfig

    params = sum(p.numel() for p in engine.module.parameters())
    targets = {
        mode: checkpoint.Target(engine, mesh, work / mode, async_save=(mode == "async"))
        for mode in ("sync", "async")
    }
    rows: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    client = {"mop": {"bench": True}}
    for i in range(args.saves):
        for mode, target in targets.items():
            t0 = time.perf_counter()
            checkpoint.save(target, i + 1, client, keep_last=1)
            blocking = time.perf_counter() - t0
            checkpoint.wait(target)
            [done] = checkpoint.poll(target)
            rows[mode].append({"blocking_s": blocking, "total_s": done.total_s})
            print(f"{mode:5s} save {i + 1}: blocked {blocking:.3f}s, total {done.total_s:.3f}s")
    med = {m: statistics.median(r["blocking_s"] for r in rows[m]) for m in rows}
    ratio = med["async"] / med["sync"] if med["sync"] else None
    tag_dir = work / "async" / checkpoint.tag_of(args.saves)
    state_bytes = sum(f.stat().st_size for f in (tag_dir / "dcp").glob("*.distcp"))

    # The load of the layout-free format (what every resume, resharded or not, runs).
    if engine.device.type == "cpu":
        _rss_peak_reset()
    rss0 = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    loaded = checkpoint.load(targets["async"])
    load_s = time.perf_counter() - t0
    extra = max(0, _status_bytes("VmHWM") - rss0) if engine.device.type == "cpu" else None
    assert loaded is not None and loaded.tag == checkpoint.tag_of(args.saves)
    rate = state_bytes / load_s

    big = ModelConfig(**_yaml(REPO / "configs/model/moe_d1024_e64.yaml"))
    big_params = model_size(big, seq_len=big.max_seq_len).total_params
    big_state = big_params * STATE_BYTES_PER_PARAM
    ratio_mem = extra / state_bytes if extra is not None else None
    estimate = {
        "model": "configs/model/moe_d1024_e64.yaml",
        "total_params": big_params,
        "state_bytes": big_state,
        "one_process_load_s": big_state / rate,
        "per_rank_state_bytes_64_ranks": big_state / 64,
        "per_rank_load_s_64_ranks": big_state / 64 / rate,
        "extra_host_bytes_per_rank_64_ranks": None
        if ratio_mem is None
        else ratio_mem * big_state / 64,
        "how": "this run's load rate and extra host memory per state byte, applied to the big "
        "model's state (12 B/param); on 64 ranks each reads its 1/64 (ZeRO 1/2 over dp 64; a "
        "parallel file system serves them at once, a single NFS server does not)",
    }
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "params": params,
        "state_bytes": state_bytes,
        "saves": rows,
        "median_blocking_s": med,
        "async_over_sync": ratio,
        "goal_async_over_sync": GOAL_RATIO,
        "meets_goal": ratio is not None and ratio <= GOAL_RATIO,
        "load_s": load_s,
        "load_bytes_per_s": rate,
        "load_extra_host_bytes": extra,
        "estimate_20L_d1024_E64": estimate,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "saves"}, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "checkpoint_save.json").write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()
    return 0


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
