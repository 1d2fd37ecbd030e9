"""Resolving and loading checkpoints for evaluation (eval/checkpoint.py, eval/export.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_prep.manifest import load_manifest, write_manifest
from data_prep.tokenizer import train_bpe
from eval.checkpoint import MODEL_STATES, load_for_eval, resolve_checkpoint
from eval.export import export_loaded
from mop.errors import DamagedStateError, DataError
from pretrain.checkpoint_dcp import STATE_FILE
from pretrain.checkpoint_record import RECORD

from .conftest import corpus, train_tiny


def _ids(n: int = 20) -> torch.Tensor:
    return torch.arange(1, n + 1)[None] % 250


def test_run_dir_checkpoints_dir_and_step_dir_resolve(trained_run):
    ref = resolve_checkpoint(trained_run)
    assert (ref.kind, ref.step, ref.path.name) == ("deepspeed", 4, "step_00000004")
    assert ref.run_dir == trained_run.resolve()
    assert resolve_checkpoint(trained_run / "checkpoints").path == ref.path
    older = resolve_checkpoint(trained_run / "checkpoints" / "step_00000002")
    assert older.step == 2 and older.run_dir == ref.run_dir


def test_loaded_weights_are_the_saved_ones(trained_run):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    loaded = load_for_eval(trained_run)
    # The save's fp32 masters, read with torch.distributed.checkpoint itself (ZeRO-1 save)
    reader = FileSystemReader(loaded.ref.path / "dcp")
    meta = reader.read_metadata().state_dict_metadata
    saved = {k: torch.empty(m.size) for k, m in meta.items() if k.endswith("/fp32")}
    dcp_load(saved, storage_reader=reader, no_dist=True)
    for name, tensor in loaded.model.named_parameters():
        torch.testing.assert_close(tensor, saved[f"{name}/fp32"], rtol=0, atol=0)
    assert not loaded.model.training
    assert loaded.tokenizer.hash == load_manifest(loaded.data_dir)["tokenizer"]["sha256"]
    header = loaded.header()
    assert header["step"] == 4 and header["run_dir"] == str(trained_run.resolve())
    model = header["model"]
    assert model["ffn"] == "moe" and model["num_experts"] == 4 and model["top_k"] == 2
    assert 0 < model["active_params"] < model["total_params"]


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


WEIGHTS = "dcp/__0_0.distcp"  # a ZeRO-1 save's masters and moments (pretrain/checkpoint_dcp.py)


def test_refuses_missing_unpointed_and_incomplete_checkpoints(run_copy, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    ckpts = run_copy / "checkpoints"
    # A save newer than the pointer was interrupted: never evaluated.
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000006")
    with pytest.raises(DataError, match="not complete"):
        resolve_checkpoint(ckpts / "step_00000006")
    # The pointed-at save lost a weights file: its integrity record says so.
    (ckpts / "step_00000004" / WEIGHTS).unlink()
    with pytest.raises(DamagedStateError, match=f"damaged: missing file {WEIGHTS}"):
        resolve_checkpoint(run_copy)
    # A truncated file is reported, not a pickle traceback.
    (ckpts / "step_00000002" / STATE_FILE).write_bytes(b"PK\x03\x04half")
    with pytest.raises(DamagedStateError, match=f"damaged: size mismatch in {STATE_FILE}"):
        load_for_eval(ckpts / "step_00000002")
    # A save from before integrity records: the files themselves are checked, as before.
    (ckpts / "step_00000002" / RECORD).unlink()
    with pytest.raises(DataError, match="half-written or corrupted"):
        load_for_eval(ckpts / "step_00000002")
    (ckpts / "step_00000004" / RECORD).unlink()
    (ckpts / "step_00000004" / STATE_FILE).unlink()
    with pytest.raises(DataError, match="incomplete"):
        resolve_checkpoint(run_copy)
    (ckpts / "latest_complete").unlink()
    with pytest.raises(DataError, match="no complete checkpoint"):
        resolve_checkpoint(run_copy)
    with pytest.raises(DataError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)  # not a run directory at all


def test_refuses_a_tokenizer_other_than_the_trained_one(trained_run, eval_data_dir, tmp_path):
    other = tmp_path / "other_data"
    shutil.copytree(eval_data_dir, other)
    tok = train_bpe(corpus(40, seed=1), vocab_size=280)
    tok.save(other)
    with pytest.raises(DataError, match="sha256"):
        load_for_eval(trained_run, data_dir=other)
    # A data directory without a tokenizer at all.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no tokenizer"):
        load_for_eval(trained_run, data_dir=empty)


def test_hf_export_round_trip_keeps_logits_step_and_tokenizer(trained_run, tmp_path):
    loaded = load_for_eval(trained_run)
    out = export_loaded(loaded, tmp_path / "hf", torch.float32)
    back = load_for_eval(out)
    assert back.ref.kind == "hf" and back.ref.step == 4
    assert back.tokenizer.hash == loaded.tokenizer.hash
    with torch.no_grad():
        torch.testing.assert_close(back.model(_ids()).logits, loaded.model(_ids()).logits)
    # The export must refuse a --data-dir whose tokenizer is another one.
    other = tmp_path / "other"
    train_bpe(corpus(40, seed=2), vocab_size=280).save(other)
    with pytest.raises(DataError, match="sha256"):
        load_for_eval(out, data_dir=other)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_checkpoint_matches_zero1_weights(precision, eval_data_dir, tmp_path):
    """ZeRO-3 partitions the weights; the fp32 gather must give what ZeRO-1 trains. In bf16
    DeepSpeed names the partition files `bf16_zero_pp_rank_*` (the GPU default), and ZeRO-1
    saves bf16 module weights while the ZeRO-3 gather returns the fp32 masters: they agree to
    bf16 rounding."""
    dense = ("model.ffn=dense", "model.moe=null", "max_steps=2", f"precision={precision}")
    runs = {}
    for stage in (1, 3):
        proc = train_tiny(eval_data_dir, tmp_path / f"z{stage}", f"zero_stage={stage}", *dense)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[stage] = load_for_eval(tmp_path / f"z{stage}")
    assert not (runs[3].ref.path / MODEL_STATES).exists()  # really a partitioned save
    prefix = "bf16_" if precision == "bf16" else ""
    assert list(runs[3].ref.path.glob(f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 1e-2, "atol": 1e-3}
    for name, tensor in runs[1].model.state_dict().items():
        torch.testing.assert_close(runs[3].model.state_dict()[name], tensor, **tol, msg=name)


def test_manifest_tokenizer_checked_against_checkpoint(trained_run, eval_data_dir, tmp_path):
    """The data directory's own tokenizer file matches, but its shards were re-made with
    another one: the checkpoint's recorded hash still decides."""
    other = tmp_path / "data"
    shutil.copytree(eval_data_dir, other)
    manifest = load_manifest(other)
    manifest["tokenizer"]["sha256"] = "cd" * 32
    write_manifest(other, manifest)
    loaded = load_for_eval(trained_run, data_dir=other)  # the tokenizer file itself matches
    from eval.perplexity import evaluate_perplexity

    with pytest.raises(DataError, match="tokenizer"):
        evaluate_perplexity(loaded.model, other, tokenizer_sha256=loaded.tokenizer.hash)
