"""Defects of the GPU path that the CPU runs (gloo, fp32, every GPU visible) cannot show, each
caught here on a CPU (issue 23): spies on torch.distributed and on the tensor methods that
read the device, a faked GPU count, a weakref on the logits.

- subgroups carry `parallel.timeout_minutes`, and no group is created that is not needed
  (each one is a world-wide ncclCommSplit under NCCL with the device bound);
- under SLURM's per-task GPU binding (one GPU visible per task) local rank 3 trains on cuda:0;
- the training step reads the device once per step, not per micro-batch nor per parameter,
  and copies micro-batches from pinned memory without blocking;
- a micro-batch's logits are gone before its backward and before the next forward.
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mop.config import load_config
from pretrain import launch
from pretrain import trainer as trainer_mod
from pretrain.config import TrainConfig, derived_sizes
from pretrain.data import Batch
from pretrain.model.transformer import build_model
from pretrain.parallel import build_mesh, init_process_groups
from pretrain.trainer import Trainer
from tests.pretrain.runs import TINY
from tests.pretrain.test_step_sync import FakeEngine, FixedData

# Subgroups -----------------------------------------------------------------------------------


def _groups_made(monkeypatch, world: int, tp: int, ep: int, rank: int = 0):
    """init_process_groups on `rank` of a faked world: the new_group calls and the mesh."""
    calls = []

    def new_group(ranks, **kwargs):
        calls.append((list(ranks), kwargs))
        return SimpleNamespace(ranks=list(ranks))

    world_group = SimpleNamespace(ranks=list(range(world)))
    monkeypatch.setattr(dist, "new_group", new_group)
    monkeypatch.setattr(dist, "group", SimpleNamespace(WORLD=world_group))
    over = ["model.ffn=moe", "model.moe.num_experts=8"]
    over += [f"parallel.tensor_parallel={tp}", f"parallel.expert_parallel={ep}"]
    cfg = load_config(
        TrainConfig, TINY, [*over, "batch.grad_accum=1", "parallel.timeout_minutes=3"]
    )
    mesh = init_process_groups(build_mesh(cfg, world, rank), cfg.parallel.timeout_minutes)
    return calls, mesh, world_group


@pytest.mark.parametrize(
    ("world", "tp", "ep", "made"),
    [
        (8, 1, 1, [[r] for r in range(8)]),  # one-rank tp groups for DeepSpeed's mpu only
        (8, 2, 1, [[0, 1], [2, 3], [4, 5], [6, 7], [0, 2, 4, 6], [1, 3, 5, 7]]),
        (
            8,
            1,
            2,
            [[r] for r in range(8)]
            + [[0, 1], [2, 3], [4, 5], [6, 7]]
            + [[0, 2, 4, 6], [1, 3, 5, 7]],
        ),  # fmt: skip
        (4, 1, 4, [[r] for r in range(4)]),  # ep = dp: the ep group is the world, edp = tp's
    ],
)
def test_subgroups_carry_the_configured_timeout_and_only_needed_ones_exist(
    monkeypatch, world, tp, ep, made
):
    calls, mesh, world_group = _groups_made(monkeypatch, world, tp, ep)
    assert [ranks for ranks, _ in calls] == made
    assert all(kw.get("timeout") == timedelta(minutes=3) for _, kw in calls), calls
    assert not any(kw.get("use_local_synchronization") for _, kw in calls)  # a lone split hangs
    if tp == 1:
        assert mesh.dp_group is world_group  # the default group, not a copy of it
    if ep == 1:
        assert mesh.ep_group is None and mesh.expert_dp_group is mesh.dp_group
    for name in ("tp_group", "dp_group", "ep_group", "expert_dp_group"):
        g = getattr(mesh, name)
        if g is not None:
            assert mesh.rank in g.ranks, name


def test_every_rank_creates_the_same_groups_in_the_same_order(monkeypatch):
    # new_group is collective over the world: a rank that skipped one would hang the others.
    orders = {r: [c[0] for c in _groups_made(monkeypatch, 8, 2, 2, rank=r)[0]] for r in range(8)}
    assert all(order == orders[0] for order in orders.values())


# GPU binding -----------------------------------------------------------------------------------


def test_the_device_is_chosen_from_those_visible():
    assert launch.cuda_device_index(3, visible=8) == 3  # torchrun: every GPU of the node
    assert launch.cuda_device_index(3, visible=1) == 0  # --gpus-per-task=1: its own GPU
    assert launch.cuda_device_index(3, visible=2) == 1  # two bound per task
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        launch.cuda_device_index(0, visible=0)


def test_local_rank_3_with_one_gpu_visible_binds_cuda_0(monkeypatch):
    """SLURM per-task binding: each task sees one GPU, SLURM_LOCALID is still 0..7."""
    import deepspeed

    seen = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: seen.update(pg=(a, k)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **k: seen.update(ds=k))
    de = launch.DistEnv(rank=3, world_size=8, local_rank=3)
    assert launch.init_distributed(de, cuda=True, timeout_minutes=5) == 0
    assert seen["set_device"] == 0
    args, kwargs = seen["pg"]
    # bound to the visible device (DeepSpeed would bind cuda:LOCAL_RANK = cuda:3)
    assert args == ("nccl",) and kwargs["device_id"] == torch.device("cuda", 0)
    assert kwargs["timeout"] == timedelta(minutes=5) and kwargs["rank"] == 3
    assert seen["ds"]["dist_backend"] == "nccl"


def test_deepspeed_takes_the_device_from_args_device_rank(monkeypatch):
    """The contract __main__ relies on: DeepSpeedEngine uses args.device_rank, not LOCAL_RANK."""
    from deepspeed.runtime import engine as ds_engine

    picked = []
    accel = SimpleNamespace(set_device=picked.append, device_name=lambda i=None: f"cuda:{i}")
    monkeypatch.setattr(ds_engine, "get_accelerator", lambda: accel)
    monkeypatch.setattr(ds_engine.dist, "get_world_size", lambda *a, **k: 8)
    monkeypatch.setattr(ds_engine.dist, "get_rank", lambda *a, **k: 3)
    eng = object.__new__(ds_engine.DeepSpeedEngine)
    eng.local_rank = 3
    eng._set_distributed_vars(SimpleNamespace(device_rank=0))
    assert picked == [0] and eng.device == torch.device("cuda", 0)


# Host reads per step ---------------------------------------------------------------------------
READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _trainer(grad_accum: int, n_layers: int, engine_cls=FakeEngine):
    over = ["model=configs/model/tiny_dense.yaml", f"model.n_layers={n_layers}", "zero_stage=0"]
    cfg = load_config(TrainConfig, TINY, [*over, f"batch.grad_accum={grad_accum}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(grad_accum):
        ids = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g)
        batches.append(Batch(ids[:, :-1], ids[:, 1:], torch.zeros(2, dtype=torch.int64), [0, 1]))
    mesh = build_mesh(cfg, 1, 0)
    return Trainer(
        cfg, engine_cls(model), FixedData(batches), None, derived_sizes(cfg, 1), mesh, "sha", []
    )


def test_zero0_step_reads_the_device_once_per_step_not_per_parameter(monkeypatch):
    """ZeRO 0 checks the gradients before the update: one read, not a bool() per parameter."""
    counts = {}
    for accum, layers in ((1, 1), (4, 1), (1, 4)):
        trainer = _trainer(accum, layers)
        reads = _count_reads(monkeypatch)
        result = trainer.train_step()
        monkeypatch.undo()
        assert result.applied
        counts[(accum, layers)] = len(reads)
    # the loss sums and the finiteness flag: the same for 4 micro-batches and 4x the parameters
    assert set(counts.values()) == {2}, counts


def test_micro_batches_go_to_the_gpu_from_pinned_memory_without_blocking(monkeypatch):
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append((a, k)) or t)
    batch = [torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, dtype=torch.int64)]
    out = trainer_mod.to_device(torch.device("cuda", 0), *batch)
    assert [id(t) for t in pinned] == [id(t) for t in batch] and len(out) == 2
    assert copies == [((torch.device("cuda", 0),), {"non_blocking": True})] * 2


# Memory: the logits --------------------------------------------------------------------------


class LogitsWatch(FakeEngine):
    """Records a weakref to every micro-batch's logits; checks they died in time."""

    def __init__(self, model):
        super().__init__(model)
        self.refs: list[weakref.ref] = []
        self.alive_at_forward: list[int] = []
        self.alive_at_backward: list[int] = []

    def __call__(self, ids):
        self.alive_at_forward.append(sum(r() is not None for r in self.refs))
        out = super().__call__(ids)
        self.refs.append(weakref.ref(out.logits))
        return out

    def backward(self, loss):
        self.alive_at_backward.append(sum(r() is not None for r in self.refs))
        super().backward(loss)


def test_logits_are_freed_before_the_backward_and_the_next_forward():
    trainer = _trainer(3, 1, engine_cls=LogitsWatch)
    trainer.train_step()
    watch = trainer.engine
    assert len(watch.refs) == 3
    assert watch.alive_at_forward == [0, 0, 0]  # never two micro-batches' logits at once
    assert watch.alive_at_backward == [0, 0, 0]  # the backward runs without them
    assert all(r() is None for r in watch.refs)


def test_doctor_checks_the_binding_inside_the_step():
    """Run under srun, the doctor sees each task's own view: one GPU of the node's eight."""
    from pretrain import doctor_job

    cfg = load_config(TrainConfig, TINY, ["batch.grad_accum=1"])
    layout = doctor_job.Layout(world=16, per_node=8, gpus_needed=8)
    step = {"SLURM_LOCALID": "3", "SLURM_PROCID": "11", "SLURM_NTASKS": "16",
            "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "3"}  # fmt: skip
    rows = {c.name: c for c in doctor_job.check_layout(cfg, layout, 1, doctor_job.slurm_gpus(step))}
    assert rows["gpus"].status == "ok" and "per-task binding" in rows["gpus"].detail
    binding = doctor_job.check_gpu_binding(layout, step, visible=1)
    assert binding.status == "ok" and "local rank 3 -> cuda:0" in binding.detail
    # every GPU visible to every task (torchrun, --gpus-per-node): local rank r takes cuda:r
    node = {"LOCAL_RANK": "3", "RANK": "3", "WORLD_SIZE": "16"}
    assert "local rank 3 -> cuda:3" in doctor_job.check_gpu_binding(layout, node, 8).detail
    # 8 tasks, all seeing the same 4 GPUs: two ranks per GPU, which NCCL refuses
    shared = doctor_job.check_gpu_binding(layout, {**node, "SLURM_GPUS_ON_NODE": "4"}, 4)
    assert shared.status == "fail" and "--gpus-per-task=1" in shared.fix
    # 2 GPUs bound to each task: one idles
    two = doctor_job.check_gpu_binding(layout, {**step, "CUDA_VISIBLE_DEVICES": "6,7"}, 2)
    assert two.status == "warn" and "1 of them stay idle" in two.detail
    assert doctor_job.check_gpu_binding(doctor_job.Layout(2, 2, 0), node, 0) is None  # a CPU run


# Deterministic mode ----------------------------------------------------------------------------


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.utils.deterministic.fill_uninitialized_memory = state[2]


def test_strict_is_real_deterministic_mode_and_true_only_warns(restore_determinism):
    import os

    launch.set_determinism("strict", cuda=True)
    # an op without a deterministic kernel is an error; SDPA's backward takes its
    # deterministic variant (torch does that only without warn_only)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    launch.set_determinism(True, cuda=False)
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory


def test_the_banner_says_plainly_how_far_a_gpu_run_reproduces():
    gpu = launch.reproducibility_line(True, cuda=True)
    assert "up to CUDA kernel nondeterminism" in gpu and "deterministic=strict" in gpu
    assert "bitwise" in launch.reproducibility_line("strict", cuda=True)
    assert "bitwise" in launch.reproducibility_line(True, cuda=False)
    assert "differ" in launch.reproducibility_line(False, cuda=False)


def test_deterministic_takes_strict():
    from mop.errors import ConfigError

    assert load_config(TrainConfig, TINY, ["deterministic=strict"]).deterministic == "strict"
    assert load_config(TrainConfig, TINY, ["deterministic=false"]).deterministic is False
    with pytest.raises(ConfigError, match="deterministic"):
        load_config(TrainConfig, TINY, ["deterministic=maybe"])
