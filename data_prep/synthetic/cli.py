"""`python -m data_prep synthetic {phonebook,shortest-path,memorization,length2-path} --out DIR --size N`.

`add_parser(subparsers)` registers the `synthetic` subcommand on the data_prep CLI; the
handler is `args.func(args) -> int`. `python -m data_prep.synthetic.cli ...` runs the same
sub-subcommands standalone. Sizes accept scientific notation for whole numbers (3e6).
Argument values are checked by the task configs, so a bad value gives one `error:` line
and exit code 2, like every UserError of the project.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from mop.errors import ConfigError, cli_entry

_DESCRIPTION = """\
Generate a synthetic task, deterministically from --seed, into --out DIR:
config.json, train/test jsonl text, char-level tokenizer, token shards and
manifest.json (memorization, length2-path: .npy tensors and manifest.json). The manifest is
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


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a number, got {text!r}") from None


def _seed(text: str, flag: str) -> int:
    seed = _count(text, flag)
    if seed < 0:
        raise ConfigError(f"{flag} must be >= 0, got {seed}")
    return seed


@dataclass(frozen=True)
class _Arg:
    """One option: its flag names the task config's field (--num-test -> num_test). Values
    stay text in argparse and are parsed by `parse` in the handler, so that a bad value is
    one `error:` line rather than argparse's usage dump."""

    flag: str
    default: str | None
    metavar: str
    help: str
    parse: Callable[[str, str], int | float] = _count

    @property
    def field(self) -> str:
        return self.flag[2:].replace("-", "_")

    def value(self, args: argparse.Namespace) -> int | float | None:
        text = getattr(args, self.field)
        return None if text is None else self.parse(text, self.flag)


@dataclass(frozen=True)
class _Task:
    """A generator: its sub-command's texts, its own options, and where its code lives
    (imported only when that task runs)."""

    help: str
    description: str
    size_help: str
    args: tuple[_Arg, ...]
    module: str
    config: str  # the config class's name in `module`
    write: str  # write_<task>(out_dir, config) -> manifest

    def build_config(self, args: argparse.Namespace) -> Any:
        values = {a.field: a.value(args) for a in (*_common_args(self.size_help), *self.args)}
        # An option left out keeps the config's default (which may depend on other fields).
        values = {k: v for k, v in values.items() if v is not None}
        return getattr(import_module(self.module), self.config)(**values)


def _common_args(size_help: str) -> tuple[_Arg, ...]:
    """--size and --seed: every generator takes them (--out is the output, not config)."""
    return (
        _Arg("--size", None, "N", size_help),
        _Arg("--seed", "0", "S", "random seed (default 0)", _seed),
    )


# The token-shard writers' options: phone-book and shortest path write text tasks.
_TEXT_ARGS = (
    _Arg("--num-test", None, "K", "test examples (default 1000; phone book: min(1000, size))"),
    _Arg(
        "--shard-tokens",
        "50_000_000",
        "T",
        "start a new shard before one would exceed T tokens (default 5e7)",
    ),
)

TASKS: dict[str, _Task] = {
    "phonebook": _Task(
        help="unique 5-letter names -> unique 8-digit numbers",
        description=(
            "Phone book: SIZE entries 'abcde: 01234567', one per training document;\n"
            "the test set is --num-test entries of the book, prompt 'abcde:' and\n"
            "answer ' 01234567'. SIZE <= 26^5 = 11,881,376 (the paper: 1e5 to 3e6)."
        ),
        size_help="entries in the book, e.g. 1e5 .. 3e6",
        args=_TEXT_ARGS,
        module="data_prep.synthetic.phonebook",
        config="PhonebookConfig",
        write="write_phonebook",
    ),
    "shortest-path": _Task(
        help="edge list + query -> a shortest path in a random graph",
        description=(
            "Shortest path in G(n, p): prompt '0-5 0-7 ... | 3>17 =', answer ' 3 9 17'\n"
            "(the smallest shortest path; eval accepts any shortest path). Only connected\n"
            "pairs are asked. p is calibrated so the mean answer length (in edges) is\n"
            "--target-length, unless --edge-prob is given. The paper: n in 25..55,\n"
            "1e6 train, 1e3 test. With n < ~29 a mean of 3.5 is out of reach."
        ),
        size_help="training examples, e.g. 1e6",
        args=(
            *_TEXT_ARGS,
            _Arg("--nodes", "30", "n", "nodes per graph (default 30)"),
            _Arg("--edge-prob", None, "P", "edge probability (default: calibrated)", _float),
            _Arg(
                "--target-length",
                "3.5",
                "L",
                "mean shortest-path length (edges) that calibration aims at (default 3.5)",
                _float,
            ),
            _Arg("--calib-seed", "0", "S", "calibration seed (default 0)"),
            _Arg(
                "--calib-graphs",
                "2000",
                "G",
                "Monte-Carlo graphs per calibration estimate (default 2000)",
            ),
        ),
        module="data_prep.synthetic.shortest_path",
        config="ShortestPathConfig",
        write="write_shortest_path",
    ),
    "memorization": _Task(
        help="Gaussian sequences with random +-1 labels (tensors)",
        description=(
            "Memorization: X [SIZE, N, m] float32 N(0, 1), y [SIZE] int8 uniform on\n"
            "{-1, +1}, saved as train_x.npy / train_y.npy. Test = the training set."
        ),
        size_help="number of sequences n",
        args=(
            _Arg("--seq-len", "16", "N", "vectors per sequence (16)"),
            _Arg("--dim", "32", "m", "vector dimension (default 32)"),
        ),
        module="data_prep.synthetic.memorization",
        config="MemorizationConfig",
        write="write_memorization",
    ),
    "length2-path": _Task(
        help="edges at s and d of a random graph -> is there a path s-v-d? (tensors)",
        description=(
            "Length-2 path (the paper's Definition 2.1): s = 0, d = |V|-1. Each graph is\n"
            "its edges at s and d, one token each (one-hot(u) + one-hot(w)), in random\n"
            "order, zero-padded, then a query token; label +1 when s and d share a\n"
            "neighbour. deg(s), deg(d) uniform on [--min-degree, --max-degree] for both\n"
            "labels (edge counts say nothing); positives share exactly one vertex.\n"
            "Test: --num-test held-out graphs (none in training), half of each label."
        ),
        size_help="training graphs, e.g. 50000",
        args=(
            _Arg("--vertices", "16", "V", "vertices per graph |V| (default 16)"),
            _Arg("--min-degree", "2", "A", "fewest edges at s and at d (default 2)"),
            _Arg("--max-degree", "4", "B", "most edges at s and at d (default 4)"),
            _Arg("--num-test", "2000", "K", "held-out test graphs (default 2000)"),
        ),
        module="data_prep.synthetic.length2_path",
        config="Length2PathConfig",
        write="write_length2_path",
    ),
}


_EXAMPLES = {
    "phonebook": "python -m data_prep synthetic phonebook --out data/phonebook_1e5 --size 1e5",
    "shortest-path": "python -m data_prep synthetic shortest-path --out data/sp --size 1e6",
    "memorization": "python -m data_prep synthetic memorization --out data/mem --size 4096",
    "length2-path": "python -m data_prep synthetic length2-path --out data/l2p --size 50000 "
    "--vertices 16",
}


def _add_task_parsers(sub: argparse._SubParsersAction) -> None:
    for name, task in TASKS.items():
        p = sub.add_parser(
            name,
            help=task.help,
            description=task.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"example:\n  {_EXAMPLES[name]}\n",
        )
        p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
        for arg in (*_common_args(task.size_help), *task.args):
            p.add_argument(
                arg.flag,
                required=arg.flag == "--size",
                default=arg.default,
                metavar=arg.metavar,
                help=arg.help,
            )
        p.set_defaults(func=run, task=name)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `synthetic` with its task sub-subcommands on the data_prep CLI."""
    p = subparsers.add_parser(
        "synthetic",
        help="phone-book, shortest-path, memorization and length-2-path task generators",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        + "".join(f"  {line}\n" for line in _EXAMPLES.values())
        + "  python -m data_prep verify --data-dir data/phonebook_1e5   # re-hash what was written\n",
    )
    _add_task_parsers(
        p.add_subparsers(dest="task", metavar="TASK", required=True, help="the task to generate")
    )
    return p


@cli_entry
def run(args: argparse.Namespace) -> int:
    """Handler of `synthetic <task>`: parse values, build the task config, generate."""
    task = TASKS[args.task]  # argparse only offers these
    cfg = task.build_config(args)
    manifest = getattr(import_module(task.module), task.write)(args.out, cfg)
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
        tensors = manifest["tensors"]
        print(f"x: {tensors['x']['shape']}, y: {tensors['y']['shape']}")
        if "test_x" in tensors:
            print(f"test x: {tensors['test_x']['shape']}, test y: {tensors['test_y']['shape']}")
    print(f"{task['name']} written to {out}")


def build_parser() -> argparse.ArgumentParser:
    from mop.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m data_prep.synthetic.cli", description=_DESCRIPTION)
    _add_task_parsers(
        parser.add_subparsers(
            dest="task", metavar="TASK", required=True, help="the task to generate"
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
