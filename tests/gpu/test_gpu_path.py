"""Issue 23 on a GPU: what the CPU tests show for the GPU path, checked where it runs (one
GPU, NCCL, bf16, CUDA kernels). One test per item that only a GPU shows; each records what it
measured in $OUT/gpu_path.json when OUT is set (bench/device_kit.py's `gpu_path` step).

- item 1: after a resharded resume, Adam's `step` sits on the parameter's device and torch's
  fused AdamW steps from it exactly as from torch's own load_state_dict;
- item 2: compile + activation checkpointing compiles graphs for the MoE blocks (bf16, CUDA);
- item 9: a training step (DeepSpeed ZeRO 1, bf16) makes no more host syncs with 4 micro-batches
  than with 1 (torch.cuda.set_sync_debug_mode counts them);
- item 10: extra micro-batches add no logits-sized peak (the previous one's logits are freed),
  and the tensor/expert-parallel model built on meta holds only this rank's shards while it is
  built, bit for bit the slices of the plain CUDA build;
- item 12: deterministic=strict runs (flash/memory-efficient attention backward included) and
  reproduces its losses and weights bitwise; its cost against deterministic=true is recorded.

Run: `OUT=/tmp/out python -m pytest tests/gpu/test_gpu_path.py -s`. Skips without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mop.config import load_config
from pretrain.config import TrainConfig, derived_sizes
from pretrain.data import Batch
from tests.pretrain.conftest import REPO, subprocess_env
from tests.pretrain.runs import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda", 0)


def record(item: str, values: dict) -> None:
    """Append this check's figures to $OUT/gpu_path.json (the kit's summary reads it)."""
    out = os.environ.get("OUT")
    if not out:
        return
    path = Path(out) / "gpu_path.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[item] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


def _cfg(*over: str) -> TrainConfig:
    return load_config(TrainConfig, TINY, ["precision=bf16", "batch.grad_accum=1", *over])


# item 1 --------------------------------------------------------------------------------------
def test_item1_fused_adamw_steps_from_a_resharded_resume():
    from pretrain import deepspeed_compat

    torch.manual_seed(0)
    init = torch.randn(4096, device=CUDA)
    grad = torch.randn(4096, device=CUDA)
    moments = {"exp_avg": torch.zeros_like(init), "exp_avg_sq": torch.zeros_like(init)}

    # torch's own path: load_state_dict from a CPU-loaded file moves `step` to the device
    ref = torch.nn.Parameter(init.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, fused=True)
    state = {"step": torch.tensor(7.0), **{k: v.cpu() for k, v in moments.items()}}
    ref_opt.load_state_dict({"state": {0: state}, "param_groups": [
        {**ref_opt.param_groups[0], "params": [0]}]})  # fmt: skip

    # the resharded resume's path (pretrain.deepspeed_compat.init_zero_adam_state)
    p = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    zero = SimpleNamespace(
        optimizer=opt, _hp_optimizer_states_linked=True,
        _lazy_init_hp_params_optimizer_state=lambda: None,
    )  # fmt: skip
    deepspeed_compat.init_zero_adam_state(
        SimpleNamespace(optimizer=zero), [torch.tensor(7.0)], None
    )
    assert opt.state[p]["step"].device == p.device  # a host step: illegal memory access
    for param, o in ((ref, ref_opt), (p, opt)):
        param.grad = grad.clone()
        o.step()
    torch.cuda.synchronize()
    assert torch.equal(p, ref)
    record("item1", {"step_device": str(opt.state[p]["step"].device), "equal_to_torch": True})


# item 2 --------------------------------------------------------------------------------------
def test_item2_moe_blocks_compile_under_activation_checkpointing(monkeypatch):
    import copy

    import torch._dynamo

    import pretrain.parallel as parallel
    from pretrain.model.transformer import build_model, lm_loss
    from pretrain.parallel import build_mesh

    real_compile = parallel.apply_compile
    counts = {}
    for ckpt in (False, True):
        graphs = []

        def counting(gm, example_inputs, _graphs=graphs):
            _graphs.append(gm)
            return gm.forward

        monkeypatch.setattr(parallel, "apply_compile", lambda m: real_compile(m, backend=counting))
        torch._dynamo.reset()
        cfg = _cfg("compile=true", f"activation_checkpointing={str(ckpt).lower()}")
        torch.manual_seed(0)
        plain = build_model(cfg.model).to(CUDA, torch.bfloat16)
        model = parallel.parallelize(copy.deepcopy(plain), cfg, build_mesh(cfg, 1, 0))
        x = torch.randint(0, cfg.model.vocab_size, (2, 32), device=CUDA)
        out = model(x)
        (lm_loss(out.logits, x) + out.aux_loss).backward()
        counts["with_checkpointing" if ckpt else "without"] = len(graphs)
    record("item2", counts)
    assert counts["with_checkpointing"] > 0, counts  # was 0: every MoE block ran eagerly


# items 9 and 10: real DeepSpeed steps -------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_nccl():
    """A world of one as `python -m pretrain` starts it (pretrain.launch)."""
    start_one_rank()
    yield


def start_one_rank() -> None:
    import torch.distributed as dist

    from pretrain.launch import DistEnv, init_distributed, prepare_env

    if not dist.is_initialized():
        de = DistEnv(rank=0, world_size=1, local_rank=0)
        prepare_env(de, cuda=CUDA.type == "cuda")
        init_distributed(de, cuda=CUDA.type == "cuda")


class FixedData:
    labels = ["a"]

    def __init__(self, batches):
        self.batches = batches

    def micro_batches(self, first, global_batch, dp, rank, micro):
        return self.batches


def _trainer(grad_accum: int, *over: str):
    """A Trainer around a real DeepSpeed engine (ZeRO 1, bf16) on this GPU."""
    import deepspeed

    from pretrain.__main__ import param_groups
    from pretrain.deepspeed_config import deepspeed_config
    from pretrain.model.transformer import build_model
    from pretrain.parallel import build_mesh, parallelize
    from pretrain.trainer import Trainer

    cfg = _cfg("model=configs/model/tiny_dense.yaml", f"batch.grad_accum={grad_accum}", *over)
    sizes = derived_sizes(cfg, 1)
    mesh = build_mesh(cfg, 1, 0)
    torch.manual_seed(0)
    with torch.device(CUDA):
        model = parallelize(build_model(cfg.model), cfg, mesh)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model),
        config=deepspeed_config(cfg, sizes, "bf16"),
    )
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(grad_accum):
        ids = torch.randint(
            0, cfg.model.vocab_size, (sizes.micro_batch, cfg.data.seq_len + 1), generator=g
        )
        batches.append(
            Batch(ids[:, :-1], ids[:, 1:], torch.zeros(sizes.micro_batch, dtype=torch.int64), [])
        )
    return Trainer(cfg, engine, FixedData(batches), None, sizes, mesh, "sha", [])


def _synced_step(trainer) -> tuple[int, int]:
    """(host syncs, peak bytes above the start) of one train_step."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return syncs, torch.cuda.max_memory_allocated() - base


BIG_VOCAB = (
    "model.vocab_size=32768",
    "model.max_seq_len=256",
    "data.seq_len=256",
    "batch.micro_batch=8",
)


def test_item9_no_host_sync_per_micro_batch(one_rank_nccl):
    syncs = {}
    for accum in (1, 4):
        trainer = _trainer(accum)
        _synced_step(trainer)  # warm-up: allocator, lazy optimizer state
        syncs[accum] = _synced_step(trainer)[0]
    record("item9", {"syncs_per_step": {"1 micro-batch": syncs[1], "4 micro-batches": syncs[4]}})
    assert syncs[4] == syncs[1], syncs


def test_item10_the_previous_logits_do_not_stay_alive(one_rank_nccl):
    peaks = {}
    for accum in (1, 3):
        trainer = _trainer(accum, *BIG_VOCAB)
        _synced_step(trainer)
        peaks[accum] = _synced_step(trainer)[1]
    cfg = trainer.cfg
    logits = 8 * cfg.data.seq_len * cfg.model.vocab_size * 2  # one micro-batch's bf16 logits
    record("item10_logits", {"peak_mib": {k: v / 2**20 for k, v in peaks.items()},
                             "logits_mib": logits / 2**20})  # fmt: skip
    assert peaks[3] - peaks[1] < logits / 2, (peaks, logits)


def test_item10_meta_build_holds_only_this_ranks_shards():
    from pretrain.model.transformer import build_model
    from pretrain.parallel import build_mesh
    from pretrain.parallel.meta_build import build_parallel_model

    over = ("model.ffn=moe", "model.moe.num_experts=8", "model.d_model=256", "model.n_heads=4",
            "model.n_kv_heads=4", "parallel.tensor_parallel=2", "parallel.expert_parallel=2")  # fmt: skip
    cfg = _cfg(*over)
    torch.manual_seed(0)
    plain = {n: p.detach() for n, p in build_model(cfg.model).to(CUDA).named_parameters()}
    rec = {}
    for rank in range(4):
        mesh = build_mesh(cfg, 4, rank)
        group = SimpleNamespace()
        fake = SimpleNamespace(**{k: getattr(mesh, k) for k in ("world_size", "rank", "dp", "tp", "ep")},
                               dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank, ep_rank=mesh.ep_rank,
                               tp_group=group, dp_group=group, ep_group=group,
                               expert_dp_group=group)  # fmt: skip
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        model = build_parallel_model(cfg, fake, CUDA)
        peak = torch.cuda.max_memory_allocated() - base
        local = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(p.numel() * p.element_size() for p in plain.values())
        rec[rank] = {"peak_mib": peak / 2**20, "local_mib": local / 2**20}
        assert peak <= local + largest + 2**20, rec[rank]
        for name, p in model.named_parameters():
            full = plain[name]
            if getattr(p, "allreduce", True) is False:
                want = full.chunk(fake.ep, 0)[fake.ep_rank]
            elif getattr(p, "tensor_model_parallel", False):
                want = full.chunk(fake.tp, p.partition_dim)[fake.tp_rank]
            else:
                want = full
            assert torch.equal(p, want), (rank, name)  # CUDA's generator, bit for bit
        del model
    full_mib = sum(p.numel() * p.element_size() for p in plain.values()) / 2**20
    record("item10_meta_build", {"full_model_mib": full_mib, "ranks": rec})


# item 12 -------------------------------------------------------------------------------------
DETERMINISM_RUN = r"""
import hashlib, json, sys, time
import torch
from pretrain.launch import set_determinism
set_determinism("strict", cuda=True)  # before any cuBLAS call: CUBLAS_WORKSPACE_CONFIG
from tests.gpu.test_gpu_path import _trainer, start_one_rank
start_one_rank()
out = {}
for mode in ("strict", "strict", True):
    torch.use_deterministic_algorithms(True, warn_only=mode != "strict")
    for name, over in (("dense", ()), ("moe", ("model=configs/model/tiny_moe.yaml",))):
        trainer = _trainer(2, *over, "model.max_seq_len=256", "data.seq_len=256", "batch.micro_batch=8")
        losses, t0 = [], None
        for step in range(4):
            if step == 1:
                torch.cuda.synchronize(); t0 = time.perf_counter()
            losses.append(trainer.train_step().loss)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 3 * 1e3
        h = hashlib.sha256()
        for p in trainer.engine.module.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes())
        out.setdefault(name, []).append({"mode": str(mode), "losses": losses,
                                         "weights": h.hexdigest(), "ms_per_step": ms})
print("DETERMINISM_JSON " + json.dumps(out))
"""


def test_item12_strict_determinism_runs_and_reproduces_bitwise():
    env = subprocess_env()
    env.pop("MASTER_PORT", None)  # this process's own world of one listens there
    res = subprocess.run(
        [sys.executable, "-c", DETERMINISM_RUN], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("DETERMINISM_JSON "))
    runs = json.loads(line.split(" ", 1)[1])
    summary = {}
    for name, (a, b, loose) in runs.items():
        summary[name] = {
            "strict_ms_per_step": a["ms_per_step"],
            "warn_only_ms_per_step": loose["ms_per_step"],
            "strict_cost": a["ms_per_step"] / loose["ms_per_step"] - 1,
            "strict_bitwise": a["losses"] == b["losses"] and a["weights"] == b["weights"],
            "warn_only_equal_to_strict": loose["weights"] == a["weights"],
        }
    record("item12", summary)
    for name, s in summary.items():
        assert s["strict_bitwise"], (name, runs[name])
