"""Validation perplexity (eval/perplexity.py): value, batching, limit, data parallel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data_prep.manifest import load_manifest
from data_prep.shards import ShardReader
from eval.perplexity import evaluate_perplexity
from mop.errors import DataError
from pretrain.model.config import ModelConfig
from pretrain.model.transformer import build_model, lm_loss

from .conftest import MAX_SEQ_LEN, SEQ_LEN


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320, d_model=32, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=MAX_SEQ_LEN
    )
    return build_model(cfg).eval()


def reference_loss(model, data_dir, n: int) -> float:
    rec = load_manifest(data_dir)["validation"]
    reader = ShardReader(data_dir / rec["path"], rec["dtype"])
    seqs = torch.from_numpy(np.stack([reader.document(i) for i in range(n)]).astype(np.int64))
    with torch.no_grad():
        return float(lm_loss(model(seqs[:, :-1]).logits, seqs[:, 1:]))


def test_loss_is_the_token_mean_over_the_validation_sequences(eval_data_dir):
    model = tiny_model()
    full = evaluate_perplexity(model, eval_data_dir, batch_size=4, show_progress=False)
    assert full["num_sequences"] == 10 and full["seq_len"] == SEQ_LEN
    assert full["tokens"] == 10 * SEQ_LEN
    assert full["loss"] == pytest.approx(reference_loss(model, eval_data_dir, 10), abs=1e-5)
    assert full["perplexity"] == pytest.approx(math.exp(full["loss"]))
    one = evaluate_perplexity(model, eval_data_dir, batch_size=1, show_progress=False)
    assert one["loss"] == pytest.approx(full["loss"], abs=1e-6)
    part = evaluate_perplexity(model, eval_data_dir, batch_size=3, limit=5, show_progress=False)
    assert part["num_sequences"] == 5
    assert part["loss"] == pytest.approx(reference_loss(model, eval_data_dir, 5), abs=1e-5)


def test_refuses_other_tokenizer_and_empty_limit(eval_data_dir):
    model = tiny_model()
    with pytest.raises(DataError, match="tokenizer"):
        evaluate_perplexity(model, eval_data_dir, tokenizer_sha256="ef" * 32)
    with pytest.raises(DataError, match="limit"):
        evaluate_perplexity(model, eval_data_dir, limit=0)


def _worker(rank: int, world: int, init: str, data_dir: str, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = evaluate_perplexity(tiny_model(), data_dir, batch_size=2, limit=9)
        out[rank] = res["loss"]
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_sums_match_the_serial_result(eval_data_dir, tmp_path):
    serial = evaluate_perplexity(tiny_model(), eval_data_dir, limit=9, show_progress=False)
    with mp.Manager() as manager:
        out = manager.dict()
        init = f"file://{tmp_path / 'pg'}"
        mp.spawn(_worker, args=(2, init, str(eval_data_dir), out), nprocs=2, join=True)
        losses = dict(out)
    # Rank 0 scores 5 sequences and rank 1 four: all-reduced sums, not a mean of means.
    assert losses[0] == losses[1] == pytest.approx(serial["loss"], abs=1e-6)
