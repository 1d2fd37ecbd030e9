"""TrainConfig validation, derived sizes, the DeepSpeed dict, the lr schedule, --dry-run."""

from __future__ import annotations

import json

import pytest

from mop.config import load_config
from mop.errors import ConfigError
from pretrain.__main__ import main
from pretrain.config import TrainConfig, derived_sizes, resolve_precision
from pretrain.deepspeed_config import deepspeed_config
from pretrain.parallel import build_mesh
from pretrain.parallel.mesh import rank_groups
from pretrain.schedule import lr_multiplier
from tests.pretrain.conftest import REPO

TINY = REPO / "configs/train/tiny_cpu.yaml"
PAPER = REPO / "configs/train/paper_moe_d512_e8.yaml"
TP2 = ["parallel.tensor_parallel=2"]


def test_configs_load_and_model_path_resolves():
    cfg = load_config(TrainConfig, TINY)
    assert cfg.model.ffn == "moe" and cfg.model.vocab_size == 512
    paper = load_config(TrainConfig, PAPER)
    assert paper.model.n_layers == 20 and paper.precision == "bf16"


@pytest.mark.parametrize(
    "override, match",
    [
        ("zero_stage=-1", "zero_stage"),
        ("data.seq_len=4096", "max_seq_len"),
        ("optim.betas=[0.9,1.0]", "beta"),
        ("schedule.warmup_steps=1000", "warmup_steps"),
        ("bogus=1", "unknown config field"),
        ("model=configs/model/nope.yaml", "not found"),
        ("parallel.expert_parallel=2 zero_stage=0", "needs zero_stage 1 or 2"),
    ],
)
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, TINY, override.split())


def test_global_batch_derived_and_checked():
    cfg = load_config(TrainConfig, PAPER, ["batch.global_batch=512"])
    sizes = derived_sizes(cfg, world_size=8)
    assert (sizes.dp, sizes.global_batch, sizes.tokens_per_step) == (8, 512, 512 * 2048)
    with pytest.raises(ConfigError, match="global_batch=512"):
        derived_sizes(cfg, world_size=4)
    tp = load_config(TrainConfig, PAPER, ["parallel.tensor_parallel=3"])
    with pytest.raises(ConfigError, match="tp x dp"):
        derived_sizes(tp, world_size=8)


def test_mesh_layout_checks_are_clear_errors():
    cfg = load_config(TrainConfig, TINY, ["parallel.tensor_parallel=2"])
    mesh = build_mesh(cfg, world_size=4, rank=3)
    assert (mesh.dp, mesh.tp, mesh.dp_rank, mesh.tp_rank) == (2, 2, 1, 1)
    assert mesh.tp_ranks() == [2, 3] and mesh.dp_ranks() == [1, 3]
    with pytest.raises(ConfigError, match="num_experts"):
        build_mesh(load_config(TrainConfig, TINY, ["parallel.expert_parallel=3"]), 3, 0)
    with pytest.raises(ConfigError, match="n_kv_heads=2"):
        build_mesh(load_config(TrainConfig, TINY, ["parallel.tensor_parallel=4"]), 4, 0)
    with pytest.raises(ConfigError, match="vocab_size"):
        build_mesh(load_config(TrainConfig, TINY, [*TP2, "model.vocab_size=511"]), 2, 0)
    with pytest.raises(ConfigError, match="tp x dp"):
        build_mesh(load_config(TrainConfig, TINY, ["parallel.tensor_parallel=2"]), 3, 0)


def test_rank_groups_layout():
    g = rank_groups(world_size=8, tp=2, ep=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert g["expert_dp"] == [[0, 4], [2, 6], [1, 5], [3, 7]]


def test_deepspeed_dict():
    cfg = load_config(TrainConfig, PAPER)
    sizes = derived_sizes(cfg, 8)
    ds = deepspeed_config(cfg, sizes, resolve_precision(cfg, cuda=True))
    assert ds["train_batch_size"] == 16 * 4 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    params = ds["optimizer"]["params"]
    assert params["lr"] == 3e-4 and params["torch_adam"] is True and params["fused"] is True
    cpu = load_config(TrainConfig, TINY)
    ds_cpu = deepspeed_config(cpu, derived_sizes(cpu, 1), resolve_precision(cpu, False))
    assert "bf16" not in ds_cpu and ds_cpu["optimizer"]["params"]["torch_adam"] is True
    # the same fused kernel on CPU (foreach ran ~8 passes over the flat partition)
    assert ds_cpu["optimizer"]["params"]["fused"] is True
    assert "foreach" not in ds_cpu["optimizer"]["params"]


def test_schedules():
    cfg = load_config(TrainConfig, TINY, ["schedule.warmup_steps=10", "max_steps=100"])
    s = cfg.schedule
    assert lr_multiplier(0, s, 100) == pytest.approx(0.1)
    assert lr_multiplier(9, s, 100) == pytest.approx(1.0)
    assert lr_multiplier(100, s, 100) == pytest.approx(s.min_lr_ratio)
    wsd = cfg.schedule.model_copy(update={"kind": "wsd", "decay_fraction": 0.2})
    assert lr_multiplier(79, wsd, 100) == 1.0
    assert lr_multiplier(90, wsd, 100) == pytest.approx(1 - (1 - s.min_lr_ratio) * 0.5)
    assert lr_multiplier(100, wsd, 100) == pytest.approx(s.min_lr_ratio)


def test_dry_run_prints_resolved_config(capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert main(["--config", str(TINY), "batch.grad_accum=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    ds = json.loads(out.split("# deepspeed: ")[1])
    assert ds["gradient_accumulation_steps"] == 3 and "d_model: 64" in out
    assert main(["--config", str(TINY), "zero_stage=7", "--dry-run"]) == 2


def test_zero3_with_moe_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, TINY, ["zero_stage=3"])
    msg = str(err.value)
    assert msg.startswith("config: zero_stage=3 with model.ffn=moe") and "\n" not in msg


def test_model_file_override_then_its_fields():
    """`model=<file>` on the command line, then overrides into that model (what a sweep
    passes: model=... and the user's model.vocab_size=... for a synthetic tokenizer)."""
    cfg = load_config(
        TrainConfig,
        PAPER,
        [
            "model=configs/model/synth12_moe_d256_e8.yaml",
            "model.vocab_size=64",
            "model.moe.top_k=1",
        ],
    )
    assert (cfg.model.n_layers, cfg.model.vocab_size, cfg.model.moe.top_k) == (12, 64, 1)
    with pytest.raises(ConfigError, match="unknown config field 'model.bogus'"):
        load_config(TrainConfig, PAPER, ["model=configs/model/tiny_dense.yaml", "model.bogus=1"])
