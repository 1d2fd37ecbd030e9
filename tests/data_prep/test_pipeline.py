"""End-to-end data preparation on tiny local files in the real hub schemas."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_prep.config import DataPrepConfig
from data_prep.manifest import load_manifest
from data_prep.merge import merge
from data_prep.pipeline import (
    array_task_from_env,
    list_work,
    run_tokenize_task,
    run_tokenizer_stage,
    split_work,
)
from data_prep.shards import ShardReader
from data_prep.tokenizer import load_tokenizer_dir
from demo import samples as fixtures
from mop.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("raw")
    fw = d / "fineweb"
    fw.mkdir()
    for i in range(3):  # three files -> three units
        fixtures.write_fineweb_parquet(fw, n_docs=40, seed=i, name=f"part-{i}.parquet")
    return {
        "fineweb": fw,
        "proofpile": fixtures.write_proof_pile_jsonl_zst(d, n_docs=30, seed=7),
        "metamath": fixtures.write_metamathqa_json_array(d, n_docs=30, seed=8),
        "bad": fixtures.write_bad_rows_jsonl(d),
    }


def make_cfg(raw: dict[str, Path], out: Path, **extra) -> DataPrepConfig:
    data = {
        "output_dir": str(out),
        "sources": [
            {"source": "fineweb_edu", "weight": 0.6, "data_files": str(raw["fineweb"])},
            {"source": "proof_pile_2_arxiv", "weight": 0.3, "data_files": str(raw["proofpile"])},
            {"source": "metamathqa", "weight": 0.1, "data_files": str(raw["metamath"])},
        ],
        "tokenizer": {"kind": "bpe", "vocab_size": 400, "sample_documents": 60},
        "shards": {"max_tokens": 3000, "encode_batch_documents": 7},
        "mixture": {"total_tokens": 20000},
        "validation": {"fraction": 0.1, "num_sequences": 6, "seq_len": 32},
    }
    for key, value in extra.items():
        data[key] = value
    return DataPrepConfig.model_validate(data)


def data_files(out: Path) -> dict[str, bytes]:
    """Everything that is data (not logs or the config that names the directory)."""
    keep = ("shards", "parts", "validation")
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and (
            rel.parts[0] in keep or rel.name in {"manifest.json", "mixture_plan.json"}
        ):
            files[str(rel)] = p.read_bytes()
    return files


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory) -> Path:
    """One uninterrupted single-task run; other tests compare against its bytes."""
    out = tmp_path_factory.mktemp("ref")
    cfg = make_cfg(raw, out)
    run_tokenizer_stage(cfg)
    run_tokenize_task(cfg)
    merge(cfg)
    return out


def test_end_to_end_manifest_and_shards(reference, raw):
    manifest = load_manifest(reference)
    tok = load_tokenizer_dir(reference)
    assert manifest["tokenizer"]["sha256"] == tok.hash
    assert tok.token_dtype == np.uint16
    assert set(manifest["sources"]) == {"fineweb_edu", "proof_pile_2_arxiv", "metamathqa"}
    assert manifest["sources"]["fineweb_edu"]["units"] == 3
    for label, entry in manifest["sources"].items():
        shards = [s for s in manifest["shards"] if s["source"] == label and s["split"] == "train"]
        assert entry["train_tokens"] == sum(s["tokens"] for s in shards) > 0
        for rec in shards:
            reader = ShardReader(reference / rec["path"], rec["dtype"])
            assert len(reader) == rec["documents"] and reader.num_tokens == rec["tokens"]
            # every document ends with exactly one EOS and holds no other
            doc = reader.document(0)
            assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
    # shards are capped near max_tokens (a shard closes once it reaches the cap)
    assert max(s["tokens"] for s in manifest["shards"]) < 3000 + 2000
    assert sum(s["split"] == "train" for s in manifest["shards"]) > 3


def test_documents_round_trip_to_rendered_text(reference, raw):
    from data_prep.loading import Document, open_source

    cfg = make_cfg(raw, reference)
    tok = load_tokenizer_dir(reference)
    manifest = load_manifest(reference)
    src = cfg.sources[2]  # metamathqa: one unit
    docs = [d.text for d in open_source(src).iter_unit(0) if isinstance(d, Document)]
    stored = []
    for rec in manifest["shards"]:
        if rec["source"] == "metamathqa":
            reader = ShardReader(reference / rec["path"], rec["dtype"])
            stored += [tok.decode(reader.document(i)[:-1]) for i in range(len(reader))]
    train_and_val = sorted(stored)
    assert train_and_val == sorted(docs)


def test_validation_is_held_out_and_sized(reference):
    manifest = load_manifest(reference)
    val = manifest["validation"]
    assert val["num_sequences"] == 6 and val["seq_len"] == 32
    reader = ShardReader(reference / val["path"], val["dtype"])
    assert len(reader) == 6 and all(len(reader.document(i)) == 32 for i in range(6))
    train_docs = {s["path"] for s in manifest["shards"] if s["split"] == "train"}
    val_docs = {s["path"] for s in manifest["shards"] if s["split"] == "val"}
    assert train_docs and val_docs and not train_docs & val_docs
    assert sum(val["per_source"].values()) == 6


def test_mixture_plan(reference):
    plan = json.loads((reference / "mixture_plan.json").read_text())
    assert plan["total_tokens"] == 20000
    shares = {k: v["share"] for k, v in plan["sources"].items()}
    assert shares == pytest.approx(
        {"fineweb_edu": 0.6, "proof_pile_2_arxiv": 0.3, "metamathqa": 0.1}
    )
    assert sum(v["planned_tokens"] for v in plan["sources"].values()) == pytest.approx(20000, abs=2)
    for v in plan["sources"].values():
        assert v["epochs"] == pytest.approx(v["planned_tokens"] / v["available_tokens"])


def test_short_source_repeated_with_warning(raw, tmp_path):
    from data_prep.mixture import plan_mixture

    cfg = make_cfg(raw, tmp_path)
    with pytest.warns(UserWarning, match="repeated"):
        plan = plan_mixture(
            cfg, {"fineweb_edu": 100, "proof_pile_2_arxiv": 10**9, "metamathqa": 10**9}
        )
    assert plan["sources"]["fineweb_edu"]["epochs"] == pytest.approx(12000 / 100)


def test_rerun_skips_finished_units(reference, raw, capsys):
    cfg = make_cfg(raw, reference)
    before = data_files(reference)
    summary = run_tokenize_task(cfg)
    assert summary["units_already_done"] == summary["units"] == 5
    assert summary["tokens_this_run"] == 0
    assert data_files(reference) == before


def test_array_split_plus_merge_equals_single_task(reference, raw, tmp_path):
    cfg = make_cfg(raw, tmp_path)
    run_tokenizer_stage(
        cfg.model_copy(
            update={
                "tokenizer": cfg.tokenizer.model_copy(
                    update={"kind": "pretrained", "path": str(reference / "tokenizer.json")}
                )
            }
        )
    )
    for i in range(3):
        run_tokenize_task(cfg, task_index=i, num_tasks=3)
    with pytest.raises(DataError, match="not finished"):
        # a fresh directory where one task never ran cannot be merged
        other = make_cfg(raw, tmp_path / "partial")
        run_tokenizer_stage(
            other.model_copy(
                update={
                    "tokenizer": cfg.tokenizer.model_copy(
                        update={"kind": "pretrained", "path": str(reference / "tokenizer.json")}
                    )
                }
            )
        )
        run_tokenize_task(other, task_index=0, num_tasks=3)
        merge(other)
    merge(cfg)
    assert data_files(tmp_path) == data_files(reference)


def test_split_work_is_a_partition(raw, tmp_path):
    items = list_work(make_cfg(raw, tmp_path))
    parts = [split_work(items, i, 4) for i in range(4)]
    flat = sorted((w.label, w.unit) for p in parts for w in p)
    assert flat == sorted((w.label, w.unit) for w in items) and len(flat) == 5
    with pytest.raises(ConfigError):
        split_work(items, 4, 4)


def test_slurm_array_env(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert array_task_from_env() == (4, 8)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert array_task_from_env() == (0, 1)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from data_prep import shards
    n = int(os.environ["KILL_AFTER_ADDS"])
    real_add = shards.ShardWriter.add_batch
    calls = [0]
    def add_batch(self, flat, lengths):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of a shard
        return real_add(self, flat, lengths)
    shards.ShardWriter.add_batch = add_batch
    from data_prep.__main__ import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _write_yaml(cfg: DataPrepConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_kill_9_and_rerun_gives_identical_output(reference, raw, tmp_path):
    out = tmp_path / "out"
    cfg = make_cfg(raw, out)
    cfg_path = _write_yaml(cfg, tmp_path / "cfg.yaml")
    tok_override = (
        f"tokenizer.kind=pretrained tokenizer.path={reference / 'tokenizer.json'}".split()
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "data_prep", "tokenizer", "--config", str(cfg_path), *tok_override]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    killed = 0
    for n in (12, 10, 8):  # three kills at different points, then a clean finish
        proc = subprocess.run(
            [sys.executable, "-c", KILL_SCRIPT, "tokenize", "--config", str(cfg_path)],
            cwd=REPO,
            env={**env, "KILL_AFTER_ADDS": str(n)},
            capture_output=True,
        )
        killed += proc.returncode == -9
    assert killed == 3
    assert not (out / "manifest.json").exists()
    assert list(out.rglob("*.tmp")), "a kill -9 mid-shard should leave a temporary behind"
    subprocess.run(
        [sys.executable, "-m", "data_prep", "tokenize", "--config", str(cfg_path)],
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
    )
    assert not list(out.rglob("*.tmp"))
    assert data_files(out) == data_files(reference)


def test_decontamination_drops_overlapping_documents(raw, reference, tmp_path):
    from data_prep.loading import Document, open_source

    cfg = make_cfg(raw, tmp_path)
    victim = next(
        d.text for d in open_source(cfg.sources[2]).iter_unit(0) if isinstance(d, Document)
    )
    words = victim.split()
    assert len(words) > 30
    eval_file = tmp_path / "eval.jsonl"
    rows = [{"question": " ".join(words[5:30]), "answer": "x"}, {"question": "unrelated text"}]
    eval_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = make_cfg(
        raw,
        tmp_path / "out",
        decontamination={"enabled": True, "ngram": 13, "eval_files": [str(eval_file)]},
        tokenizer={"kind": "pretrained", "path": str(reference / "tokenizer.json")},
    )
    run_tokenizer_stage(cfg)
    summary = run_tokenize_task(cfg)
    assert summary["decontaminated"]["metamathqa"] >= 1
    assert summary["decontaminated"]["fineweb_edu"] == 0
    manifest = merge(cfg)
    ref = load_manifest(reference)
    got = manifest["sources"]["metamathqa"]
    assert got["decontaminated"] == summary["decontaminated"]["metamathqa"]
    ref_docs = (
        ref["sources"]["metamathqa"]["train_documents"]
        + ref["sources"]["metamathqa"]["val_documents"]
    )
    assert got["train_documents"] + got["val_documents"] == ref_docs - got["decontaminated"]


def test_bad_rows_are_counted_not_fatal(raw, reference, tmp_path):
    cfg = make_cfg(
        raw,
        tmp_path,
        sources=[{"source": "fineweb_edu", "data_files": str(raw["bad"])}],
        tokenizer={"kind": "pretrained", "path": str(reference / "tokenizer.json")},
        validation={"fraction": 0.0, "num_sequences": 0, "seq_len": 8},
    )
    run_tokenizer_stage(cfg)
    summary = run_tokenize_task(cfg)
    skipped = summary["rows_skipped"]
    assert skipped.get("empty text", 0) >= 1
    assert any(k.startswith("missing field") for k in skipped)
    assert summary["documents"] >= 1
    manifest = merge(cfg)
    assert manifest["sources"]["fineweb_edu"]["rows_skipped"] == skipped


def test_corrupted_shard_is_detected(reference, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    rec = load_manifest(copy)["shards"][0]
    path = copy / (rec["path"] + ".bin")
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "verify", "--data-dir", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3
    assert "corrupted" in proc.stderr and "Traceback" not in proc.stderr


def test_other_tokenizer_refused(raw, reference, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    cfg = make_cfg(raw, copy, tokenizer={"kind": "bpe", "vocab_size": 300, "sample_documents": 20})
    with pytest.raises(DataError, match="another tokenizer"):
        run_tokenizer_stage(cfg)
    # a fragment written with another tokenizer is refused by tokenize too
    frag = next((copy / "parts").rglob("*.json"))
    state = json.loads(frag.read_text())
    state["tokenizer_sha256"] = "0" * 64
    frag.write_text(json.dumps(state))
    with pytest.raises(DataError, match="tokenizer"):
        run_tokenize_task(make_cfg(raw, copy))


def test_cli_errors_are_one_line(tmp_path, raw):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "o"),
                "sources": [{"source": "fineweb_edoo", "data_files": str(raw["fineweb"])}],
            }
        )
    )
    for args, needle in [
        (["tokenizer", "--config", str(cfg_path)], "fineweb_edu"),  # unknown source: close match
        (["tokenize", "--config", str(cfg_path), "shards.max_tokens=-5"], "shards.max_tokens"),
        (["tokenize", "--config", str(tmp_path / "nope.yaml")], "not found"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode != 0, args
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sentencepiece_option(raw, tmp_path):
    cfg = make_cfg(
        raw,
        tmp_path,
        tokenizer={"kind": "sentencepiece", "vocab_size": 400, "sample_documents": 60},
    )
    tok = run_tokenizer_stage(cfg)
    assert tok.kind == "sentencepiece" and (tmp_path / "tokenizer.model").is_file()
    text = "Question: what is 2 + 2?\n\nAnswer: 4"
    assert tok.decode(tok.encode(text)) == text
    assert load_tokenizer_dir(tmp_path).hash == tok.hash


def test_dry_run_prints_resolved_config(tmp_path, raw):
    cfg_path = _write_yaml(make_cfg(raw, tmp_path), tmp_path / "c.yaml")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "tokenize",
            "--config",
            str(cfg_path),
            "--dry-run",
            "workers=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(proc.stdout)["workers"] == 3


def test_files_compare_helper_sanity(reference, tmp_path):
    # Guards the comparison used above: it sees the shards, so one flipped byte or one missing
    # shard makes two outputs differ, and it ignores what is not data (logs).
    files = data_files(reference)
    assert any(k.endswith(".bin") for k in files) and "manifest.json" in files
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    assert data_files(copy) == files
    (copy / "run.log").write_text("not data")
    assert data_files(copy) == files
    shard = copy / next(k for k in files if k.endswith(".bin"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert data_files(copy) != files
    shard.unlink()
    assert data_files(copy) != files


def test_a_line_per_unit_with_rates_and_eta(reference, raw, tmp_path, capsys):
    cfg = make_cfg(
        raw, tmp_path, tokenizer={"kind": "pretrained", "path": str(reference / "tokenizer.json")}
    )
    run_tokenizer_stage(cfg)
    capsys.readouterr()
    summary = run_tokenize_task(cfg)
    out = capsys.readouterr().out
    unit_line = re.compile(
        r"^\[tokenize\] unit (\d)/5 (\w+)/u\d{5}: ([\d,]+) rows, ([\d,]+) tokens in \d+s "
        r"\([\d,]+ rows/s, [\d,]+ tokens/s\); ETA \S+$"
    )
    found = [m for line in out.splitlines() if (m := unit_line.match(line))]
    assert [int(m[1]) for m in found] == [1, 2, 3, 4, 5], out
    assert sum(int(m[4].replace(",", "")) for m in found) == summary["tokens"]
    rows = summary["documents"] + sum(summary["rows_skipped"].values())
    assert sum(int(m[3].replace(",", "")) for m in found) == rows
    assert found[-1][0].endswith("ETA 0s")
    run_tokenize_task(cfg)  # a rerun: every unit is already there
    assert capsys.readouterr().out.count(": already done; ETA") == 5


def test_a_unit_that_fails_to_open_fails_at_its_turn(reference, tmp_path):
    """Units are opened one ahead (the next file opens while the current unit's last batch
    encodes). A file that cannot be read stops the task at its own turn, with its own error:
    the unit before it is finished and recorded first, so a rerun only redoes what is left."""
    src = tmp_path / "fw"
    src.mkdir()
    fixtures.write_fineweb_parquet(src, n_docs=40, seed=0, name="part-0.parquet")
    (src / "part-1.parquet").write_bytes(b"not a parquet file at all")
    cfg = DataPrepConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "sources": [{"source": "fineweb_edu", "data_files": str(src)}],
            "tokenizer": {"kind": "pretrained", "path": str(reference / "tokenizer.json")},
            "shards": {"max_tokens": 3000, "encode_batch_documents": 7},
            "validation": {"fraction": 0.0, "num_sequences": 0, "seq_len": 8},
        }
    )
    run_tokenizer_stage(cfg)
    with pytest.raises(DataError, match="part-1.parquet"):
        run_tokenize_task(cfg)
    first = json.loads(next((tmp_path / "out" / "parts").rglob("u00000.json")).read_text())
    assert first["complete"] and first["rows_consumed"] == 40
    assert not list((tmp_path / "out" / "parts").rglob("u00001.json"))
