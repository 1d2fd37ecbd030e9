"""The eval collectives get their tensors on the backend's device (see
tests/pretrain/test_collective_device.py for the spy and why): NCCL cannot gather or reduce
the CPU tensors the harness or a CPU-side sum would hand it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from eval.lm_adapter import MopLM
from eval.perplexity import evaluate_perplexity
from tests.pretrain.test_collective_device import Reached, assert_one_call_on_fake, spy_collectives

from .test_perplexity import tiny_model


def test_perplexity_sums_are_reduced_on_the_collective_device(monkeypatch, eval_data_dir):
    calls = spy_collectives(monkeypatch)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(Reached):
        evaluate_perplexity(tiny_model(), eval_data_dir, limit=2, show_progress=False)
    assert_one_call_on_fake(calls)


def test_harness_all_gather_runs_on_the_collective_device(monkeypatch):
    calls = spy_collectives(monkeypatch)
    lm = MopLM.__new__(MopLM)
    lm._rank, lm._world_size = 0, 2
    with pytest.raises(Reached):
        lm.all_gather(torch.tensor([1.0, 2.0]))
    assert_one_call_on_fake(calls, "all_gather")
