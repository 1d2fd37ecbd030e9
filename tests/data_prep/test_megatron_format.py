"""Our shards against megatron-core's own indexed-dataset code, in both directions.

megatron-core (pinned in requirements.txt, CPU-installable) is the peer: its
IndexedDatasetBuilder writes datasets that we import and train on, and its IndexedDataset
reads what we write, token for token. Damaged Megatron files are refused in one line, and a
directory in the layout of before 2026-12 is refused until `upgrade-index` rewrites it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_prep import megatron_import
from data_prep.manifest import MANIFEST, load_manifest
from data_prep.merge import merge
from data_prep.pipeline import run_tokenize_task, run_tokenizer_stage
from data_prep.shards import HEADER, ShardReader, ShardWriter, read_index, shard_file
from data_prep.tokenizer import char_tokenizer
from data_prep.verify import verify_data_dir
from mop.errors import DataError
from mop.fileio import atomic_write_json, read_json, sha256_file
from tests.data_prep.test_pipeline import make_cfg, raw  # noqa: F401 - module fixture

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

REPO = Path(__file__).resolve().parents[2]
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"


def megatron_write(prefix: Path, docs: list[list[np.ndarray]], dtype) -> None:
    """A dataset as Megatron's preprocess_data.py writes it: each document one or more
    sequences (sentences with --split-sentences)."""
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        for sentence in doc:
            b.add_item(torch.from_numpy(np.asarray(sentence, dtype=np.int64)))
        b.end_document()
    b.finalize(f"{prefix}.idx")


def random_docs(rng, n: int, vocab: int, eos: int, sentences: int = 1) -> list[list[np.ndarray]]:
    docs = []
    for _ in range(n):
        parts = [rng.integers(2, vocab, int(rng.integers(3, 40))) for _ in range(sentences)]
        parts[-1] = np.append(parts[-1], eos)  # --append-eod
        docs.append(parts)
    return docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_our_writer_writes_megatron_builders_bytes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [d[0] for d in random_docs(rng, 60, 60000, 1)]
    megatron_write(tmp_path / "theirs", [[d] for d in docs], dtype)
    w = ShardWriter(tmp_path / "ours", dtype)
    for d in docs[:20]:
        w.add(d)
    w.add_batch(np.concatenate(docs[20:]), np.array([len(d) for d in docs[20:]]))
    rec = w.finish()
    for suffix in (".bin", ".idx"):
        theirs = (tmp_path / f"theirs{suffix}").read_bytes()
        assert (tmp_path / f"ours{suffix}").read_bytes() == theirs, suffix
    assert rec["idx_sha256"] == sha256_file(tmp_path / "ours.idx")
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs) and ds.index.dtype == dtype
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)


def test_uint32_is_refused_int32_is_the_wide_dtype(tmp_path):
    from data_prep.tokenizer import dtype_for_vocab

    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.int32
    with pytest.raises(ValueError, match="int32"):
        ShardWriter(tmp_path / "x", np.uint32)


@pytest.fixture(scope="module")
def tokenized(raw, tmp_path_factory) -> Path:  # noqa: F811 - the module fixture
    out = tmp_path_factory.mktemp("tok")
    cfg = make_cfg(raw, out)
    run_tokenizer_stage(cfg)
    run_tokenize_task(cfg)
    merge(cfg)
    return out


def test_megatron_reads_every_shard_of_a_tokenize_run(tokenized):
    manifest = load_manifest(tokenized)
    records = [*manifest["shards"], manifest["validation"]]
    for rec in records:
        ours = ShardReader(tokenized / rec["path"], rec["dtype"])
        ds = IndexedDataset(str(tokenized / rec["path"]))
        assert len(ds) == len(ours) == rec["documents"]
        got = np.concatenate([ds[i] for i in range(len(ds))])
        assert np.array_equal(got, np.asarray(ours.tokens)), rec["path"]
        assert ds.document_indices.tolist() == list(range(len(ds) + 1))
        tok_eos = manifest["tokenizer"]["eos_id"]
        if rec.get("split") == "train":
            assert all(int(ds[i][-1]) == tok_eos for i in range(len(ds)))


def _tokenizer(tmp_path: Path) -> tuple[Path, int, int]:
    tok = char_tokenizer(ALPHABET)
    path = tok.save(tmp_path / "tok")
    return path, tok.vocab_size, tok.eos_id


def _import_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", "import-megatron", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_import_megatron_then_train_three_steps(tmp_path):
    from tests.pretrain.runs import metrics, run_pretrain

    tok_path, vocab, eos = _tokenizer(tmp_path)
    rng = np.random.default_rng(1)
    src = tmp_path / "megatron"
    src.mkdir()
    web = random_docs(rng, 120, vocab, eos)
    book = random_docs(rng, 80, vocab, eos, sentences=3)  # --split-sentences
    megatron_write(src / "web_text_document", web, np.uint16)
    megatron_write(src / "book_text_document", book, np.int32)
    out = tmp_path / "imported"
    res = _import_cli(
        "--prefix", str(src / "web_text_document"), str(src / "book_text_document"),
        "--source", "web", "book", "--tokenizer", str(tok_path), "--out", str(out),
        "--validation-sequences", "4", "--validation-seq-len", "16",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "hard-linked" in res.stdout
    manifest = load_manifest(out)
    assert verify_data_dir(out) == 4  # two train shards, validation, tokenizer
    for label, docs, name in (("web", web, "web"), ("book", book, "book")):
        entry = manifest["sources"][label]
        rec = next(r for r in manifest["shards"] if r["source"] == label)
        theirs = src / f"{name}_text_document.bin"
        ours = shard_file(out / rec["path"], ".bin")
        assert os.stat(ours).st_ino == os.stat(theirs).st_ino  # a hard link, not a copy
        assert entry["imported"]["link"] == "hard"
        assert rec["sha256"] == sha256_file(theirs)
        k = entry["train_documents"]
        assert 0 < k < len(docs) and entry["val_documents"] == len(docs) - k
        reader = ShardReader(out / rec["path"], rec["dtype"])
        train = np.concatenate([np.concatenate(d) for d in docs[:k]])
        assert np.array_equal(np.asarray(reader.tokens), train)  # held-out tail not trained on
        assert rec["max_token_id"] == int(train.max())
        for i in (0, k - 1):
            assert np.array_equal(reader.document(i), np.concatenate(docs[i]))
        ds = IndexedDataset(str(out / rec["path"]))  # and Megatron reads the imported shard
        assert len(ds) == sum(len(d) for d in docs[:k])
    v = manifest["validation"]
    assert v["num_sequences"] == 4 and v["seq_len"] == 16
    assert sorted(v["per_source"]) == ["book", "web"]
    plan = read_json(out / "mixture_plan.json")["sources"]
    assert plan["web"]["available_tokens"] == manifest["sources"]["web"]["train_tokens"]
    assert abs(sum(p["share"] for p in plan.values()) - 1) < 1e-9

    # the same command again gives the same bytes
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    res = _import_cli(
        "--prefix", str(src / "web_text_document"), str(src / "book_text_document"),
        "--source", "web", "book", "--tokenizer", str(tok_path), "--out", str(out),
        "--validation-sequences", "4", "--validation-seq-len", "16",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    run = tmp_path / "run"
    run_pretrain(
        [
            f"data.data_dir={out}", f"run_dir={run}", f"model.vocab_size={vocab}",
            "data.seq_len=16", "max_steps=3", "schedule.warmup_steps=1", "checkpoint.interval=3",
            "eval.interval=3",
            "logging.wandb_mode=disabled",
        ],
        nproc=1,
    )  # fmt: skip
    m = metrics(run)
    assert sorted(s for s in m if s > 0)[-1] == 3
    assert np.isfinite(m[3]["loss"]) and "val_loss" in m[3]
    assert {k.split("/")[1] for k in m[3] if k.startswith("expert_load_by_source/")} == {
        "book",
        "web",
    }


def test_symlink_when_no_hard_link_and_the_source_moves(tmp_path, monkeypatch):
    tok_path, vocab, eos = _tokenizer(tmp_path)
    megatron_write(tmp_path / "c", random_docs(np.random.default_rng(2), 30, vocab, eos), np.uint16)

    def no_link(*_a):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(megatron_import.os, "link", no_link)
    out = tmp_path / "out"
    renamed = shutil.copy(tok_path, tmp_path / "my_tokenizer.json")  # saved as tokenizer.json
    m = megatron_import.import_megatron(  # the .bin named instead of the prefix: the same
        [str(tmp_path / "c.bin")], str(renamed), str(out), validation_sequences=0
    )
    assert verify_data_dir(out) == 3  # shard, (empty) validation, tokenizer
    assert m["tokenizer"]["file"] == "tokenizer.json"
    rec = m["shards"][0]
    assert m["sources"]["c"]["imported"]["link"] == "symlink"
    assert os.readlink(shard_file(out / rec["path"], ".bin")) == str(tmp_path / "c.bin")
    assert rec["tokens"] == ShardReader(tmp_path / "c").num_tokens  # nothing held out
    os.rename(tmp_path / "c.bin", tmp_path / "moved.bin")
    with pytest.raises(DataError, match="which has moved or is gone"):
        ShardReader(out / rec["path"], rec["dtype"])


def _damage(path: Path, at: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how, message",
    [
        ("header", "bad header"),
        ("version", "version 7"),
        ("truncated", "is damaged"),
        ("pointer_past_end", "past the end of its .bin"),
        ("pointer_gap", "back to back"),
        ("bin_truncated", "truncated or mismatched"),
    ],
)
def test_damaged_megatron_index_refused_in_one_line(tmp_path, how, message):
    tok_path, vocab, eos = _tokenizer(tmp_path)
    prefix = tmp_path / "d"
    megatron_write(prefix, random_docs(np.random.default_rng(3), 20, vocab, eos), np.uint16)
    idx = tmp_path / "d.idx"
    n = read_index(idx).num_sequences
    pointers_at = HEADER.size + 4 * n  # the i32 lengths precede the i64 pointers
    if how == "header":
        _damage(idx, 0, b"XXIDIDX")
    elif how == "version":
        _damage(idx, 9, (7).to_bytes(8, "little"))
    elif how == "truncated":
        idx.write_bytes(idx.read_bytes()[:-8])
    elif how == "pointer_past_end":
        _damage(idx, pointers_at + 8 * 5, (10**9).to_bytes(8, "little"))
    elif how == "pointer_gap":
        _damage(idx, pointers_at + 8 * 5, (read_index(idx).sequence_pointers[5] + 2).tobytes())
    else:
        (tmp_path / "d.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-10])
    res = _import_cli(
        "--prefix", str(prefix), "--tokenizer", str(tok_path), "--out", str(tmp_path / "o")
    )  # fmt: skip
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 3 and len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr and message in errors[0], errors
    assert str(idx) in errors[0] or str(prefix) in errors[0]
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def _make_legacy(data_dir: Path) -> None:
    """Rewrite a directory's indexes in the layout of before 2026-12 (.npy document offsets)
    and its records' idx_sha256, as that version left them."""
    docs = [data_dir / MANIFEST, *sorted((data_dir / "parts").rglob("*.json"))]
    shas = {}
    for path in docs:
        doc = read_json(path)
        recs = list(doc["shards"]) + ([doc["validation"]] if "validation" in doc else [])
        for rec in recs:
            if rec["path"] not in shas:
                reader = ShardReader(data_dir / rec["path"])
                offsets = np.asarray(reader.offsets, dtype=np.int64)
                idx = shard_file(data_dir / rec["path"], ".idx")
                with open(idx, "wb") as fh:
                    np.save(fh, offsets)
                shas[rec["path"]] = sha256_file(idx)
            rec["idx_sha256"] = shas[rec["path"]]
        atomic_write_json(path, doc)


def test_legacy_directory_refused_then_upgraded(tokenized, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(tokenized, legacy)
    _make_legacy(legacy)
    for argv in (
        ["data_prep", "verify", "--data-dir", str(legacy)],
        ["pretrain", "--config", "configs/train/tiny_cpu.yaml", f"data.data_dir={legacy}",
         "model.vocab_size=400", f"run_dir={tmp_path / 'run'}"],
    ):  # fmt: skip
        res = subprocess.run(
            [sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 3 and len(errors) == 1, res.stderr
        assert f"python -m data_prep upgrade-index --data-dir {legacy}" in errors[0]
    bins = {p: p.read_bytes() for p in legacy.rglob("*.bin")}
    res = subprocess.run(
        [sys.executable, "-m", "data_prep", "upgrade-index", "--data-dir", str(legacy)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    n = len(list(legacy.rglob("*.idx")))
    assert f"{n} index(es) rewritten" in res.stdout
    assert {p: p.read_bytes() for p in legacy.rglob("*.bin")} == bins  # .bin untouched
    for p in tokenized.rglob("*"):  # byte for byte what the current version writes
        if p.is_file() and (p.suffix in (".idx", ".bin") or p.name == MANIFEST):
            assert (legacy / p.relative_to(tokenized)).read_bytes() == p.read_bytes(), p
    for p in (tokenized / "parts").rglob("*.json"):
        assert read_json(legacy / p.relative_to(tokenized)) == read_json(p)
    verify_data_dir(legacy)
    from data_prep.upgrade import upgrade_data_dir

    assert upgrade_data_dir(legacy) == (0, n)  # a second run finds nothing to do


def test_interrupted_upgrade_is_finished_by_a_rerun(tokenized, tmp_path):
    from data_prep.upgrade import upgrade_data_dir

    legacy = tmp_path / "legacy"
    shutil.copytree(tokenized, legacy)
    _make_legacy(legacy)
    manifest = json.loads((legacy / MANIFEST).read_text())
    first = manifest["shards"][0]
    # killed after the first index was rewritten, before any record was updated
    from data_prep.shards import upgrade_legacy_index

    upgrade_legacy_index(legacy / first["path"], first)
    assert (legacy / MANIFEST).read_text() == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    rewritten, current = upgrade_data_dir(legacy)
    assert current == 1 and rewritten == len(list(legacy.rglob("*.idx"))) - 1
    verify_data_dir(legacy)


def test_shard_size_check_of_an_imported_source(tmp_path):
    """check_shard_size (O(1), for pretrain.doctor --fast): an imported shard's .bin holds its
    held-out tail too, so the size check reads the index, not bytes / itemsize."""
    from data_prep.shards import check_shard_size

    tok_path, vocab, eos = _tokenizer(tmp_path)
    megatron_write(tmp_path / "c", random_docs(np.random.default_rng(4), 60, vocab, eos), np.int32)
    m = megatron_import.import_megatron(
        [str(tmp_path / "c")], str(tok_path), str(tmp_path / "out"), validation_sequences=2,
        validation_seq_len=8,
    )  # fmt: skip
    rec = m["shards"][0]
    stem = tmp_path / "out" / rec["path"]
    assert os.path.getsize(shard_file(stem, ".bin")) > rec["tokens"] * 4  # the tail is there
    assert rec["dtype"] == "int32" != m["tokenizer"]["dtype"]  # Megatron's dtype, not ours
    check_shard_size(stem, rec)
    with pytest.raises(DataError, match="manifest says"):
        check_shard_size(stem, {**rec, "tokens": rec["tokens"] + 1})
