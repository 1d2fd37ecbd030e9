"""Expert parallel (EP=2) on CPU with gloo in 2 processes, checked against the serial layer/model.

Each worker writes its measured errors to a JSON file; the test process asserts on them, so a
failure message shows the numbers of every rank.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from pretrain.launch import free_port
from pretrain.model.config import ModelConfig, MoEConfig
from pretrain.model.moe import MoE
from pretrain.model.transformer import build_model, lm_loss
from pretrain.parallel.expert import (
    ExpertParallelMoE,
    apply_expert_parallel,
    gather_expert_weights,
    is_expert_param,
    prepare_expert_parallel_for_deepspeed,
    restore_expert_weights_after_load,
)

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
FP32_TOL = 1e-6  # relative to the largest reference entry
LOSS_RTOL = 1e-5  # per-step relative loss difference over 20 AdamW steps


@dataclass
class _Mesh:
    """The attributes apply_expert_parallel reads (the real Mesh grows the same names)."""

    ep: int
    ep_rank: int
    ep_group: Any
    expert_dp_group: Any
    dp: int


def _ep2_mesh(rank: int) -> _Mesh:
    ep_group = dist.new_group([0, 1])
    edp = None
    for r in range(WORLD):  # new_group is collective: every rank creates every group
        g = dist.new_group([r])
        if r == rank:
            edp = g
    return _Mesh(ep=2, ep_rank=rank, ep_group=ep_group, expert_dp_group=edp, dp=WORLD)


def _worker(rank: int, port: int, fn_name: str, out_dir: str, arg: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)  # 2 shared cores: one thread per process
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = globals()[fn_name](rank, arg)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(fn_name: str, tmp_path: Path, arg: Any = None, timeout: float = 120.0) -> list[dict]:
    """Run `fn_name(rank, arg)` in WORLD gloo processes; a deadlock fails the test, not CI."""
    ctx = mp.spawn(
        _worker, args=(free_port(), fn_name, str(tmp_path), arg), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{fn_name}: workers still running after {timeout:.0f}s (deadlock?)")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def _relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest entry (fp32 summation order
    differs between the serial and the split computation)."""
    return _maxdiff(a, ref) / max(float(ref.abs().max()), 1e-30) if ref.numel() else 0.0


# (1) one MoE layer: forward and backward equal the serial layer ------------------------------
def _layer_case(rank: int, skewed: bool) -> dict:
    d, f, batch, seq = 16, 32, 4, 8
    cfg = MoEConfig(num_experts=4, top_k=2)
    torch.manual_seed(0)
    ref = MoE(d, cfg, f)
    ref.reset_parameters(0.5, 0.5)
    x = torch.randn(batch, seq, d)
    if skewed:
        # Positive inputs, router rows of experts 2,3 negative: every token picks experts 0,1
        # (both on rank 0), so rank 1 receives nothing and sends everything (zero splits).
        x = x.abs()
        with torch.no_grad():
            ref.router.weight[:2].abs_()
            ref.router.weight[2:] = -ref.router.weight[2:].abs()
    g = torch.randn(batch, seq, d)
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}

    xr = x.clone().requires_grad_(True)
    y_ref, _ = ref(xr)
    (y_ref * g).sum().backward()

    layer = MoE(d, cfg, f)
    layer.load_state_dict(full)
    mesh = _ep2_mesh(rank)
    layer = apply_expert_parallel(layer, mesh)
    assert isinstance(layer, ExpertParallelMoE)
    half = slice(rank * batch // 2, (rank + 1) * batch // 2)
    xl = x[half].clone().requires_grad_(True)
    y, aux = layer(xl)
    (y * g[half]).sum().backward()

    rows = slice(rank * 2 * f, (rank + 1) * 2 * f)  # 2 local experts of f rows each
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    gathered = gather_expert_weights(layer, mesh)
    return {
        "y": _relerr(y, y_ref[half]),
        "x_grad": _relerr(xl.grad, xr.grad[half]),
        "router_grad": _relerr(router_grad, ref.router.weight.grad),
        **{
            f"{n}_grad": _relerr(getattr(layer, n).grad, getattr(ref, n).grad[rows])
            for n in ("w1", "v1", "w2")
        },
        "gathered": max(_maxdiff(gathered[n], full[n]) for n in full),
        "shard_rows": layer.w1.shape[0],
        "expert_params": sorted(n for n, p in layer.named_parameters() if is_expert_param(p)),
        "aux_finite": bool(torch.isfinite(aux["lb_loss"]) and torch.isfinite(aux["z_loss"])),
    }


@pytest.mark.parametrize("skewed", [False, True], ids=["random", "all_to_rank0"])
def test_ep2_moe_layer_matches_serial(tmp_path: Path, skewed: bool) -> None:
    t0 = time.perf_counter()
    results = _spawn("_layer_case", tmp_path, skewed)
    print(f"\nEP=2 layer ({'skewed' if skewed else 'random'}), {time.perf_counter() - t0:.1f}s")
    for rank, res in enumerate(results):
        print(f"rank {rank}: " + json.dumps({k: v for k, v in res.items() if k != "expert_params"}))
        assert res["expert_params"] == ["v1", "w1", "w2"]
        assert res["shard_rows"] == 2 * 32
        assert res["aux_finite"]
        for key in ("y", "x_grad", "router_grad", "w1_grad", "v1_grad", "w2_grad", "gathered"):
            assert res[key] <= FP32_TOL, (rank, key, res[key])


# (2) 20 AdamW steps of the tiny MoE model equal the serial run ----------------------------
STEPS, BATCH, SEQ = 20, 4, 16


def _tiny_cfg() -> ModelConfig:
    return ModelConfig(**yaml.safe_load((REPO / "configs/model/tiny_moe.yaml").read_text()))


def _batches() -> torch.Tensor:
    """Learnable data (next token = previous + 1 mod vocab), a random start per row."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randint(0, 512, (STEPS, BATCH, 1), generator=gen)
    return (start + torch.arange(SEQ + 1)) % 512


def _loss(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(tokens[:, :-1])
    lm = lm_loss(out.logits, tokens[:, 1:])
    return lm + out.aux_loss, lm


def _serial_run() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """The full batch per step; each half gets its own loss (the lb loss is per rank under EP,
    and is computed the same way here), the step's loss is their mean."""
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses, lms = [], []
    for tokens in _batches():
        opt.zero_grad()
        parts = [_loss(model, h) for h in tokens.chunk(WORLD)]
        loss = sum(p[0] for p in parts) / WORLD
        loss.backward()
        opt.step()
        losses.append(loss.item())
        lms.append(sum(p[1].item() for p in parts) / WORLD)
    return losses, lms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_case(rank: int, _arg: Any) -> dict:
    mesh = _ep2_mesh(rank)
    torch.manual_seed(0)  # same full weights on every rank before sharding
    model = apply_expert_parallel(build_model(_tiny_cfg()), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    t0 = time.perf_counter()
    losses, lms = [], []
    for tokens in _batches():
        opt.zero_grad()
        loss, lm = _loss(model, tokens.chunk(WORLD)[rank])
        loss.backward()
        for p in model.parameters():
            # Expert grads already hold every ep rank's tokens (all_to_all backward): reduce
            # over the expert dp group only, then divide by the FULL dp size, like the rest.
            group = mesh.expert_dp_group if is_expert_param(p) else None
            dist.all_reduce(p.grad, group=group)
            p.grad /= mesh.dp
        opt.step()
        both = torch.stack([loss.detach(), lm.detach()])
        dist.all_reduce(both)
        losses.append(float(both[0]) / WORLD)
        lms.append(float(both[1]) / WORLD)
    ep_seconds = time.perf_counter() - t0
    gathered = gather_expert_weights(model, mesh)
    if rank != 0:
        return {"ep_seconds": ep_seconds}
    ref_losses, ref_lms, ref_state = _serial_run()
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    rel_lm = [abs(a - b) / abs(b) for a, b in zip(lms, ref_lms)]
    return {
        "ep_seconds": ep_seconds,
        "losses": losses,
        "ref_losses": ref_losses,
        "max_rel_loss": max(rel),
        "max_rel_lm": max(rel_lm),
        "max_param_diff": max(_maxdiff(gathered[k], ref_state[k]) for k in ref_state),
        "keys_match": sorted(gathered) == sorted(ref_state),
    }


def test_ep2_training_matches_serial(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    res = _spawn("_train_case", tmp_path)[0]
    print(
        f"\nEP=2 training, {STEPS} steps: {time.perf_counter() - t0:.1f}s total, "
        f"EP loop {res['ep_seconds']:.1f}s; max rel loss diff {res['max_rel_loss']:.2e}, "
        f"lm {res['max_rel_lm']:.2e}, max param diff after training {res['max_param_diff']:.2e}"
    )
    assert res["keys_match"]
    assert res["losses"][-1] < res["losses"][0] - 0.1  # it trains
    assert res["max_rel_loss"] <= LOSS_RTOL
    assert res["max_rel_lm"] <= LOSS_RTOL
    assert res["max_param_diff"] <= 1e-4


# (3) the same through DeepSpeed ZeRO-1/2 with the param groups of our helper ------------------
def _ds_case(rank: int, arg: tuple[int, str]) -> dict:
    stage, ckpt_dir = arg
    import deepspeed  # after DS_ACCELERATOR=cpu is set (in _worker)

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # reuses our process group
    mesh = _ep2_mesh(rank)
    torch.manual_seed(0)
    model = apply_expert_parallel(build_model(_tiny_cfg()), mesh)
    groups = prepare_expert_parallel_for_deepspeed(model, mesh, [{"params": model.parameters()}])
    ds_cfg = {
        "train_micro_batch_size_per_gpu": BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "train_batch_size": BATCH,
        "gradient_clipping": 0.0,  # DeepSpeed's MoE grad norm is its own definition (docstring)
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True},
        },
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2**31 - 1,
    }
    t0 = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
    init_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = []
    for tokens in _batches():
        loss, _ = _loss(engine, tokens.chunk(WORLD)[rank])
        engine.backward(loss)
        engine.step()
        both = loss.detach().clone()
        dist.all_reduce(both)
        losses.append(float(both) / WORLD)
    ds_seconds = time.perf_counter() - t0
    gathered = gather_expert_weights(engine.module, mesh)
    # Save, clobber the weights, load: each rank's expert shard must come back (from its ZeRO
    # optimizer partition; DeepSpeed's model file holds rank 0's shard only).
    engine.save_checkpoint(ckpt_dir, tag="t")
    with torch.no_grad():
        for p in engine.module.parameters():
            p.zero_()
    engine.load_checkpoint(ckpt_dir, tag="t", load_optimizer_states=True)
    restore_expert_weights_after_load(engine)
    reloaded = gather_expert_weights(engine.module, mesh)
    reload_diff = max(_maxdiff(reloaded[k], gathered[k]) for k in gathered)
    moe_groups = [g["name"] for g in engine.optimizer.optimizer.param_groups if g.get("moe")]
    if rank != 0:
        return {}
    ref_losses, _, ref_state = _serial_run()
    return {
        "init_seconds": init_seconds,
        "ds_seconds": ds_seconds,
        "losses": losses,
        "max_rel_loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        "max_param_diff": max(_maxdiff(gathered[k], ref_state[k]) for k in ref_state),
        "moe_groups": moe_groups,
        "has_moe_layers": engine.has_moe_layers,
        "reload_diff": reload_diff,
    }


@pytest.mark.parametrize("stage", [1, 2])
def test_ep2_deepspeed_zero_matches_serial(tmp_path: Path, stage: int) -> None:
    pytest.importorskip("deepspeed")
    t0 = time.perf_counter()
    # The first DeepSpeed start on a machine may compile its shm comm op (~80 s).
    res = _spawn("_ds_case", tmp_path, (stage, str(tmp_path / "ckpt")), timeout=300.0)[0]
    print(
        f"\nEP=2 DeepSpeed ZeRO-{stage}, {STEPS} steps: {time.perf_counter() - t0:.1f}s total "
        f"(initialize {res['init_seconds']:.1f}s, loop {res['ds_seconds']:.1f}s); max rel loss "
        f"diff {res['max_rel_loss']:.2e}, max param diff {res['max_param_diff']:.2e}, "
        f"moe groups {res['moe_groups']}, save/load max diff {res['reload_diff']:.1e}"
    )
    summary = {k: v for k, v in res.items() if k not in ("losses",)}  # in a failure's message
    assert res["has_moe_layers"], summary
    assert res["moe_groups"] == ["ep_size_2"], summary
    assert res["losses"][-1] < res["losses"][0] - 0.1, res["losses"]
    assert res["max_rel_loss"] <= LOSS_RTOL, summary
    assert res["max_param_diff"] <= 1e-4, summary
    assert res["reload_diff"] == 0.0, summary
