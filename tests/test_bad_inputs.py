"""Bad inputs across every entry point: each is one `error:` line, never a traceback.

One table (`CASES`): the command line, the text that the error line must name (the field,
value or path at fault), how to build the bad input, and the exit code where it matters.
Every case runs as a real subprocess (`python -m ...`, as a user types it) and must:

- exit non-zero (2 for bad input, 3 for bad data, where the case says so),
- print exactly one line starting with `error:` on stderr, naming the culprit,
- print no traceback,
- leave its directory exactly as it found it (no partial output; a failed command must not
  replace the previous config.yaml, create an output directory, ...).

The cases run in a thread pool (each one is a separate process) so the module stays fast;
fast errors are part of the contract: a bad config or path is refused before torch is
imported, so most cases take well under a second of CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # after `python -m`; {case} = this case's directory, {fx} = shared fixtures
    culprit: str  # the error line must contain this (formatted like argv)
    setup: Callable[[Path, Path], None] | None = None  # (case dir, fixtures dir)
    code: int | None = None  # the exit code, where it is part of the contract
    env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- builders of bad inputs


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def _data_cfg(case: Path, data_files: str, **extra) -> dict:
    cfg = {
        "output_dir": str(case / "out"),
        "sources": [{"source": "fineweb_edu", "data_files": data_files}],
        "tokenizer": {"vocab_size": 300, "sample_documents": 20, "min_frequency": 1},
        "shards": {"max_tokens": 3000},
        "mixture": {"total_tokens": 2000},
        "validation": {"fraction": 0.1, "num_sequences": 2, "seq_len": 16},
    }
    cfg.update(extra)
    return cfg


def _dump(path: Path, data: dict) -> None:
    _write(path, yaml.safe_dump(data, sort_keys=False))


def good_data_cfg(case: Path, fx: Path) -> None:
    _dump(case / "data.yaml", _data_cfg(case, str(fx / "raw" / "good.jsonl")))


def file_at(rel: str, text: str | bytes = "not a directory\n") -> Callable[[Path, Path], None]:
    def setup(case: Path, fx: Path) -> None:
        _write(case / rel, text)

    return setup


def then(*steps: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(case: Path, fx: Path) -> None:
        for step in steps:
            step(case, fx)

    return setup


def data_yaml(text: str) -> Callable[[Path, Path], None]:
    return file_at("data.yaml", text)


def tokenized_out(case: Path, fx: Path) -> None:
    """A data directory whose tokenizer stage ran (tokenizer + config.yaml of another run)."""
    shutil.copytree(fx / "tokdir", case / "out")


def damaged_input(name: str, make: Callable[[Path], bytes]) -> Callable[[Path, Path], None]:
    """`tokenize` over one damaged input file, in an output dir that has its tokenizer."""

    def setup(case: Path, fx: Path) -> None:
        tokenized_out(case, fx)
        _write(case / "in" / name, make(fx))
        _dump(case / "data.yaml", _data_cfg(case, str(case / "in" / name)))

    return setup


def _zst_bytes(fx: Path) -> bytes:
    return (fx / "raw" / "good.jsonl.zst").read_bytes()


def _zst_block_boundary(fx: Path) -> bytes:
    """The .zst cut right after a complete, non-last block: every block decodes, rows lost."""
    data = _zst_bytes(fx)
    cut = json.loads((fx / "raw" / "zst_blocks.json").read_text())["first_block_end"]
    return data[:cut]


def _parquet_cut(fx: Path) -> bytes:
    data = (fx / "raw" / "good.parquet").read_bytes()
    return data[: len(data) * 2 // 3]


def copy_dir(src: str, dst: str = "d") -> Callable[[Path, Path], None]:
    def setup(case: Path, fx: Path) -> None:
        shutil.copytree(fx / src, case / dst)

    return setup


def edit(rel: str, change: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def setup(case: Path, fx: Path) -> None:
        p = case / rel
        p.write_bytes(change(p.read_bytes()))

    return setup


def flip_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def _truncate_idx(data: bytes) -> bytes:
    return data[: len(data) - 8]


def _pointer_past_bin(data: bytes) -> bytes:
    """A Megatron .idx whose fourth sequence pointer runs far past the end of the .bin."""
    from data_prep.shards import HEADER  # the layout is the format module's

    n = HEADER.unpack(data[: HEADER.size])[3]  # sequences; lengths (i32) precede the pointers
    at = HEADER.size + 4 * n + 8 * 3
    return data[:at] + (10**9).to_bytes(8, "little") + data[at + 8 :]


def tokenizer_changed(case: Path, fx: Path) -> None:
    p = case / "d" / "tokenizer.json"
    doc = json.loads(p.read_text())
    doc["model"]["vocab"]["zz_extra"] = len(doc["model"]["vocab"])
    p.write_text(json.dumps(doc))


def manifest_edit(rel: str, change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def setup(case: Path, fx: Path) -> None:
        p = case / rel
        doc = json.loads(p.read_text())
        change(doc)
        p.write_text(json.dumps(doc))

    return setup


def train_yaml(**extra) -> Callable[[Path, Path], None]:
    """A train config over the shared tiny data directory (valid unless `extra` breaks it)."""

    def setup(case: Path, fx: Path) -> None:
        cfg = yaml.safe_load((REPO / "configs/train/tiny_cpu.yaml").read_text())
        cfg["data"]["data_dir"] = str(fx / "data")
        cfg["data"]["seq_len"] = 32
        cfg["run_dir"] = str(case / "run")
        cfg["logging"]["wandb_mode"] = "disabled"
        cfg["model"] = str(REPO / "configs/model/tiny_moe.yaml")
        cfg.update(extra)
        _dump(case / "train.yaml", cfg)

    return setup


def results_dir(case: Path, fx: Path) -> None:
    _write(case / "runs" / "a" / "results.json", "{not json")


TRAIN = ["pretrain", "--config", "{case}/train.yaml"]
DP = ["data_prep"]
SYN = ["data_prep", "synthetic"]
IMP = ["data_prep", "import-megatron", "--prefix"]
CHAR_TOK = ["--tokenizer", "{fx}/tokdir/tokenizer.json"]
PB = [*SYN, "phonebook", "--out", "{case}/pb"]
SP = [*SYN, "shortest-path", "--out", "{case}/sp"]
MEM = [*SYN, "memorization", "--out", "{case}/mem"]
MI = ["pretrain.model_info"]
MEMO = ["pretrain.memorization", "--data", "{fx}/mem", "--steps", "2", "--out", "{case}/run"]
HF = ["pretrain.model.hf_export", "--config", "configs/model/tiny_dense.yaml"]
EVAL = ["eval", "--checkpoint"]
SUB = ["slurm.submit", "--dry-run"]
TINY_MODEL = "configs/model/tiny_dense.yaml"
NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}

CASES: list[Case] = [
    # ---- data_prep: command line
    Case("dp-no-command", DP, "COMMAND", code=2),
    Case("dp-unknown-command", [*DP, "tokenise"], "tokenise", code=2),
    Case("dp-missing-config-flag", [*DP, "tokenize"], "--config", code=2),
    Case("dp-config-not-found", [*DP, "tokenize", "--config", "{case}/nope.yaml"], "nope.yaml"),
    Case(
        "dp-config-is-dir",
        [*DP, "tokenizer", "--config", "{case}/cfgdir"],
        "cfgdir",
        file_at("cfgdir/x", ""),
    ),
    Case(
        "dp-yaml-syntax",
        [*DP, "tokenizer", "--config", "{case}/data.yaml"],
        "data.yaml:4:1: invalid YAML",
        data_yaml("output_dir: x\nsources:\n  - source: [fineweb_edu\n"),
        code=2,
    ),
    Case(
        "dp-yaml-tab",
        [*DP, "tokenizer", "--config", "{case}/data.yaml"],
        "data.yaml:2:",
        data_yaml("output_dir: x\n\tsources: []\n"),
    ),
    Case(
        "dp-yaml-list",
        [*DP, "tokenizer", "--config", "{case}/data.yaml"],
        "data.yaml",
        data_yaml("- output_dir\n"),
    ),
    Case(
        "dp-yaml-binary",
        [*DP, "tokenizer", "--config", "{case}/data.yaml"],
        "data.yaml",
        file_at("data.yaml", b"\xff\xfe\x00garbage"),
    ),
    Case(
        "dp-unknown-field",
        [*DP, "tokenizer", "--config", "{case}/data.yaml", "tokeniser.vocab_size=10"],
        "tokeniser",
        good_data_cfg,
    ),
    Case(
        "dp-bad-vocab",
        [*DP, "tokenizer", "--config", "{case}/data.yaml", "tokenizer.vocab_size=10"],
        "tokenizer.vocab_size",
        good_data_cfg,
    ),
    Case(
        "dp-workers-zero-config",
        [*DP, "tokenize", "--config", "{case}/data.yaml", "workers=0"],
        "workers",
        good_data_cfg,
    ),
    Case(
        "dp-workers-zero-flag",
        [*DP, "tokenize", "--config", "{case}/data.yaml", "--workers", "0"],
        "--workers",
        then(good_data_cfg, tokenized_out),
    ),
    Case(
        "dp-workers-not-int",
        [*DP, "tokenize", "--config", "{case}/data.yaml", "--workers", "many"],
        "many",
        good_data_cfg,
    ),
    Case(
        "dp-task-index-range",
        [*DP, "tokenize", "--config", "{case}/data.yaml", "--task-index", "4", "--num-tasks", "2"],
        "--task-index",
        then(good_data_cfg, tokenized_out),
    ),
    Case(
        "dp-num-tasks-zero",
        [*DP, "tokenize", "--config", "{case}/data.yaml", "--num-tasks", "0"],
        "--num-tasks",
        then(good_data_cfg, tokenized_out),
    ),
    Case(
        "dp-override-no-equals",
        [*DP, "tokenizer", "--config", "{case}/data.yaml", "workers"],
        "workers",
        good_data_cfg,
    ),
    Case(
        "dp-override-index-range",
        [*DP, "tokenizer", "--config", "{case}/data.yaml", "sources.5.weight=1"],
        "sources.5",
        good_data_cfg,
    ),
    Case(
        "dp-unknown-source",
        [*DP, "tokenizer", "--config", "{case}/data.yaml", "sources.0.source=fineweb_edux"],
        "fineweb_edux",
        good_data_cfg,
    ),
    Case(
        "dp-negative-weight",
        [*DP, "tokenizer", "--config", "{case}/data.yaml", "sources.0.weight=-1"],
        "sources.0.weight",
        good_data_cfg,
    ),
    Case(
        "dp-decontam-no-files",
        [*DP, "tokenize", "--config", "{case}/data.yaml", "decontamination.enabled=true"],
        "decontamination.eval_files",
        then(good_data_cfg, tokenized_out),
    ),
    Case(
        "dp-pretrained-no-path",
        [*DP, "tokenizer", "--config", "{case}/data.yaml", "tokenizer.kind=pretrained"],
        "tokenizer.path",
        good_data_cfg,
    ),
    Case(
        "dp-pretrained-missing-file",
        [
            *DP,
            "tokenizer",
            "--config",
            "{case}/data.yaml",
            "tokenizer.kind=pretrained",
            "tokenizer.path={case}/tok.json",
        ],
        "tok.json",
        good_data_cfg,
    ),
    Case(
        "dp-output-dir-is-file",
        [*DP, "tokenizer", "--config", "{case}/data.yaml"],
        "{case}/out",
        then(good_data_cfg, file_at("out")),
    ),
    Case(
        "dp-tokenize-output-dir-is-file",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "{case}/out",
        then(good_data_cfg, file_at("out")),
    ),
    Case(
        "dp-tokenize-before-tokenizer",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "tokenizer",
        good_data_cfg,
    ),
    Case(
        "dp-merge-before-tokenize",
        [*DP, "merge", "--config", "{case}/data.yaml"],
        "fineweb_edu/u00000",
        then(good_data_cfg, tokenized_out),
    ),
    Case(
        "dp-data-files-no-match",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "{case}/in/*.parquet",
        then(tokenized_out, lambda c, f: _dump(c / "data.yaml", _data_cfg(c, f"{c}/in/*.parquet"))),
    ),
    Case(
        "dp-data-files-missing",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "{case}/in/x.jsonl",
        then(tokenized_out, lambda c, f: _dump(c / "data.yaml", _data_cfg(c, f"{c}/in/x.jsonl"))),
    ),
    Case(
        "dp-data-files-unknown-ext",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.txt",
        damaged_input("x.txt", lambda fx: b"plain text\n"),
    ),
    # ---- data_prep: damaged input files (tokenize stops, naming the file and the reason)
    Case(
        "dp-empty-file",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl",
        damaged_input("x.jsonl", lambda fx: b""),
        code=3,
    ),
    Case(
        "dp-zst-cut-mid-block",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl.zst",
        damaged_input("x.jsonl.zst", lambda fx: _zst_bytes(fx)[: len(_zst_bytes(fx)) - 7]),
        code=3,
    ),
    Case(
        "dp-zst-cut-at-block-boundary",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl.zst",
        damaged_input("x.jsonl.zst", _zst_block_boundary),
        code=3,
    ),
    Case(
        "dp-zst-garbage",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl.zst",
        damaged_input("x.jsonl.zst", lambda fx: b"this is not zstd at all\n" * 4),
        code=3,
    ),
    Case(
        "dp-parquet-cut",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.parquet",
        damaged_input("x.parquet", _parquet_cut),
        code=3,
    ),
    Case(
        "dp-parquet-garbage",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.parquet",
        damaged_input("x.parquet", lambda fx: b"PAR1 but then nothing useful"),
        code=3,
    ),
    Case(
        "dp-jsonl-invalid-utf8",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl",
        damaged_input("x.jsonl", lambda fx: b'{"text": "ok"}\n{"text": "bad \xff\xfe bytes"}\n'),
        code=3,
    ),
    Case(
        "dp-jsonl-not-json",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl",
        damaged_input("x.jsonl", lambda fx: b'{"text": "ok"}\nthis line is not json\n'),
        code=3,
    ),
    Case(
        "dp-jsonl-gz-cut",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl.gz",
        damaged_input("x.jsonl.gz", lambda fx: (fx / "raw" / "good.jsonl.gz").read_bytes()[:-9]),
        code=3,
    ),
    Case(
        "dp-jsonl-blank-lines",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.jsonl holds no rows",
        damaged_input("x.jsonl", lambda fx: b"\n\n   \n"),
        code=3,
    ),
    Case(
        "dp-parquet-no-rows",
        [*DP, "tokenize", "--config", "{case}/data.yaml"],
        "x.parquet holds no rows",
        damaged_input("x.parquet", lambda fx: (fx / "raw" / "empty.parquet").read_bytes()),
        code=3,
    ),
    # ---- data_prep verify
    Case("verify-no-flag", [*DP, "verify"], "--data-dir", code=2),
    Case("verify-missing-dir", [*DP, "verify", "--data-dir", "{case}/none"], "{case}/none"),
    Case("verify-no-manifest", [*DP, "verify", "--data-dir", "{case}"], "manifest.json"),
    Case(
        "verify-garbled-manifest",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "manifest.json",
        then(copy_dir("pb"), file_at("d/manifest.json", '{"format": "mop-shards-v1", "shar')),
        code=3,
    ),
    Case(
        "verify-manifest-not-object",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "manifest.json",
        then(copy_dir("pb"), file_at("d/manifest.json", "[1, 2]")),
        code=3,
    ),
    Case(
        "verify-manifest-no-shards-key",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "manifest.json",
        then(copy_dir("pb"), manifest_edit("d/manifest.json", lambda m: m.pop("shards"))),
        code=3,
    ),
    Case(
        "verify-shard-flipped",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "part-00000.bin",
        then(copy_dir("pb"), edit("d/shards/train/part-00000.bin", flip_byte)),
        code=3,
    ),
    Case(
        "verify-idx-truncated",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "part-00000.idx",
        then(copy_dir("pb"), edit("d/shards/train/part-00000.idx", _truncate_idx)),
        code=3,
    ),
    Case(
        "verify-tokenizer-changed",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "tokenizer.json",
        then(copy_dir("pb"), tokenizer_changed),
        code=3,
    ),
    Case(
        "verify-tokenizer-missing",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "tokenizer.json",
        then(copy_dir("pb"), lambda c, f: (c / "d" / "tokenizer.json").unlink()),
        code=3,
    ),
    Case(
        "verify-memorization-flipped",
        [*DP, "verify", "--data-dir", "{case}/d"],
        "train_x.npy",
        then(copy_dir("mem"), edit("d/train_x.npy", flip_byte)),
        code=3,
    ),
    # ---- data_prep import-megatron (fx/megatron: Megatron prefixes; fx/tokdir: a char tokenizer)
    Case(
        "imp-bin-missing",
        [*IMP, "{case}/m/d", *CHAR_TOK, "--out", "{case}/o"],
        "d.bin",
        then(copy_dir("megatron", "m"), lambda c, f: (c / "m" / "d.bin").unlink()),
        code=3,
    ),
    Case(
        "imp-idx-bad-header",
        [*IMP, "{case}/m/d", *CHAR_TOK, "--out", "{case}/o"],
        "{case}/m/d.idx",
        then(copy_dir("megatron", "m"), edit("m/d.idx", lambda b: b"XXIDIDX" + b[7:])),
        code=3,
    ),
    Case(
        "imp-pointers-past-bin",
        [*IMP, "{case}/m/d", *CHAR_TOK, "--out", "{case}/o"],
        "{case}/m/d.idx",
        then(copy_dir("megatron", "m"), edit("m/d.idx", _pointer_past_bin)),
        code=3,
    ),
    Case(
        "imp-tokenizer-too-small",
        [*IMP, "{fx}/megatron/wide", *CHAR_TOK, "--out", "{case}/o"],
        "{fx}/megatron/wide",
        code=3,
    ),
    Case(
        "imp-out-other-tokenizer",
        [*IMP, "{fx}/megatron/d", *CHAR_TOK, "--out", "{case}/d"],
        "{case}/d",
        copy_dir("pb"),
        code=3,
    ),
    Case(
        "imp-source-count",
        [*IMP, "{fx}/megatron/d", "--source", "a", "b", *CHAR_TOK, "--out", "{case}/o"],
        "--source",
        code=2,
    ),
    Case(
        "upgrade-index-not-a-data-dir",
        [*DP, "upgrade-index", "--data-dir", "{case}"],
        "{case}",
        code=3,
    ),
    # ---- data_prep synthetic
    Case("syn-no-task", SYN, "TASK", code=2),
    Case("syn-unknown-task", [*SYN, "phonebooks"], "phonebooks", code=2),
    Case("syn-missing-out", [*SYN, "phonebook", "--size", "10"], "--out", code=2),
    Case("syn-size-junk", [*PB, "--size", "lots"], "--size"),
    Case("syn-size-zero", [*PB, "--size", "0"], "size"),
    Case("syn-size-fraction", [*PB, "--size", "1.5"], "--size"),
    Case("syn-size-too-big", [*PB, "--size", "2e7"], "size"),
    Case("syn-seed-negative", [*PB, "--size", "10", "--seed", "-1"], "--seed"),
    Case("syn-num-test-too-big", [*PB, "--size", "10", "--num-test", "20"], "--num-test"),
    Case("syn-out-is-file", [*PB, "--size", "10"], "{case}/pb", file_at("pb")),
    Case("syn-sp-nodes", [*SP, "--size", "10", "--nodes", "1"], "nodes"),
    Case("syn-sp-edge-prob", [*SP, "--size", "10", "--edge-prob", "2"], "--edge-prob"),
    Case("syn-sp-edge-prob-junk", [*SP, "--size", "10", "--edge-prob", "p"], "--edge-prob"),
    Case("syn-mem-dim", [*MEM, "--size", "10", "--dim", "0"], "dim"),
    Case("syn-mem-seq-len", [*MEM, "--size", "10", "--seq-len", "-3"], "--seq-len"),
    # ---- pretrain
    Case("train-no-config", ["pretrain"], "--config", code=2),
    Case("train-config-missing", [*TRAIN], "train.yaml"),
    Case(
        "train-yaml-syntax",
        [*TRAIN],
        "train.yaml:3:1: invalid YAML",
        file_at("train.yaml", "max_steps: 3\nrun_dir: [a\n"),
    ),
    Case(
        "train-unknown-field",
        [*TRAIN, "optim.learning_rate=1"],
        "optim.learning_rate",
        train_yaml(),
    ),
    Case("train-max-steps-zero", [*TRAIN, "max_steps=0"], "max_steps", train_yaml()),
    Case("train-lr-junk", [*TRAIN, "optim.lr=fast"], "optim.lr", train_yaml()),
    Case("train-model-missing", [*TRAIN, "model={case}/m.yaml"], "m.yaml", train_yaml()),
    Case(
        "train-soft-moe",
        [*TRAIN, "model=configs/model/synth12_softmoe_d256_e8.yaml", "data.seq_len=32"],
        "causal",
        train_yaml(),
    ),
    Case(
        "train-non-causal-override",
        [*TRAIN, "model.causal=false"],
        "model.causal",
        train_yaml(),
    ),
    Case("train-seq-len", [*TRAIN, "data.seq_len=100000"], "data.seq_len", train_yaml()),
    Case(
        "train-spike-window",
        [*TRAIN, "spike.min_suspicious=9"],
        "spike.min_suspicious=9 > spike.window=8",
        train_yaml(),
    ),
    Case(
        "train-fault-past-end",
        [*TRAIN, "fault.spike_at_step=999"],
        "fault.spike_at_step",
        train_yaml(),
    ),
    Case("train-run-dir-is-file", [*TRAIN], "{case}/run", then(train_yaml(), file_at("run"))),
    Case(
        "train-ckpt-dir-is-file",
        [*TRAIN, "checkpoint.dir={case}/ck"],
        "{case}/ck",
        then(train_yaml(), file_at("ck")),
    ),
    Case(
        "train-data-dir-missing",
        [*TRAIN, "data.data_dir={case}/nodata"],
        "{case}/nodata",
        train_yaml(),
    ),
    Case(
        "train-data-garbled-manifest",
        [*TRAIN, "data.data_dir={case}/d"],
        "manifest.json",
        then(train_yaml(), copy_dir("data"), file_at("d/manifest.json", "{{{")),
        code=3,
    ),
    Case(
        "train-vocab-too-small",
        [*TRAIN, "model.vocab_size=100"],
        "model.vocab_size",
        train_yaml(),
    ),
    Case(
        "train-token-ids-above-vocab",
        [*TRAIN, "data.data_dir={case}/d", "model.vocab_size=100"],
        "model.vocab_size=100",
        then(
            train_yaml(),
            copy_dir("data"),
            manifest_edit("d/manifest.json", lambda m: m["tokenizer"].update(vocab_size=64)),
        ),
        code=3,
    ),
    Case(
        "train-idx-truncated",
        [*TRAIN, "data.data_dir={case}/d"],
        ".idx",
        then(
            train_yaml(),
            copy_dir("data"),
            edit("d/shards/alpha/train/u00000-0000.idx", _truncate_idx),
        ),
        code=3,
    ),
    Case(
        "train-tp-does-not-divide",
        [*TRAIN, "parallel.tensor_parallel=3"],
        "parallel.tensor_parallel",
        train_yaml(),
    ),
    Case(
        "train-global-batch", [*TRAIN, "batch.global_batch=7"], "batch.global_batch", train_yaml()
    ),
    Case("train-override-into-scalar", [*TRAIN, "max_steps.x=1"], "max_steps", train_yaml()),
    Case("train-bad-flag", [*TRAIN, "--resume"], "--resume", train_yaml(), code=2),
    # ---- pretrain.model_info
    Case("info-no-config", MI, "configs", code=2),
    Case("info-missing", [*MI, "{case}/m.yaml"], "m.yaml"),
    Case("info-seq-len-zero", [*MI, TINY_MODEL, "--seq-len", "0"], "--seq-len"),
    Case("info-seq-len-negative", [*MI, TINY_MODEL, "--seq-len", "-5"], "--seq-len"),
    Case("info-bad-set", [*MI, TINY_MODEL, "--set", "d_modle=64"], "d_modle"),
    Case("info-set-no-equals", [*MI, TINY_MODEL, "--set", "d_model"], "d_model"),
    Case("info-bad-value", [*MI, TINY_MODEL, "--set", "n_heads=3"], "n_heads"),
    Case(
        "info-data-config",
        [*MI, "configs/data/tiny.yaml"],
        "configs/data/tiny.yaml is not a model config",
        code=2,
    ),
    Case(
        "info-train-config-model-missing",
        [*MI, "{case}/t.yaml"],
        "nope.yaml",
        file_at("t.yaml", "model: nope.yaml\nmax_steps: 1\n"),
        code=2,
    ),
    # ---- pretrain.memorization
    Case(
        "memo-data-missing",
        [*MEMO[:2], "{case}/none", *MEMO[3:], "--model", TINY_MODEL],
        "{case}/none",
    ),
    Case("memo-model-missing", [*MEMO, "--model", "{case}/m.yaml"], "m.yaml"),
    Case("memo-steps-zero", [*MEMO, "--model", TINY_MODEL, "--steps", "0"], "--steps"),
    Case("memo-out-is-file", [*MEMO, "--model", TINY_MODEL], "{case}/run", file_at("run")),
    Case(
        "memo-wrong-task",
        [*MEMO[:2], "{fx}/pb", *MEMO[3:], "--model", TINY_MODEL],
        "{fx}/pb",
    ),
    Case("memo-cuda", [*MEMO, "--model", TINY_MODEL, "--device", "cuda"], "cuda", env=NO_CUDA),
    # ---- pretrain.model.hf_export
    Case(
        "hf-config-missing",
        [
            "pretrain.model.hf_export",
            "--config",
            "{case}/m.yaml",
            "--weights",
            "{case}/w.pt",
            "--out",
            "{case}/hf",
        ],
        "m.yaml",
    ),
    Case("hf-weights-missing", [*HF, "--weights", "{case}/w.pt", "--out", "{case}/hf"], "w.pt"),
    Case(
        "hf-out-is-file",
        [*HF, "--weights", "{case}/w.pt", "--out", "{case}/hf"],
        "{case}/hf",
        then(file_at("w.pt", b"x"), file_at("hf")),
    ),
    Case(
        "hf-soft-moe",
        [
            "pretrain.model.hf_export",
            "--config",
            "configs/model/synth12_softmoe_d256_e8.yaml",
            "--weights",
            "{case}/w.pt",
            "--out",
            "{case}/hf",
        ],
        "soft_moe",
        file_at("w.pt", b"x"),
    ),
    # ---- eval
    Case("eval-no-args", ["eval"], "--checkpoint", code=2),
    Case("eval-checkpoint-missing", [*EVAL, "{case}/run", "--suite", "ppl"], "{case}/run"),
    Case("eval-unknown-suite", [*EVAL, "{case}", "--suite", "trivia"], "trivia"),
    Case("eval-limit-zero", [*EVAL, "{case}", "--suite", "ppl", "--limit", "0"], "--limit"),
    Case(
        "eval-batch-size-zero",
        [*EVAL, "{case}", "--suite", "ppl", "--batch-size", "0"],
        "--batch-size",
    ),
    Case(
        "eval-cuda-missing",
        [*EVAL, "{case}", "--suite", "ppl", "--device", "cuda"],
        "cuda",
        env=NO_CUDA,
    ),
    Case("eval-bad-device", [*EVAL, "{case}", "--suite", "ppl", "--device", "tpu"], "tpu"),
    Case(
        "eval-not-a-run",
        [*EVAL, "{case}/r", "--suite", "ppl"],
        "{case}/r",
        file_at("r/notes.txt", "hi"),
    ),
    Case(
        "eval-data-dir-missing",
        [*EVAL, "{case}", "--suite", "ppl", "--data-dir", "{case}/nd"],
        "{case}/nd",
    ),
    # ---- eval.export
    Case("export-no-args", ["eval.export"], "--checkpoint", code=2),
    Case(
        "export-out-is-file",
        ["eval.export", "--checkpoint", "{case}/run", "--out", "{case}/hf"],
        "{case}/hf",
        file_at("hf"),
    ),
    Case(
        "export-checkpoint-missing",
        ["eval.export", "--checkpoint", "{case}/run", "--out", "{case}/hf"],
        "{case}/run",
    ),
    # ---- eval.report
    Case("report-no-args", ["eval.report"], "paths", code=2),
    Case(
        "report-missing-path", ["eval.report", "{case}/runs", "--out", "{case}/rep"], "{case}/runs"
    ),
    Case(
        "report-out-is-file",
        ["eval.report", "{case}/runs", "--out", "{case}/rep"],
        "{case}/rep",
        then(results_dir, file_at("rep")),
    ),
    Case(
        "report-garbled-results",
        ["eval.report", "{case}/runs", "--out", "{case}/rep"],
        "results.json",
        results_dir,
    ),
    Case(
        "report-threshold",
        ["eval.report", "{case}/runs", "--out", "{case}/rep", "--threshold", "2"],
        "--threshold",
        results_dir,
    ),
    # ---- slurm.grid (one stage of a grid) and pretrain.doctor
    Case("grid-no-stage", ["slurm.grid", "g.yaml"], "--stage", code=2),
    Case("grid-unknown-stage", ["slurm.grid", "g.yaml", "--stage", "train"], "train", code=2),
    Case("grid-missing-file", ["slurm.grid", "{case}/g.yaml", "--stage", "report"], "g.yaml"),
    Case("doctor-unknown-flag", ["pretrain.doctor", "--gpus", "8"], "--gpus", code=2),
    Case("doctor-missing-config", ["pretrain.doctor", "--config", "{case}/t.yaml"], "t.yaml"),
    # ---- slurm.submit (validated before any sbatch; --dry-run submits nothing)
    Case("submit-no-command", ["slurm.submit"], "COMMAND", code=2),
    Case(
        "submit-data-missing-config",
        [*SUB, "data", "{case}/d.yaml"],
        "d.yaml",
    ),
    Case(
        "submit-data-invalid-config",
        [*SUB, "data", "{case}/data.yaml", "workers=0"],
        "workers",
        good_data_cfg,
    ),
    Case(
        "submit-data-tasks-zero",
        [*SUB, "data", "{case}/data.yaml", "--tasks", "0"],
        "--tasks",
        good_data_cfg,
    ),
    Case(
        "submit-sweep-model-missing",
        [*SUB, "sweep", "{case}/train.yaml", "--models", "{case}/m.yaml"],
        "m.yaml",
        train_yaml(),
    ),
    Case(
        "submit-sweep-override-after-models",
        [*SUB, "sweep", "{case}/train.yaml", "--models", TINY_MODEL, "max_steps=0"],
        "max_steps",
        train_yaml(),
    ),
    Case(
        "submit-eval-missing-run",
        [*SUB, "eval", "{case}/run"],
        "{case}/run",
    ),
    Case("submit-eval-bad-suite", [*SUB, "eval", "{case}", "--suite", "trivia"], "trivia"),
    # ---- demo
    Case("demo-out-is-file", ["demo", "--out", "{case}/demo"], "{case}/demo", file_at("demo")),
    Case("demo-docs-zero", ["demo", "--out", "{case}/demo", "--docs", "0"], "--docs"),
]


# ---------------------------------------------------------------- shared fixtures


def _build_fixtures(fx: Path) -> None:
    """Everything the cases copy or point at: built in-process, once, in a few seconds."""
    import zstandard

    from data_prep.config import DataPrepConfig
    from data_prep.synthetic.cli import main as synthetic_main
    from data_prep.tokenizer import char_tokenizer
    from mop.config import save_resolved
    from tests.pretrain.conftest import make_data_dir

    raw = fx / "raw"
    raw.mkdir(parents=True)
    rows = [{"text": f"document {i} about the cat and the {i % 7} dogs " * 3} for i in range(400)]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (raw / "good.jsonl").write_bytes(lines)
    import gzip

    (raw / "good.jsonl.gz").write_bytes(gzip.compress(lines))
    # Many small blocks: each flush ends a block, so a cut after the first one is a clean
    # block boundary in an unfinished frame.
    cctx = zstandard.ZstdCompressor(level=3)
    buf = __import__("io").BytesIO()
    writer = cctx.stream_writer(buf, closefd=False)
    writer.write(lines[: len(lines) // 3])
    writer.flush(zstandard.FLUSH_BLOCK)
    first_block_end = buf.tell()
    writer.write(lines[len(lines) // 3 :])
    writer.flush(zstandard.FLUSH_FRAME)
    (raw / "good.jsonl.zst").write_bytes(buf.getvalue())
    (raw / "zst_blocks.json").write_text(json.dumps({"first_block_end": first_block_end}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), raw / "good.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), raw / "empty.parquet")

    # The state after a `tokenizer` stage (a char tokenizer: training BPE costs seconds).
    cfg = DataPrepConfig.model_validate(_data_cfg(fx / "tokcase", str(raw / "good.jsonl")))
    char_tokenizer(string.printable).save(fx / "tokdir")
    save_resolved(cfg, fx / "tokdir" / "config.yaml")

    assert (
        synthetic_main(["phonebook", "--out", str(fx / "pb"), "--size", "200", "--num-test", "20"])
        == 0
    )
    assert synthetic_main(["memorization", "--out", str(fx / "mem"), "--size", "16"]) == 0
    make_data_dir(fx / "data")
    # Megatron prefixes (our ShardWriter writes megatron-core's bytes: test_megatron_format.py)
    from data_prep.shards import ShardWriter

    for name, top in (("d", 90), ("wide", 300)):  # the char tokenizer has ~100 ids
        w = ShardWriter(fx / "megatron" / name, np.uint16)
        for i in range(40):
            w.add((np.arange(5 + i % 7) * 7 + i) % top + 2)
        w.finish()


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
    return out


@dataclass
class Outcome:
    case_dir: Path
    returncode: int
    stderr: str
    seconds: float
    before: dict[str, str]
    after: dict[str, str]
    fx_before: dict[str, str]


def _env(extra: dict[str, str], home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),
        PATH=os.environ.get("PATH", ""),
        **extra,
    )
    return env


def _fill(text: str, case_dir: Path, fx: Path) -> str:
    return text.replace("{case}", str(case_dir)).replace("{fx}", str(fx))


def _run_case(case: Case, root: Path, fx: Path) -> Outcome:
    case_dir = root / case.id
    case_dir.mkdir()
    if case.setup is not None:
        case.setup(case_dir, fx)
    before = _snapshot(case_dir)
    argv = [_fill(a, case_dir, fx) for a in case.argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env=_env(case.env, root / "hf_home"),
            capture_output=True,
            text=True,
            timeout=90,  # a bad input that is not refused would run on: a failure, not a hang
            stdin=subprocess.DEVNULL,
        )
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stderr = 0, f"accepted: still running after {exc.timeout} s\n{exc.stderr or ''}"
    seconds = time.perf_counter() - t0
    return Outcome(case_dir, code, stderr, seconds, before, _snapshot(case_dir), {})


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Run every selected case once, in parallel subprocesses."""
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "module", None) is sys.modules[__name__]
        and "case" in getattr(getattr(item, "callspec", None), "params", {})
    }
    root = tmp_path_factory.mktemp("bad_inputs")
    fx = root / "fixtures"
    _build_fixtures(fx)
    fx_before = _snapshot(fx)
    todo = [c for c in CASES if c.id in selected]
    workers = min(8, max(2, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(workers) as pool:
        results = dict(zip((c.id for c in todo), pool.map(lambda c: _run_case(c, root, fx), todo)))
    for r in results.values():
        r.fx_before = fx_before
    timing = sorted(((r.seconds, k) for k, r in results.items()), reverse=True)[:5]
    print("slowest bad-input cases:", ", ".join(f"{k} {s:.1f}s" for s, k in timing))
    assert _snapshot(fx) == fx_before, "a case changed the shared fixtures"
    return results


def test_enough_cases() -> None:
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    modules = {c.argv[0] for c in CASES}
    for entry in (
        "data_prep",
        "pretrain",
        "pretrain.model_info",
        "pretrain.memorization",
        "pretrain.model.hf_export",
        "eval",
        "eval.export",
        "eval.report",
        "slurm.submit",
        "demo",
    ):
        assert entry in modules, f"no bad input for python -m {entry}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, Outcome]) -> None:
    out = outcomes[case.id]
    shown = f"exit {out.returncode}, stderr:\n{out.stderr[-3000:]}"
    assert out.returncode != 0, shown
    if case.code is not None:
        assert out.returncode == case.code, shown
    assert "Traceback" not in out.stderr, shown
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, shown
    case_dir = out.case_dir
    fx = case_dir.parent / "fixtures"
    assert _fill(case.culprit, case_dir, fx) in errors[0], shown
    assert out.after == out.before, f"the failed command left output behind: {shown}"


@pytest.mark.parametrize(
    "module",
    ["data_prep", "pretrain", "pretrain.model_info", "pretrain.memorization", "pretrain.model.hf_export", "eval", "eval.report",
     "eval.export", "slurm.submit", "pretrain.doctor"],
)  # fmt: skip
def test_entry_point_imports_no_torch_before_checking_its_input(module: str) -> None:
    # A bad flag or path is reported before torch (seconds to import) is loaded: the entry
    # point module itself must not import torch or DeepSpeed at module level.
    code = (
        f"import sys, importlib; importlib.import_module({module!r} if {module!r}.count('.') "
        f"else {module!r} + '.__main__'); "
        "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"python -m {module} imports {out.stdout.strip()} at load"
