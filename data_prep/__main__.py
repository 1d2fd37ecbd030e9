"""`python -m data_prep {tokenizer,tokenize,merge,verify,synthetic} ...` (see --help)."""

from __future__ import annotations

import argparse
import sys

from data_prep.config import DataPrepConfig
from data_prep.synthetic.cli import add_parser as add_synthetic_parser
from mop.config import load_config, parse_args_with_overrides, to_yaml
from mop.errors import cli_entry

EPILOG = """\
examples:
  python -m data_prep tokenizer --config configs/data/natural_language.yaml
  python -m data_prep tokenize  --config configs/data/natural_language.yaml workers=8
  sbatch --array=0-63 slurm/data_prep.sbatch configs/data/natural_language.yaml   # one task per array index
  python -m data_prep merge     --config configs/data/natural_language.yaml
  python -m data_prep synthetic phonebook --out data/phonebook_1e5 --size 100000 --seed 0

Overrides: any config field as dotted key=value after the options, e.g. output_dir=/scratch/nl
mixture.total_tokens=1e9 sources.0.data_files=/data/fineweb/*.parquet
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="data-prep YAML (see configs/data/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn pretraining sources into tokenized, packed, memory-mappable shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenizer", help="train (or copy in) the tokenizer of a data directory")
    _add_config_args(p)

    p = sub.add_parser(
        "tokenize",
        help="tokenize this task's share of the inputs into shards (resumable)",
        description="Tokenize the configured sources. Killed runs resume where they stopped; "
        "the result is byte-identical to an uninterrupted run. With one task the merge "
        "step runs at the end.",
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
        "merge", help="check all units, write manifest, mixture plan and validation set"
    )
    _add_config_args(p)
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing every shard")

    p = sub.add_parser(
        "verify", help="re-hash every shard of a data directory against its manifest"
    )
    p.add_argument("--data-dir", required=True)

    add_synthetic_parser(sub)
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_overrides(build_parser(), argv)
    if args.command == "synthetic":
        return args.func(args)
    if args.command == "verify":
        return _verify(args.data_dir)
    cfg = load_config(DataPrepConfig, args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
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


def _verify(data_dir: str) -> int:
    from pathlib import Path

    from data_prep.manifest import load_manifest
    from data_prep.shards import verify_shard
    from mop.progress import progress

    manifest = load_manifest(data_dir)
    records = list(manifest["shards"]) + [manifest["validation"]]
    for rec in progress(records, desc="verify", unit="shard"):
        verify_shard(Path(data_dir) / rec["path"], rec)
    print(f"[verify] {len(records)} shard(s) OK in {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
