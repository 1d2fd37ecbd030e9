"""Export to / import from transformers' formats: dense -> Mistral, top-k MoE -> Mixtral.

Why a plain copy works: our rotary uses the same rotate_half layout, RMSNorm and SwiGLU match,
and the Mixtral router is softmax -> top-k -> renormalise (our router with renormalize=True).

Weights are written in the original (hub) Mixtral layout, one matrix per expert:
  model.layers.{i}.block_sparse_moe.gate.weight          [E, d]   <- ffn.router.weight
  model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight [f, d]  <- ffn.w1 rows of expert j
  model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight [f, d]  <- ffn.v1 rows of expert j
  model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight [d, f]  <- (ffn.w2 rows of j).T
transformers 5 converts this at load time into its fused `mlp.experts.gate_up_proj [E, 2f, d]`
and `mlp.experts.down_proj [E, d, f]` (transformers/conversion_mapping.py, "mixtral"); older
transformers, vLLM and llama.cpp read it as is. `import_hf` accepts both layouts.

A `mop_model.yaml` sidecar keeps the fields HF configs have no slot for (init_std, aux loss
weights, backend) so export -> import restores the exact ModelConfig.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mop.cli import ArgumentParser, examples
from mop.config import load_config, save_resolved
from mop.errors import ConfigError, DataError, check_dir_target, cli_entry
from pretrain.model.config import ModelConfig, MoEConfig

# torch is imported inside the functions: the CLI checks its config and paths before it loads.
if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pretrain.model.transformer import Transformer

SIDECAR = "mop_model.yaml"
WEIGHTS = "model.safetensors"


def check_exportable(cfg: ModelConfig) -> None:
    if cfg.ffn not in ("dense", "moe"):
        raise ConfigError(
            f"HF export supports ffn=dense (Mistral) and ffn=moe (Mixtral), not {cfg.ffn!r}"
        )
    if not cfg.causal:
        raise ConfigError("HF export needs causal=true: Mistral/Mixtral are causal LMs")
    if cfg.ffn == "moe" and not cfg.moe.renormalize:
        raise ConfigError(
            "HF export of an MoE needs moe.renormalize=true: Mixtral always renormalises the "
            "top-k router probabilities, so logits would differ"
        )


def hf_config(cfg: ModelConfig):
    """transformers MistralConfig / MixtralConfig with the same shapes."""
    from transformers import MistralConfig, MixtralConfig

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        sliding_window=None,  # we attend to the whole context
    )
    if cfg.ffn == "dense":
        hf = MistralConfig(intermediate_size=cfg.ffn_dim, **common)
        hf.architectures = ["MistralForCausalLM"]
    else:
        hf = MixtralConfig(
            intermediate_size=cfg.expert_ffn_dim,
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.lb_loss_weight,
            output_router_logits=False,
            **common,
        )
        hf.architectures = ["MixtralForCausalLM"]
    return hf


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    cfg = model.cfg
    check_exportable(cfg)
    out: dict[str, Tensor] = {"model.embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for ours, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
            out[p + f"self_attn.{theirs}_proj.weight"] = getattr(block.attn, ours).weight
        if cfg.ffn == "dense":
            out[p + "mlp.gate_proj.weight"] = block.ffn.w1.weight
            out[p + "mlp.up_proj.weight"] = block.ffn.w3.weight
            out[p + "mlp.down_proj.weight"] = block.ffn.w2.weight
        else:
            moe = p + "block_sparse_moe."
            out[moe + "gate.weight"] = block.ffn.router.weight
            w1, v1, w2 = block.ffn.expert_weights()
            for j in range(cfg.moe.num_experts):
                out[moe + f"experts.{j}.w1.weight"] = w1[j]
                out[moe + f"experts.{j}.w3.weight"] = v1[j]
                out[moe + f"experts.{j}.w2.weight"] = w2[j].t()
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def export_hf(model: Transformer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors (+ the mop sidecar) loadable with from_pretrained.

    `dtype` defaults to float32."""
    import torch
    from safetensors.torch import save_file

    dtype = torch.float32 if dtype is None else dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = hf_config(model.cfg)
    hf.dtype = dtype
    # Independent, contiguous copies: safetensors refuses views and shared storage.
    tensors = {
        k: v.detach().to(dtype=dtype, device="cpu").contiguous().clone()
        for k, v in to_hf_state_dict(model).items()
    }
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    hf.save_pretrained(str(out))
    save_resolved(model.cfg, out / SIDECAR)
    return out


# Import -----------------------------------------------------------------------------------


def _config_from_hf(d: dict) -> ModelConfig:
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    fields = dict(
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads"),
        ffn_hidden=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=theta,
        norm_eps=d.get("rms_norm_eps", 1e-5),
        tie_embeddings=d.get("tie_word_embeddings", False),
        init_std=d.get("initializer_range", 0.02),
    )
    if d.get("model_type") == "mixtral":
        fields["ffn"] = "moe"
        fields["moe"] = MoEConfig(
            num_experts=d["num_local_experts"],
            top_k=d["num_experts_per_tok"],
            lb_loss_weight=d.get("router_aux_loss_coef", 0.01),
        )
    elif d.get("model_type") != "mistral":
        raise ConfigError(
            f"import_hf reads mistral/mixtral checkpoints, not {d.get('model_type')!r}"
        )
    cfg = ModelConfig(**fields)
    if cfg.head_dim != d.get("head_dim", cfg.head_dim):
        raise ConfigError(f"head_dim={d['head_dim']} != hidden_size/num_attention_heads")
    return cfg


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DataError(f"no .safetensors file in {path}")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _expert_tensors(sd: dict[str, Tensor], i: int, cfg: ModelConfig) -> tuple[Tensor, ...]:
    """(router [E,d], w1 [E*f,d], v1 [E*f,d], w2 [E*f,d]) from either Mixtral layout."""
    import torch

    n, f, d = cfg.moe.num_experts, cfg.expert_ffn_dim, cfg.d_model
    legacy = f"model.layers.{i}.block_sparse_moe."
    fused = f"model.layers.{i}.mlp."
    if legacy + "gate.weight" in sd:
        router = sd[legacy + "gate.weight"]
        w1 = torch.stack([sd[legacy + f"experts.{j}.w1.weight"] for j in range(n)])
        v1 = torch.stack([sd[legacy + f"experts.{j}.w3.weight"] for j in range(n)])
        w2 = torch.stack([sd[legacy + f"experts.{j}.w2.weight"].t() for j in range(n)])
    else:
        router = sd[fused + "gate.weight"]
        gate_up = sd[fused + "experts.gate_up_proj"]  # [E, 2f, d]: gate rows then up rows
        w1, v1 = gate_up[:, :f], gate_up[:, f:]
        w2 = sd[fused + "experts.down_proj"].transpose(1, 2)  # [E, d, f] -> [E, f, d]
    return router, *(w.reshape(n * f, d) for w in (w1, v1, w2))


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state_dict (names of Transformer) from a Mistral/Mixtral one."""
    ours = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        ours[q + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        ours[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for mine, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
            ours[q + f"attn.{mine}.weight"] = sd[p + f"self_attn.{theirs}_proj.weight"]
        if cfg.ffn == "dense":
            ours[q + "ffn.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
            ours[q + "ffn.w3.weight"] = sd[p + "mlp.up_proj.weight"]
            ours[q + "ffn.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        else:
            router, w1, v1, w2 = _expert_tensors(sd, i, cfg)
            ours[q + "ffn.router.weight"] = router
            ours[q + "ffn.w1"], ours[q + "ffn.v1"], ours[q + "ffn.w2"] = w1, v1, w2
    ours["lm_head.weight"] = (
        sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    )
    return ours


def import_hf(path: str | Path, overrides: list[str] | None = None) -> Transformer:
    """Build our model from a Mistral/Mixtral directory (ours or any hub-format one), fp32."""
    path = Path(path)
    config_json = path / "config.json"
    if not config_json.is_file():
        raise DataError(f"{path} has no config.json")
    hf_dict = json.loads(config_json.read_text(encoding="utf-8"))
    cfg = _config_from_hf(hf_dict)
    if (path / SIDECAR).is_file():
        sidecar = load_config(ModelConfig, path / SIDECAR, overrides)
        if hf_config_key(sidecar) != hf_config_key(cfg):
            raise DataError(f"{path / SIDECAR} does not match {config_json} (shapes differ)")
        cfg = sidecar
    elif overrides:
        cfg = load_config(ModelConfig, None, [*_as_overrides(cfg), *overrides])
    from pretrain.model.transformer import build_model

    model = build_model(cfg)
    state = {k: v.float() for k, v in from_hf_state_dict(cfg, _load_tensors(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise DataError(f"weights of {path} do not fit: missing {missing}, unexpected {unexpected}")
    return model


def hf_config_key(cfg: ModelConfig) -> tuple:
    """The shape facts a Mistral/Mixtral config.json holds."""
    moe = (cfg.moe.num_experts, cfg.moe.top_k) if cfg.ffn == "moe" else None
    ffn = cfg.expert_ffn_dim if cfg.ffn == "moe" else cfg.ffn_dim
    return (
        cfg.vocab_size,
        cfg.d_model,
        cfg.n_layers,
        cfg.num_heads,
        cfg.kv_heads,
        ffn,
        moe,
        cfg.tie_embeddings,
    )


def _as_overrides(cfg: ModelConfig) -> list[str]:
    data = cfg.model_dump(mode="json", exclude_none=True)
    flat = []
    for k, v in data.items():
        if isinstance(v, dict):
            flat += [f"{k}.{kk}={json.dumps(vv)}" for kk, vv in v.items()]
        else:
            flat.append(f"{k}={json.dumps(v)}")
    return flat


# CLI --------------------------------------------------------------------------------------


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m pretrain.model.hf_export",
        description="Export a model to a Mistral/Mixtral directory loadable by transformers.",
        epilog=examples(
            "python -m pretrain.model.hf_export --config configs/model/moe_d512_e8.yaml "
            "--weights sd.pt --out hf/",
            "python -m pretrain.model.hf_export --config configs/model/tiny_dense.yaml "
            "--out /tmp/hf   # random init: checks shapes",
            notes="A trained run: python -m eval.export --checkpoint RUN_DIR --out DIR "
            "(weights + tokenizer).",
        ),
    )
    parser.add_argument("--config", required=True, help="model YAML (configs/model/*.yaml)")
    parser.add_argument(
        "--weights",
        help="a state_dict file (torch.save) of our Transformer; "
        "omitted: random init (to check shapes)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights dtype",
    )
    parser.add_argument("--set", action="append", default=[], help="config override a.b=value")
    args = parser.parse_args(argv)
    cfg = load_config(ModelConfig, args.config, args.set)
    check_exportable(cfg)
    check_dir_target(args.out, "--out")
    if args.weights and not Path(args.weights).is_file():
        raise DataError(f"--weights file not found: {args.weights}")
    import torch

    from pretrain.model.transformer import build_model

    model = build_model(cfg)
    if args.weights:
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors of many kinds: a damaged or foreign file
            raise DataError(
                f"--weights {args.weights} is not a readable state_dict ({type(exc).__name__})"
            ) from None
        state = {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in state.items()}
        model.load_state_dict(state)
    out = export_hf(model, args.out, dtype=getattr(torch, args.dtype))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
