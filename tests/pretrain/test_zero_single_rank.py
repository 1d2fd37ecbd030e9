"""ZeRO 1 with one data-parallel rank hands the gradients over in place
(pretrain.deepspeed_compat.reduce_gradients_in_place), and trains bitwise as DeepSpeed's own
reduction does: same weights, fp32 masters, Adam moments and gradient norms, step by step.

One spawned process (DeepSpeed's engine needs torch.distributed; a world of one keeps the
pytest process free of it) builds each engine twice from the same seed, with the fast path on
and off, and compares. Several data-parallel ranks are covered by the parallel-equivalence tests:
there the fast path must not apply (each rank's gradient would miss the others'), and a run
that skipped the averaging would not match the single process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _engine(stage: int, precision: str, grad_accum: int, fast: bool):
    import deepspeed
    import torch

    from pretrain.deepspeed_compat import reduce_gradients_in_place

    torch.manual_seed(0)
    # Two optimizer groups, 1-D parameters, and a layer the loss reaches on every other step
    # only (an MoE expert that got no tokens): on the others its gradient is None, and DeepSpeed
    # hands the optimizer zeros for it, not what the buffer held from the step before.
    model = torch.nn.ModuleDict(
        {
            "a": torch.nn.Linear(24, 40),
            "b": torch.nn.Linear(40, 8),
            "sometimes": torch.nn.Linear(8, 8),
        }
    )
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    decay = [model["a"].weight, model["b"].weight, model["sometimes"].weight]
    no_decay = [model["a"].bias, model["b"].bias, model["sometimes"].bias]
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": 4 * grad_accum,
        "gradient_clipping": 0.5,  # clips: the norm is large at these shapes
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True, "fused": True},
        },
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2**31 - 1,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        config["communication_data_type"] = "fp32"
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        config=config,
    )
    on = reduce_gradients_in_place(engine) if fast else False
    return engine, on


def _train(stage: int, precision: str, grad_accum: int, fast: bool) -> dict:
    import torch

    engine, on = _engine(stage, precision, grad_accum, fast)
    g = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    norms = []
    for step in range(4):
        for _ in range(grad_accum):
            x = torch.randn(4, 24, generator=g).to(dtype)
            y = engine.module["b"](torch.relu(engine.module["a"](x)))
            if step % 2 == 0:
                y = engine.module["sometimes"](y)
            engine.backward(y.float().square().mean())
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    opt = engine.optimizer
    masters = [t.detach().clone() for t in opt.single_partition_of_fp32_groups]
    moments = [
        {k: v.clone() for k, v in opt.optimizer.state[m].items() if torch.is_tensor(v)}
        for m in opt.single_partition_of_fp32_groups
    ]
    weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {"on": on, "norms": norms, "masters": masters, "moments": moments, "weights": weights}


def _worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        DS_ACCELERATOR="cpu",
    )
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for stage, precision, grad_accum in [(1, "fp32", 1), (1, "fp32", 2), (1, "bf16", 1)]:
        fast = _train(stage, precision, grad_accum, fast=True)
        slow = _train(stage, precision, grad_accum, fast=False)
        same = {
            "norms": fast["norms"] == slow["norms"],
            "masters": all(torch.equal(a, b) for a, b in zip(fast["masters"], slow["masters"])),
            "moments": all(
                m.keys() == n.keys() and all(torch.equal(m[k], n[k]) for k in m)
                for m, n in zip(fast["moments"], slow["moments"])
            ),
            "weights": all(torch.equal(fast["weights"][k], v) for k, v in slow["weights"].items()),
        }
        initial = _engine(stage, precision, grad_accum, False)[0].module.state_dict()
        # the run trained: the weights left their initial values
        moved = any(not torch.equal(fast["weights"][k], v) for k, v in initial.items())
        results[f"{stage}-{precision}-{grad_accum}"] = {
            "on": fast["on"],
            "same": same,
            "moved": moved,
            "norms": fast["norms"],
        }
    # Where the fast path must stay off: ZeRO 2 (gradients partitioned by DeepSpeed itself).
    results["stage2_on"] = _engine(2, "fp32", 1, fast=True)[1]
    Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    from pretrain.launch import free_port

    out = tmp_path_factory.mktemp("zero1") / "results.json"
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=1, start_method="spawn")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["1-fp32-1", "1-fp32-2", "1-bf16-1"])
def test_one_rank_zero1_trains_bitwise_as_deepspeeds_reduction(results, case):
    r = results[case]
    assert r["on"], "the fast path did not apply to ZeRO 1 in one rank"
    assert r["moved"] and all(n > 0 for n in r["norms"]), r
    assert r["same"] == {"norms": True, "masters": True, "moments": True, "weights": True}, r


def test_zero2_keeps_deepspeeds_path(results):
    assert results["stage2_on"] is False
