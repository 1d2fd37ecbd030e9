"""The pinned DeepSpeed still has every private internal pretrain/deepspeed_compat.py uses.

Fails by name when an upgrade renames or removes one, instead of deep inside a multi-rank run.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest
import torch

from pretrain import deepspeed_compat as compat
from pretrain.checkpoint import optim_partition_files
from pretrain.parallel.expert import expert_group_name


def _resolve(path: str):
    """A module or a class from its dotted path."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _class_source(cls: type) -> str:
    return "\n".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("deep"))


@pytest.mark.parametrize("owner,name", compat.INTERNALS, ids=lambda v: str(v).split(".")[-1])
def test_pinned_deepspeed_has_each_internal_we_use(owner: str, name: str) -> None:
    obj = _resolve(owner)
    if hasattr(obj, name):
        return
    if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return  # a dataclass field without a default
    # An instance attribute: one that the class's own code assigns.
    assert inspect.isclass(obj), f"{owner} has no {name}"
    assert re.search(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=", _class_source(obj)), (
        f"{owner} no longer assigns self.{name}"
    )


def test_signatures_we_call_with_keywords() -> None:
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.runtime.utils import clip_grad_norm_

    split = inspect.signature(split_params_into_different_moe_groups_for_optimizer)
    assert "max_group_size" in split.parameters
    assert {"parameters", "max_norm", "mpu"} <= set(inspect.signature(clip_grad_norm_).parameters)
    params = inspect.signature(MoE.set_deepspeed_parallelism).parameters
    assert "use_data_before_expert_parallel_" in params


def test_expert_group_names_parse_back_to_their_size() -> None:
    from deepspeed.utils import groups

    name = expert_group_name(4)
    saved = dict(groups._EXPERT_PARALLEL_GROUP)
    try:
        groups._EXPERT_PARALLEL_GROUP.clear()
        groups._EXPERT_PARALLEL_GROUP[name] = None
        assert groups._get_max_expert_size() == 4
        assert groups._get_max_expert_size_name() == name
    finally:
        groups._EXPERT_PARALLEL_GROUP.clear()
        groups._EXPERT_PARALLEL_GROUP.update(saved)


def test_the_marker_is_what_the_engine_looks_for() -> None:
    from deepspeed.moe.layer import MoE
    from deepspeed.runtime.engine import DeepSpeedEngine

    marker = compat.moe_marker(8, 2, expert_group_name(2))
    assert isinstance(marker, MoE) and list(marker.parameters()) == []
    assert (marker.num_experts, marker.ep_size, marker.num_local_experts) == (8, 2, 0)
    assert "isinstance(module, MoE)" in inspect.getsource(DeepSpeedEngine)
    with pytest.raises(RuntimeError, match="not a layer"):
        marker(torch.zeros(1))


def test_the_zero_checkpoint_format_we_read(tmp_path) -> None:
    """pretrain.checkpoint reads ZeRO 1/2 partition files by these names and keys."""
    from deepspeed.checkpoint import constants as c
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert c.OPTIMIZER_STATE_DICT == "optimizer_state_dict"
    assert c.ZERO_STAGE == "zero_stage"
    assert c.BASE_OPTIMIZER_STATE == "base_optimizer_state"
    assert c.PARAM_SLICE_MAPPINGS == "param_slice_mappings"
    assert c.PARTITION_COUNT == "partition_count"
    assert c.SINGLE_PARTITION_OF_FP32_GROUPS == "single_partition_of_fp32_groups"

    # The file names DeepSpeed writes (fp32 and bf16 runs) are the ones we find.
    class Namer:  # the engine's own naming methods, without building an engine
        _get_zero_ckpt_prefix = DeepSpeedEngine._get_zero_ckpt_prefix
        _get_rank_zero_ckpt_name = DeepSpeedEngine._get_rank_zero_ckpt_name

    names = [
        Namer()._get_rank_zero_ckpt_name(str(tmp_path), "t", mp_rank, dp_rank, bf16)
        for mp_rank, dp_rank, bf16 in [(0, 1, False), (0, 0, True), (1, 0, False)]
    ]
    (tmp_path / "t").mkdir()
    for n in names:
        open(n, "w").close()
    assert [f.name for f in optim_partition_files(tmp_path / "t", tp_rank=0)] == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


def test_zero_links_each_parameter_to_its_fragment() -> None:
    """deepspeed_compat.zero_fragments reads `param._hp_mapping`, which ZeRO 1/2 sets on every
    parameter (None where this rank holds none of it) when it links the fp32 partitions."""
    from deepspeed.utils import mixed_precision_linkage

    source = inspect.getsource(mixed_precision_linkage.link_hp_params)
    assert "lp_param._hp_mapping = get_hp_fragment_mapping(" in source
    assert "lp_param._hp_mapping = None" in inspect.getsource(mixed_precision_linkage)
