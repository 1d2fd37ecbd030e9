"""`python -m data_prep synthetic {phonebook,shortest-path,memorization} --out DIR --size N`.

`add_parser(subparsers)` registers the `synthetic` subcommand on the data_prep CLI; the
handler is `args.func(args) -> int`. `python -m data_prep.synthetic.cli ...` runs the same
sub-subcommands standalone. Sizes accept scientific notation for whole numbers (3e6).
Argument values are checked by the task configs, so a bad value gives one `error:` line
and exit code 2, like every UserError of the project.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mop.errors import ConfigError, cli_entry

_DESCRIPTION = """\
Generate a synthetic task, deterministically from --seed, into --out DIR:
config.json, train/test jsonl text, char-level tokenizer, token shards and
manifest.json (memorization: .npy tensors and manifest.json). The manifest is
written last; a directory without one is unfinished. Same args -> same bytes.
"""


def _count(text: str, flag: str) -> int:
    """'1000', '100_000' or '3e6' -> int; a fraction or junk is a ConfigError."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a whole number, got {text!r}") from None
    if not value.is_integer():
        raise ConfigError(f"{flag} must be a whole number, got {text!r}")
    return int(value)


def _common(p: argparse.ArgumentParser, size_help: str) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    # Kept as text and parsed in the handler: a bad value then gets a one-line error.
    p.add_argument("--size", required=True, metavar="N", help=size_help)
    p.add_argument("--seed", default="0", metavar="S", help="random seed (default 0)")


def _text_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-test",
        default="1000",
        metavar="K",
        help="test examples (default 1000)",
    )
    p.add_argument(
        "--shard-tokens",
        default="50_000_000",
        metavar="T",
        help="start a new shard before one would exceed T tokens (default 5e7)",
    )


def _add_task_parsers(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    pb = sub.add_parser(
        "phonebook",
        help="unique 5-letter names -> unique 8-digit numbers",
        description=(
            "Phone book: SIZE entries 'abcde: 01234567', one per training document;\n"
            "the test set is --num-test entries of the book, prompt 'abcde:' and\n"
            "answer ' 01234567'. SIZE <= 26^5 = 11,881,376 (the paper: 1e5 to 3e6)."
        ),
        formatter_class=fmt,
    )
    _common(pb, "entries in the book, e.g. 1e5 .. 3e6")
    _text_common(pb)
    pb.set_defaults(func=run, task="phonebook")

    sp = sub.add_parser(
        "shortest-path",
        help="edge list + query -> a shortest path in a random graph",
        description=(
            "Shortest path in G(n, p): prompt '0-5 0-7 ... | 3>17 =', answer ' 3 9 17'\n"
            "(the smallest shortest path; eval accepts any shortest path). Only connected\n"
            "pairs are asked. p is calibrated so the mean answer length (in edges) is\n"
            "--target-length, unless --edge-prob is given. The paper: n in 25..55,\n"
            "1e6 train, 1e3 test. With n < ~29 a mean of 3.5 is out of reach."
        ),
        formatter_class=fmt,
    )
    _common(sp, "training examples, e.g. 1e6")
    _text_common(sp)
    sp.add_argument("--nodes", default="30", metavar="n", help="nodes per graph (default 30)")
    sp.add_argument(
        "--edge-prob", default=None, metavar="P", help="edge probability (default: calibrated)"
    )
    sp.add_argument(
        "--target-length",
        default="3.5",
        metavar="L",
        help="mean shortest-path length (edges) that calibration aims at (default 3.5)",
    )
    sp.add_argument("--calib-seed", default="0", metavar="S", help="calibration seed (default 0)")
    sp.add_argument(
        "--calib-graphs",
        default="2000",
        metavar="G",
        help="Monte-Carlo graphs per calibration estimate (default 2000)",
    )
    sp.set_defaults(func=run, task="shortest-path")

    mem = sub.add_parser(
        "memorization",
        help="Gaussian sequences with random +-1 labels (tensors)",
        description=(
            "Memorization: X [SIZE, N, m] float32 N(0, 1), y [SIZE] int8 uniform on\n"
            "{-1, +1}, saved as train_x.npy / train_y.npy. Test = the training set."
        ),
        formatter_class=fmt,
    )
    _common(mem, "number of sequences n")
    mem.add_argument("--seq-len", default="16", metavar="N", help="vectors per sequence (16)")
    mem.add_argument("--dim", default="32", metavar="m", help="vector dimension (default 32)")
    mem.set_defaults(func=run, task="memorization")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `synthetic` with its task sub-subcommands on the data_prep CLI."""
    p = subparsers.add_parser(
        "synthetic",
        help="phone-book, shortest-path and memorization task generators",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_task_parsers(p.add_subparsers(dest="task", metavar="TASK", required=True))
    return p


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a number, got {text!r}") from None


@cli_entry
def run(args: argparse.Namespace) -> int:
    """Handler of `synthetic <task>`: parse values, build the task config, generate."""
    size, seed = _count(args.size, "--size"), _count(args.seed, "--seed")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if args.task == "phonebook":
        from data_prep.synthetic.phonebook import PhonebookConfig, write_phonebook

        cfg = PhonebookConfig(
            size=size,
            seed=seed,
            num_test=_count(args.num_test, "--num-test"),
            shard_tokens=_count(args.shard_tokens, "--shard-tokens"),
        )
        manifest = write_phonebook(args.out, cfg)
    elif args.task == "shortest-path":
        from data_prep.synthetic.shortest_path import ShortestPathConfig, write_shortest_path

        cfg = ShortestPathConfig(
            size=size,
            seed=seed,
            num_test=_count(args.num_test, "--num-test"),
            nodes=_count(args.nodes, "--nodes"),
            edge_prob=None if args.edge_prob is None else _float(args.edge_prob, "--edge-prob"),
            target_length=_float(args.target_length, "--target-length"),
            calib_seed=_count(args.calib_seed, "--calib-seed"),
            calib_graphs=_count(args.calib_graphs, "--calib-graphs"),
            shard_tokens=_count(args.shard_tokens, "--shard-tokens"),
        )
        manifest = write_shortest_path(args.out, cfg)
    elif args.task == "memorization":
        from data_prep.synthetic.memorization import MemorizationConfig, write_memorization

        cfg = MemorizationConfig(
            size=size,
            seed=seed,
            seq_len=_count(args.seq_len, "--seq-len"),
            dim=_count(args.dim, "--dim"),
        )
        manifest = write_memorization(args.out, cfg)
    else:  # argparse only offers the three above
        raise ConfigError(f"unknown synthetic task {args.task!r}")
    _summary(args.out, manifest)
    return 0


def _summary(out: str, manifest: dict) -> None:
    task = manifest["task"]
    if "shards" in manifest:
        for split in ("train", "test"):
            recs = [r for r in manifest["shards"] if r["split"] == split]
            docs, toks = sum(r["documents"] for r in recs), sum(r["tokens"] for r in recs)
            print(f"{split}: {docs:,} examples, {toks:,} tokens in {len(recs)} shard(s)")
        if "edge_prob" in task["config"]:
            print(f"edge probability p = {task['config']['edge_prob']}")
    else:
        print(f"x: {manifest['tensors']['x']['shape']}, y: {manifest['tensors']['y']['shape']}")
    print(f"{task['name']} written to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic.cli",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_task_parsers(parser.add_subparsers(dest="task", metavar="TASK", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
