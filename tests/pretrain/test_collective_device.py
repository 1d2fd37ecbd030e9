"""Collectives get their tensors on the backend's device (pretrain/parallel/mesh.py
`collective_device`): NCCL, what DeepSpeed initialises on GPUs, cannot reduce CPU tensors, so a
host value (a loss mean, a stop flag, a validation sum) reduced as a CPU tensor crashes the
first multi-GPU step. The CPU tests run gloo, where CPU tensors are right, so they cannot see
it; here every call site runs with the collective device faked to `meta` (a device a CPU-only
torch has that is not the CPU) and a spy in place of the collectives that records the devices
of the tensors it is handed. The model-internal collectives (pretrain/parallel/{mappings,
expert,tensor}.py) reduce activations and gradients, already on the model's device.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pretrain import trainer as trainer_mod
from pretrain.parallel import mesh as mesh_mod
from pretrain.parallel.mesh import Mesh, collective_device

ROOT = Path(__file__).resolve().parents[2]
FAKE = torch.device("meta")
TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
)
# Collectives on tensors that are the model's own (activations, gradients, parameters) or,
# in the doctor, a CUDA tensor made for its one-rank NCCL check.
MODEL_DEVICE_MODULES = {
    "pretrain/parallel/mappings.py",
    "pretrain/parallel/expert.py",
    "pretrain/parallel/tensor.py",
    "pretrain/parallel/tensor_layers.py",
    "pretrain/doctor_env.py",
}
# Functions elsewhere whose collectives run on tensors that already live on the engine's
# device: ZeRO's own bit16/fp32 partitions (views into the module's flat buffer).
ENGINE_DEVICE_FUNCTIONS = {
    ("pretrain/deepspeed_compat.py", "restore_expert_partitions"),
}
# Every other function that calls a tensor collective, and the test below that covers it.
COVERED = {
    ("pretrain/trainer.py", "_all_reduce_mean"),
    ("pretrain/trainer.py", "_grads_finite"),
    ("pretrain/trainer.py", "_stop_agreed"),
    ("pretrain/trainer.py", "on_step_end"),  # LoggingCallback and EvalCallback
    ("eval/perplexity.py", "evaluate_perplexity"),  # tests/eval/test_collective_device.py
    ("eval/lm_adapter.py", "all_gather"),  # tests/eval/test_collective_device.py
}


class Reached(Exception):
    """Raised by the spy: the call site got as far as its collective."""


def spy_collectives(monkeypatch) -> list[tuple[str, list[torch.device]]]:
    """Fake `collective_device` (in every module that imported it) and stand a recorder in for
    each tensor collective; the recorder stops the caller with `Reached`."""
    calls: list[tuple[str, list[torch.device]]] = []
    real = mesh_mod.collective_device  # read once: this module's own name is patched too
    for module in list(sys.modules.values()):
        if getattr(module, "collective_device", None) is real:
            monkeypatch.setattr(module, "collective_device", lambda group=None: FAKE)

    def recorder(name: str):
        def collective(first, *args, **kwargs):
            tensors = list(first) if isinstance(first, list | tuple) else [first]
            tensors += [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a]
            calls.append((name, [t.device for t in tensors]))
            raise Reached(name)

        return collective

    for name in TENSOR_COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, recorder(name))
    return calls


def assert_one_call_on_fake(calls, name: str = "all_reduce") -> None:
    assert [c[0] for c in calls] == [name], calls
    devices = calls[0][1]
    assert devices and all(d == FAKE for d in devices), f"{name} got tensors on {devices}"


def two_dp_ranks() -> Mesh:
    return Mesh(world_size=2, rank=0, dp=2, tp=1, ep=1)


# The helper itself --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "expected"),
    [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu"))],
)
def test_collective_device_follows_the_backend(monkeypatch, backend, expected):
    seen = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: seen.append(group) or backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    group = object()
    assert collective_device(group) == expected
    assert seen == [group]  # asks about the group the collective runs on


def test_collective_device_of_a_real_gloo_group_is_the_cpu():
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert mesh_mod.collective_device() == torch.device("cpu")
    finally:
        dist.destroy_process_group()


# Trainer call sites -------------------------------------------------------------------------
def test_loss_mean_is_reduced_on_the_collective_device(monkeypatch):
    calls = spy_collectives(monkeypatch)
    with pytest.raises(Reached):
        trainer_mod._all_reduce_mean([1.0, 2.0], two_dp_ranks())
    assert_one_call_on_fake(calls)


def test_finite_gradient_flag_is_reduced_on_the_collective_device(monkeypatch):
    calls = spy_collectives(monkeypatch)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    model = nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(Reached):
        trainer_mod._grads_finite(model)
    assert_one_call_on_fake(calls)


def test_grads_finite_without_a_process_group_reads_the_local_gradients(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    model = nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert trainer_mod._grads_finite(model)
    model.bias.grad[0] = float("nan")
    assert not trainer_mod._grads_finite(model)


def test_stop_flag_is_reduced_on_the_collective_device(monkeypatch):
    calls = spy_collectives(monkeypatch)
    trainer = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    trainer.mesh = two_dp_ranks()
    with pytest.raises(Reached):
        trainer._stop_agreed()
    assert_one_call_on_fake(calls)


def fake_trainer(**extra) -> SimpleNamespace:
    return SimpleNamespace(
        state=trainer_mod.TrainState(step=1),
        mesh=two_dp_ranks(),
        sizes=SimpleNamespace(tokens_per_step=8),
        data=SimpleNamespace(labels=["web"]),
        guard=SimpleNamespace(rollbacks=[]),  # the spike guard: no rollback so far
        **extra,
    )


def test_expert_counts_are_reduced_on_the_collective_device(monkeypatch):
    calls = spy_collectives(monkeypatch)
    logging = SimpleNamespace(log_interval=1, peak_tflops=None, expert_load_by_source=True)
    cfg = SimpleNamespace(logging=logging, max_steps=1)
    cb = trainer_mod.LoggingCallback(logger=None, cfg=cfg, flops_per_token=1.0)
    counts = torch.ones(1, 1, 2, dtype=torch.int64)
    result = trainer_mod.StepResult(
        loss=1.0,
        lm_loss=1.0,
        aux_loss=0.0,
        applied=True,
        grad_norm=None,
        seconds=1.0,
        expert_counts=counts,
    )
    trainer = fake_trainer(engine=SimpleNamespace(get_lr=lambda: [0.1]))
    with pytest.raises(Reached):
        cb.on_step_end(trainer, result)
    assert_one_call_on_fake(calls)
    assert counts.tolist() == [[[1, 1]]]  # the step's own counts are not reduced in place


def test_validation_sums_are_reduced_on_the_collective_device(monkeypatch):
    calls = spy_collectives(monkeypatch)
    cfg = SimpleNamespace(eval=SimpleNamespace(interval=1, batch_size=1, max_batches=1))
    cb = trainer_mod.EvalCallback(logger=None, cfg=cfg)
    trainer = fake_trainer(
        engine=SimpleNamespace(module=nn.Identity(), device=torch.device("cpu")),
        val=SimpleNamespace(batches=lambda *args: iter(())),
    )
    with pytest.raises(Reached):
        cb.on_step_end(trainer, result=None)
    assert_one_call_on_fake(calls)


# Completeness -------------------------------------------------------------------------------
def tensor_collective_sites() -> set[tuple[str, str]]:
    """(file, enclosing function) of every `dist.<tensor collective>(...)` in pretrain/ and
    eval/ outside the model-internal modules."""
    sites = set()
    for package in ("pretrain", "eval"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in MODEL_DEVICE_MODULES:
                continue
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr in TENSOR_COLLECTIVES
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "dist"
                    ):
                        sites.add((rel, fn.name))
    return sites


def test_every_host_side_collective_has_a_device_test():
    sites = tensor_collective_sites()
    assert ("pretrain/trainer.py", "_all_reduce_mean") in sites  # the scan finds them
    missing = sites - COVERED - ENGINE_DEVICE_FUNCTIONS
    assert not missing, (
        f"collectives without a device test: {sorted(missing)}; give their tensors "
        "collective_device(group) and add a test here"
    )
