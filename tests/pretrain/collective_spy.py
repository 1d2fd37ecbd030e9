"""Test-only launcher of `python -m pretrain` that records every reduction collective: the
op, the tensor's dtype and size, and the ranks of its group, written at exit to
$MOP_TEST_SPY_DIR/rank<R>.json with the engine's gradient dtypes (model, accumulation,
communication). Nothing here changes what the steps compute; checkpoints are not written (the
spy is about the training step's reductions, and a save only adds seconds)."""

from __future__ import annotations

import atexit
import inspect
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor")
RECORD: dict = {"calls": [], "engine": None}


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def _spy(name: str, real):
    signature = inspect.signature(real)

    def recorder(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        tensor = bound.get("input", bound.get("input_list", bound.get("tensor")))
        if isinstance(tensor, list):
            tensor = tensor[0]
        RECORD["calls"].append({
            "op": name, "dtype": str(tensor.dtype).removeprefix("torch."),
            "numel": tensor.numel(), "ranks": _ranks(bound.get("group")),
        })  # fmt: skip
        return real(*args, **kwargs)

    return recorder


for _name in REDUCTIONS:
    setattr(dist, _name, _spy(_name, getattr(dist, _name)))

import deepspeed  # noqa: E402  (after the patch: its comm backend binds torch's functions)

_initialize = deepspeed.initialize


def initialize(*args, **kwargs):
    out = _initialize(*args, **kwargs)
    engine = out[0]
    model_dtype, accum_dtype = engine.get_data_types()
    RECORD["engine"] = {
        "model": str(model_dtype).removeprefix("torch."),
        "accumulation": str(accum_dtype).removeprefix("torch."),
        "communication": str(engine.communication_data_type).removeprefix("torch."),
        "optimizer": type(engine.optimizer).__name__,
    }
    return out


deepspeed.initialize = initialize


@atexit.register
def _write() -> None:
    out = Path(os.environ["MOP_TEST_SPY_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(RECORD))


from pretrain import trainer  # noqa: E402
from pretrain.__main__ import main  # noqa: E402

trainer.Trainer.save = lambda self: None

if __name__ == "__main__":
    sys.exit(main())
