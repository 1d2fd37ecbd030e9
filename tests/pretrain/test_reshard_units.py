"""The pieces of a resume in another layout, one process, no training run: the boxes a ZeRO
fragment covers in the plain tensor, where a parameter's block sits, the RNG streams of the
current GPU only (issue 23 item 6), Adam's step on the parameter's device for fused groups
(item 1), and older expert-parallel saves read one replica at a time (item 3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pretrain import checkpoint, deepspeed_compat
from pretrain.checkpoint_shards import flat_range_boxes, plain_placement


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 1), (4, 1, 3)])
def test_flat_ranges_become_boxes_that_cover_exactly_those_elements(shape):
    t = torch.arange(torch.Size(shape).numel()).view(shape)
    n = t.numel()
    for start in range(n + 1):
        for end in range(start, n + 1):
            got = []
            boxes = flat_range_boxes(shape, start, end - start)
            assert len(boxes) <= 2 * len(shape) - 1
            for (off, size), at in boxes:
                block = t[tuple(slice(o, o + s) for o, s in zip(off, size))].reshape(-1)
                # each box is a contiguous run of the flat range, starting where it says
                assert block.tolist() == list(range(start + at, start + at + block.numel()))
                got += block.tolist()
            assert got == list(range(start, end))


def test_a_parallel_blocks_place_in_the_plain_tensor():
    col = torch.nn.Parameter(torch.zeros(4, 6))
    col.tensor_model_parallel, col.partition_dim = True, 0
    row = torch.nn.Parameter(torch.zeros(8, 3))
    row.tensor_model_parallel, row.partition_dim = True, 1
    expert = torch.nn.Parameter(torch.zeros(5, 2))
    expert.allreduce = False
    norm = torch.nn.Parameter(torch.zeros(6))
    assert plain_placement(col, 1, 2, 0, 1) == ((8, 6), (4, 0))
    assert plain_placement(row, 1, 2, 0, 1) == ((8, 6), (0, 3))
    assert plain_placement(expert, 0, 2, 3, 4) == ((20, 2), (15, 0))  # replicated over tp
    assert plain_placement(norm, 1, 2, 1, 2) == ((6,), (0,))


def _fake_gpus(monkeypatch, visible: dict) -> list:
    """torch.cuda as seen by a process with visible["n"] GPUs, current visible["current"]:
    per-device RNG states that exist only for visible devices (what the real ones do)."""
    import torch.cuda.random as cuda_random

    states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(8)}
    restored: list = []

    def index(device) -> int:
        if device in ("cuda", None):
            i = visible["current"]
        elif isinstance(device, int):
            i = device
        else:
            i = torch.device(device).index
        if i >= visible["n"]:
            raise IndexError(f"device {i} is not visible ({visible['n']} GPUs)")
        return i

    def get_rng_state(device="cuda"):
        return states[index(device)].clone()

    def set_rng_state(state, device="cuda"):
        restored.append((index(device), state.clone()))

    for mod in (torch.cuda, cuda_random):
        monkeypatch.setattr(mod, "get_rng_state", get_rng_state)
        monkeypatch.setattr(mod, "set_rng_state", set_rng_state)
        monkeypatch.setattr(mod, "device_count", lambda: visible["n"])
        monkeypatch.setattr(mod, "current_device", lambda: visible["current"], raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return restored


def test_rng_of_the_current_gpu_is_saved_and_restored_on_fewer_gpus(monkeypatch):
    """Saved by local rank 3 of a node showing 8 GPUs, resumed by a task that sees one."""
    visible = {"n": 8, "current": 3}
    restored = _fake_gpus(monkeypatch, visible)
    saved = checkpoint.rng_state()
    visible.update(n=1, current=0)
    checkpoint.set_rng_state(saved)  # raised IndexError with every device's state
    assert len(restored) == 1
    device, state = restored[0]
    assert device == 0 and state.tolist() == [3, 3, 3, 3]  # the stream rank 3 trained with


def test_rng_of_an_older_save_holding_every_gpu_restores_the_current_one(monkeypatch):
    visible = {"n": 2, "current": 1}
    restored = _fake_gpus(monkeypatch, visible)
    old = {
        **checkpoint.rng_state(),
        "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in (0, 1)],
    }
    checkpoint.set_rng_state(old)
    assert [(d, s.tolist()) for d, s in restored] == [(1, [1, 1, 1, 1])]


def test_resharded_resume_puts_adams_step_where_fused_kernels_read_it():
    """torch's own load_state_dict moves `step` to the parameter's device for fused and
    capturable groups; the resharded resume writes the state itself and must do the same.
    The meta device stands in for CUDA (the saved step comes from a CPU-loaded file)."""
    fused = torch.nn.Parameter(torch.zeros(4, device="meta"))
    plain = torch.nn.Parameter(torch.zeros(4, device="meta"))
    opt = torch.optim.AdamW([{"params": [fused]}, {"params": [plain]}], lr=1e-3)
    opt.param_groups[0]["fused"] = True
    zero = SimpleNamespace(
        optimizer=opt,
        _hp_optimizer_states_linked=True,
        _lazy_init_hp_params_optimizer_state=lambda: None,
    )
    engine = SimpleNamespace(optimizer=zero)
    saved = [{"lr": 1e-3, "fused": True}, {"lr": 1e-3}]
    deepspeed_compat.init_zero_adam_state(engine, [torch.tensor(7.0), torch.tensor(7.0)], saved)
    step = opt.state[fused]["step"]
    assert step.device == fused.device and step.dtype == torch.float32
    assert opt.state[plain]["step"].device.type == "cpu"  # foreach/for-loop: a host scalar
    assert opt.state[fused]["exp_avg"].device == fused.device


def test_an_older_expert_parallel_save_is_read_one_replica_once(tmp_path, monkeypatch):
    """dp 4, ep 2 wrote four expert files (two replicas of each shard); eval reads two."""
    from pretrain.parallel import expert

    for rank in range(4):
        dp_rank = rank  # tp 1
        payload = {
            "ep_rank": dp_rank % 2,
            "expert_dp_rank": dp_rank // 2,
            "tensors": {"blocks.0.ffn.w1": torch.full((2, 3), float(dp_rank % 2))},
        }
        torch.save(payload, tmp_path / f"expert_shard_rank{rank}.pt")
    loaded = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        loaded.append(f.name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    merged = expert.merge_expert_shards(tmp_path, {"dp": 4, "tp": 1, "ep": 2})
    assert loaded == ["expert_shard_rank0.pt", "expert_shard_rank1.pt"]
    assert merged["blocks.0.ffn.w1"][:, 0].tolist() == [0, 0, 1, 1]
