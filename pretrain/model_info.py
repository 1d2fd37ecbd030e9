"""Print size and cost of model configs: `python -m pretrain.model_info configs/model/*.yaml`.

Columns: name, layers, d, experts, total params, active params per token, training FLOPs per
token (formula in pretrain/model/accounting.py). `--json` prints one JSON object per config.
A config is counted as the decoder LM (`python -m pretrain`: embeddings and LM head), or, with
`--classifier` or when the YAML sets a classifier's field (`input_dim`, `query_init`), as the sequence classifier that
`python -m pretrain.memorization` builds from it (input projection and one-logit head instead):
the numbers its results.json and the demo's verdict report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mop.cli import ArgumentParser, examples
from mop.config import find_configs, load_config, read_yaml
from mop.errors import ConfigError, cli_entry
from pretrain.model.config import ClassifierConfig, ModelConfig, is_classifier_yaml


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def experts_of(cfg: ModelConfig) -> str:
    if cfg.ffn == "moe":
        return f"{cfg.moe.num_experts}/top{cfg.moe.top_k}"
    if cfg.ffn == "peer":
        return f"peer {cfg.peer.num_experts}"
    if cfg.ffn == "soft_moe":
        return f"soft {cfg.soft_moe.num_experts}"
    return "-"


def model_yaml_for(path: str) -> str:
    """The model YAML to count for `path`: `path` itself when it is a model config, the file a
    train config names in `model:` (what `python -m pretrain --config` would build); anything
    else is one ConfigError line naming the file and what is expected."""
    data = read_yaml(path)
    if not data or set(data) & set(ModelConfig.model_fields):
        return path  # a model config (its own validation names any unknown field)
    model = data.get("model")
    if isinstance(model, str):
        from pretrain.config import resolve_path  # the trainer's lookup: cwd, then the repo

        print(f"[model_info] {path} is a train config: counting its model {model}", file=sys.stderr)
        return resolve_path(model)
    found = ", ".join(sorted(map(str, data))[:6])
    why = (
        "its model: is not a file path"
        if "model" in data
        else f"it has none of a model config's fields (d_model, n_layers, ffn, ...), but {found}"
    )
    raise ConfigError(
        f"{path} is not a model config: {why}; pass a model YAML (configs/model/*.yaml) or a "
        "train config whose model: names one"
    )


def describe(
    path: str, overrides: list[str], seq_len: int | None, attention: str, classifier: bool = False
) -> dict:
    path = model_yaml_for(path)
    classifier = classifier or is_classifier_yaml(read_yaml(path))
    cfg = load_config(ClassifierConfig if classifier else ModelConfig, path, overrides)
    from pretrain.model.accounting import model_size  # imports torch: after the config is valid

    size = model_size(cfg, seq_len=seq_len, attention=attention)
    return {
        "name": Path(path).stem,
        "path": str(path),
        "counted_as": f"classifier (input_dim {cfg.input_dim})" if classifier else "LM",
        "ffn": cfg.ffn,
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "heads": cfg.num_heads,
        "kv_heads": cfg.kv_heads,
        "ffn_hidden": cfg.expert_ffn_dim if cfg.ffn == "moe" else cfg.ffn_dim,
        "experts": experts_of(cfg),
        **size.as_dict(),
    }


def format_table(rows: list[dict]) -> str:
    head = ("name", "layers", "d", "ffn", "experts", "total", "active", "FLOPs/token", "as")
    body = [
        (
            r["name"],
            str(r["layers"]),
            str(r["d_model"]),
            str(r["ffn_hidden"]),
            r["experts"],
            human(r["total_params"]),
            human(r["active_params"]),
            human(r["flops_per_token"]),
            r["counted_as"],
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m pretrain.model_info",
        description="Print total/active parameters and training FLOPs per token of model configs.",
        epilog=examples(
            "python -m pretrain.model_info configs/model/*.yaml",
            "python -m pretrain.model_info configs/model/moe_d512_e8.yaml --seq-len 4096 --json",
            "python -m pretrain.model_info configs/model/dense_d512.yaml --set vocab_size=50304",
            "python -m pretrain.model_info configs/model/synth12_dense_d256.yaml --classifier",
        ),
    )
    parser.add_argument("configs", nargs="+", help="model YAML files")
    parser.add_argument(
        "--set", action="append", default=[], help="override, e.g. vocab_size=50304 (repeatable)"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="default: each max_seq_len")
    parser.add_argument(
        "--attention",
        choices=("full", "causal"),
        default="full",
        help="attention FLOPs counted over the full or the causal (half) score matrix",
    )
    parser.add_argument(
        "--classifier",
        action="store_true",
        help="count the sequence classifier pretrain.memorization builds (input_dim 32 unless "
        "the YAML or --set input_dim=M says otherwise); automatic for a YAML with input_dim",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {args.seq_len}")
    rows = [
        describe(p, args.set, args.seq_len, args.attention, args.classifier)
        for p in find_configs(args.configs)  # a glob the shell did not match: the repo's
    ]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
