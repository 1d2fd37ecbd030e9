"""The sample order is a pure function of (seed, i): dp-size and resume independent."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.manifest import load_manifest
from mop.errors import DataError
from pretrain.config import DataConfig
from pretrain.data import FeistelPermutation, TrainData, ValidationSet, open_manifest
from tests.pretrain.conftest import SEQ_LEN, TOKENIZER_SHA


def make(data_dir, seed=0, period=100) -> TrainData:
    cfg = DataConfig(data_dir=str(data_dir), seq_len=SEQ_LEN, seed=seed, mixture_period=period)
    return TrainData(data_dir, load_manifest(data_dir), cfg)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_feistel_is_a_bijection(n):
    perm = FeistelPermutation(n, key=42)
    assert sorted(perm(i) for i in range(n)) == list(range(n))
    if n > 10:
        assert [perm(i) for i in range(n)] != list(range(n))


def test_same_seed_same_samples_fresh_objects_any_order(data_dir):
    a, b = make(data_dir), make(data_dir)
    ids = list(range(300))
    forward = [a.locate(i) for i in ids]
    backward = [b.locate(i) for i in reversed(ids)][::-1]  # "resume" from anywhere
    assert forward == backward
    assert forward != [make(data_dir, seed=1).locate(i) for i in ids]


def test_dp_ranks_partition_each_global_batch(data_dir):
    d = make(data_dir)
    g = 8
    for first in (0, 8, 40):
        for dp in (1, 2, 4):
            got = sorted(i for r in range(dp) for i in d.rank_samples(first, g, dp, r))
            assert got == list(range(first, first + g))
    # the rank split of dp=2 takes alternate samples: same as the dp=1 stream, interleaved
    one = d.micro_batches(16, 8, 1, 0, micro=8)[0]
    halves = [d.micro_batches(16, 8, 2, r, micro=4)[0] for r in (0, 1)]
    merged = np.empty_like(one.input_ids.numpy())
    merged[0::2], merged[1::2] = halves[0].input_ids.numpy(), halves[1].input_ids.numpy()
    assert np.array_equal(merged, one.input_ids.numpy())


def test_sources_follow_plan_shares_and_windows_are_contiguous(data_dir):
    d = make(data_dir)
    n = 1000
    sources = [d.locate(i)[0] for i in range(n)]
    shares = dict(zip(d.labels, d.shares))
    assert sources.count(d.labels.index("alpha")) == round(n * shares["alpha"])
    b = d.collate(list(range(6)))
    assert np.array_equal(b.input_ids[:, 1:].numpy(), b.targets[:, :-1].numpy())
    # a window spanning two shards equals the slice of the concatenated stream
    s = d.streams[0]
    full = np.concatenate([np.asarray(r.tokens) for r in s.readers])
    j = int(s.starts[1]) // SEQ_LEN  # window that contains the first shard boundary
    assert np.array_equal(s.window(j), full[j * SEQ_LEN : j * SEQ_LEN + SEQ_LEN + 1])


def test_each_epoch_visits_every_window_once(data_dir):
    d = make(data_dir)
    s0 = d.labels.index("alpha")
    w = d.streams[s0].num_windows
    seen = []
    i = 0
    while len(seen) < 2 * w:
        s, win = d.locate(i)
        if s == s0:
            seen.append(win)
        i += 1
    assert sorted(seen[:w]) == list(range(w)) and sorted(seen[w:]) == list(range(w))
    assert seen[:w] != seen[w:]


def test_tokenizer_and_vocab_checks(data_dir):
    cfg = DataConfig(data_dir=str(data_dir), seq_len=SEQ_LEN, tokenizer_sha256=TOKENIZER_SHA)
    assert open_manifest(cfg, vocab_size=512)["tokenizer"]["sha256"] == TOKENIZER_SHA
    with pytest.raises(DataError, match="another tokenizer|made with tokenizer"):
        open_manifest(cfg.model_copy(update={"tokenizer_sha256": "cd" * 32}), vocab_size=512)
    with pytest.raises(DataError, match="vocab_size"):
        open_manifest(cfg, vocab_size=100)
    val = ValidationSet(data_dir, load_manifest(data_dir))
    batches = list(val.batches(dp=2, rank=1, batch_size=2, max_batches=1))
    assert len(batches) == 1 and batches[0][0].shape == (2, SEQ_LEN)


def test_validation_batches_keep_ranks_in_step(data_dir):
    """Uneven shares: every rank yields the same number of batches (a forward may be a
    collective); filler batches carry only ignored targets, and real sequences are each seen
    exactly once."""
    val = ValidationSet(data_dir, load_manifest(data_dir))
    n = len(val)
    dp = 3 if n % 3 else 5  # a size that does not divide the number of sequences
    assert n % dp
    per_rank = [list(val.batches(dp, r, batch_size=1, max_batches=100)) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1
    real = [(inp, tgt) for batches in per_rank for inp, tgt in batches if (tgt != -100).any()]
    fillers = [tgt for batches in per_rank for _, tgt in batches if (tgt == -100).all()]
    assert len(real) == n and len(fillers) == len(per_rank[0]) * dp - n
