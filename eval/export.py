"""Export a trained checkpoint (weights + tokenizer) as a transformers model directory.

`python -m eval.export --checkpoint RUN_DIR[/checkpoints/step_X] --out DIR [--dtype bfloat16]`

The weights go through pretrain/model/hf_export.py (Mistral / Mixtral); the tokenizer is
written so that `AutoTokenizer.from_pretrained(DIR)` gives a PreTrainedTokenizerFast over the
very same tokenizer.json (plus our tokenizer_meta.json, so `python -m eval --checkpoint DIR`
can check its hash). The EOS id is written into config.json and generation_config.json:
transformers' defaults (Mistral: eos=2) would otherwise stop generation at an ordinary token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.tokenizer import TextTokenizer
from mop.cli import ArgumentParser, examples
from mop.errors import ConfigError, DataError, check_dir_target, cli_entry
from mop.fileio import atomic_write_json, read_json

if TYPE_CHECKING:  # torch and the checkpoint loader are imported once the arguments are valid
    import torch

    from eval.checkpoint import LoadedModel


def export_tokenizer(tok: TextTokenizer, out_dir: str | Path, model_max_length: int) -> Path:
    """tokenizer.json + tokenizer_meta.json + a PreTrainedTokenizerFast config in `out_dir`."""
    if tok.kind != "hf":
        raise ConfigError(
            "HF export of the tokenizer supports tokenizer.json tokenizers (BPE/char), not "
            "SentencePiece models"
        )
    out = Path(out_dir)
    tok.save(out)
    special = {"eos_token": tok.eos_token, "pad_token": tok.eos_token}
    atomic_write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "bos_token": None,  # documents were packed without BOS
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        },
    )
    atomic_write_json(out / "special_tokens_map.json", special)
    ids = {"eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id, "bos_token_id": tok.eos_id}
    if (out / "config.json").is_file():
        atomic_write_json(out / "config.json", {**read_json(out / "config.json"), **ids})
    gen_file = out / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else {}
    atomic_write_json(gen_file, {**gen, **ids})
    return out


def export_loaded(loaded: LoadedModel, out_dir: str | Path, dtype: torch.dtype) -> Path:
    from eval.checkpoint import SOURCE_FILE
    from pretrain.model.hf_export import export_hf

    out = export_hf(loaded.model, out_dir, dtype=dtype)
    export_tokenizer(loaded.tokenizer, out, loaded.cfg.max_seq_len)
    # Where the weights came from, so results.json of the export still names the step.
    atomic_write_json(
        out / SOURCE_FILE,
        {
            "checkpoint": str(loaded.ref.path),
            "run_dir": str(loaded.ref.run_dir) if loaded.ref.run_dir else None,
            "step": loaded.ref.step,
        },
    )
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m eval.export",
        description=__doc__.split("\n")[0],
        epilog=examples(
            "python -m eval.export --checkpoint runs/moe_d512_e8 --out hf/moe_d512_e8",
            "python -m eval.export --checkpoint runs/x/checkpoints/step_00010000 --out hf/x "
            "--dtype bfloat16",
        ),
    )
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--data-dir", help="data directory holding the tokenizer (default: the run's)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights dtype",
    )
    args = p.parse_args(argv)
    check_dir_target(args.out, "--out")
    for flag in ("checkpoint", "data_dir"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            name = "checkpoint" if flag == "checkpoint" else f"--{flag.replace('_', '-')}"
            raise DataError(f"{name} path does not exist: {path}")
    import torch

    from eval.checkpoint import load_for_eval

    loaded = load_for_eval(args.checkpoint, data_dir=args.data_dir)
    out = export_loaded(loaded, args.out, getattr(torch, args.dtype))
    print(json.dumps({"exported": str(out), "step": loaded.ref.step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
