"""`python -m data_prep {tokenizer,tokenize,merge,verify,import-megatron,upgrade-index,synthetic}`
(see --help)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.config import DataPrepConfig
from data_prep.synthetic.cli import add_parser as add_synthetic_parser
from mop.cli import ArgumentParser, examples
from mop.config import load_config, parse_args_with_overrides, to_yaml
from mop.errors import ConfigError, check_dir_target, cli_entry

EPILOG = examples(
    "python -m data_prep tokenizer --config configs/data/natural_language.yaml",
    "python -m data_prep tokenize  --config configs/data/natural_language.yaml workers=8",
    "python -m data_prep tokenize  --config ... --task-index 3 --num-tasks 64 --no-merge",
    "python -m data_prep merge     --config configs/data/natural_language.yaml",
    "python -m data_prep verify    --data-dir data/natural_language",
    "python -m data_prep import-megatron --prefix /data/pile_text_document "
    "--tokenizer tokenizer.json --out data/pile",
    "python -m data_prep synthetic phonebook --out data/phonebook_1e5 --size 100000 --seed 0",
    notes="""\
Shards are Megatron-LM / GPT-NeoX indexed datasets (.bin + MMIDIDX .idx): megatron-core's
IndexedDataset reads them, and import-megatron brings such datasets in.
Overrides: any config field as dotted key=value after the options, e.g. output_dir=/scratch/nl
mixture.total_tokens=1e9 sources.0.data_files=/data/fineweb/*.parquet (--dry-run prints the
resolved config). Outputs: everything goes to output_dir (tokenizer, shards/, manifest.json,
mixture_plan.json, validation/, config.yaml, logs/); see `<subcommand> --help`.
On SLURM: python -m slurm.submit data configs/data/natural_language.yaml --tasks 64""",
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="data-prep YAML (see configs/data/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. workers=8 output_dir=/scratch/nl",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m data_prep",
        description="Turn pretraining sources into tokenized, packed, memory-mappable shards.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help="run `COMMAND --help` for its flags"
    )

    p = sub.add_parser(
        "tokenizer",
        help="train (or copy in) the tokenizer of a data directory",
        description="Train a tokenizer on a sample of the mixture (or copy in tokenizer.path "
        "with tokenizer.kind=pretrained) into output_dir, with its sha256.",
        epilog=examples(
            "python -m data_prep tokenizer --config configs/data/natural_language.yaml",
            "python -m data_prep tokenizer --config configs/data/tiny.yaml output_dir=/tmp/d",
        ),
    )
    _add_config_args(p)

    p = sub.add_parser(
        "tokenize",
        help="tokenize this task's share of the inputs into shards (resumable)",
        description="Tokenize the configured sources. Killed runs resume where they stopped; "
        "the result is byte-identical to an uninterrupted run. With one task the merge "
        "step runs at the end.",
        epilog=examples(
            "python -m data_prep tokenize --config configs/data/natural_language.yaml workers=16",
            "python -m data_prep tokenize --config ... --task-index 3 --num-tasks 64 --no-merge",
        ),
    )
    _add_config_args(p)
    p.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this array task (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0)",
    )
    p.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="array size (default: $SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="processes in this task (default: config)"
    )
    p.add_argument(
        "--no-merge", action="store_true", help="do not merge even when this is the only task"
    )

    p = sub.add_parser(
        "merge",
        help="check all units, write manifest, mixture plan and validation set",
        epilog=examples("python -m data_prep merge --config configs/data/natural_language.yaml"),
    )
    _add_config_args(p)
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing every shard")

    p = sub.add_parser(
        "verify",
        help="re-hash every shard and the tokenizer of a data directory against its manifest",
        description="Check every file that a data directory's manifest.json lists (shards, "
        "validation sequences, tokenizer; tensors of the memorization task) against its "
        "recorded sha256. Exit 0: all intact; exit 3: the first damaged or missing file.",
        epilog=examples(
            "python -m data_prep verify --data-dir data/natural_language",
            "python -m data_prep verify --data-dir data/phonebook_1e5",
        ),
    )
    p.add_argument("--data-dir", required=True, help="a tokenized or synthetic data directory")

    p = sub.add_parser(
        "import-megatron",
        help="make a data directory of Megatron-LM / GPT-NeoX datasets (.bin + .idx) to train on",
        description="Check existing Megatron/NeoX indexed datasets (every token id against the "
        "tokenizer's vocabulary, the index against its .bin), record their sha256 and write "
        "--out with manifest.json, the mixture plan (one prefix = one source) and held-out "
        "validation sequences cut from the last documents of each source. The .bin is hard-"
        "linked (symbolically linked across file systems), never copied. Then: python -m "
        "pretrain --config TRAIN.yaml data.data_dir=OUT.",
        epilog=examples(
            "python -m data_prep import-megatron --prefix /data/pile_text_document "
            "--tokenizer tokenizer.json --out data/pile",
            "python -m data_prep import-megatron --prefix /d/web_text_document "
            "/d/code_text_document --source web code --weights 0.7 0.3 "
            "--tokenizer tokenizer.model --out data/mix --validation-sequences 500",
            notes="A prefix P names P.bin and P.idx (what preprocess_data.py --output-prefix "
            "wrote, e.g. pile_text_document). --out must be new, empty or an earlier import "
            "with the same tokenizer; it is written under a temporary name and renamed into "
            "place, so a failed run leaves it as it was.",
        ),
    )
    p.add_argument(
        "--prefix", nargs="+", required=True, metavar="PREFIX", help="dataset prefix(es)"
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer.json or tokenizer.model the data was made with",
    )
    p.add_argument("--out", required=True, help="the data directory to write")
    p.add_argument(
        "--source", nargs="+", default=None, metavar="NAME",
        help="source name per prefix (default: each prefix's file name)",
    )  # fmt: skip
    p.add_argument(
        "--weights", nargs="+", type=float, default=None, metavar="W",
        help="mixture weight per prefix (default: by training tokens, one pass over each)",
    )  # fmt: skip
    p.add_argument(
        "--validation-sequences", type=int, default=5000, metavar="N",
        help="held-out validation sequences over all sources (default 5000; 0: none)",
    )  # fmt: skip
    p.add_argument(
        "--validation-seq-len", type=int, default=2048, metavar="T",
        help="tokens per validation sequence (default 2048)",
    )  # fmt: skip

    p = sub.add_parser(
        "upgrade-index",
        help="rewrite the .idx files of a data directory from before 2026-12 in Megatron's format",
        description="Data directories written before 2026-12 hold NumPy .idx files, which "
        "readers refuse. This rewrites each one as a Megatron MMIDIDX index (checked against "
        "its recorded sha256 and its .bin) and updates manifest.json and parts/; the .bin "
        "files are not touched. Safe to rerun; a killed run is finished by running it again.",
        epilog=examples("python -m data_prep upgrade-index --data-dir data/natural_language"),
    )
    p.add_argument("--data-dir", required=True, help="a tokenized or synthetic data directory")

    add_synthetic_parser(sub)
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_overrides(build_parser(), argv)
    if args.command == "synthetic":
        return args.func(args)
    if args.command == "verify":
        return _verify(args.data_dir)
    if args.command == "import-megatron":
        return _import(args)
    if args.command == "upgrade-index":
        from data_prep.upgrade import upgrade_data_dir

        done, current = upgrade_data_dir(args.data_dir)
        print(
            f"[upgrade-index] {done} index(es) rewritten in the Megatron format, {current} "
            f"already current, in {args.data_dir} (.bin files unchanged)"
        )
        return 0
    for flag in ("workers", "num_tasks"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    cfg = load_config(DataPrepConfig, args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    check_dir_target(cfg.output_dir, "output_dir")
    if args.command == "tokenizer":
        from data_prep.pipeline import run_tokenizer_stage

        run_tokenizer_stage(cfg)
    elif args.command == "tokenize":
        from data_prep.merge import merge
        from data_prep.pipeline import array_task_from_env, run_tokenize_task

        env_index, env_count = array_task_from_env()
        task_index = env_index if args.task_index is None else args.task_index
        num_tasks = env_count if args.num_tasks is None else args.num_tasks
        run_tokenize_task(cfg, task_index, num_tasks, args.workers)
        if num_tasks == 1 and not args.no_merge:
            merge(cfg)
    elif args.command == "merge":
        from data_prep.merge import merge

        merge(cfg, verify=not args.no_verify)
    return 0


def _import(args: argparse.Namespace) -> int:
    from data_prep.megatron_import import import_megatron

    check_dir_target(args.out, "--out")
    m = import_megatron(
        args.prefix,
        args.tokenizer,
        args.out,
        names=args.source,
        weights=args.weights,
        validation_sequences=args.validation_sequences,
        validation_seq_len=args.validation_seq_len,
    )
    for label, entry in m["sources"].items():
        print(
            f"[import] {label}: {entry['train_tokens']:,} training tokens in "
            f"{entry['train_documents']:,} documents, {entry['val_documents']:,} held out "
            f"(.bin {entry['imported']['link']}-linked from {entry['imported']['prefix']}.bin)"
        )
    v = m["validation"]
    print(
        f"[import] {args.out}: validation {v['num_sequences']} x {v['seq_len']} tokens; train "
        f"with: python -m pretrain --config TRAIN.yaml data.data_dir={args.out}"
    )
    return 0


def _verify(data_dir: str) -> int:
    from data_prep.verify import verify_data_dir

    checked = verify_data_dir(data_dir)
    print(f"[verify] {checked} file(s) OK in {Path(data_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
