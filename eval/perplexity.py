"""Validation loss and perplexity on the held-out sequences of a data directory.

The sequences are the fixed `manifest["validation"]` ones (data_prep/merge.py), each scored as
seq_len next-token predictions, so numbers are comparable across checkpoints and with the
`val_loss` that training logs. The loss is the mean over all predicted tokens (not a mean of
per-sequence means). Under torch.distributed every rank scores sequences rank, rank + world,
... and the sums are all-reduced, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_prep.manifest import check_tokenizer, load_manifest
from mop.errors import DataError
from mop.progress import progress
from pretrain.data import ValidationSet
from pretrain.model.transformer import Transformer
from pretrain.parallel.mesh import collective_device


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_perplexity(
    model: Transformer,
    data_dir: str | os.PathLike,
    batch_size: int = 8,
    limit: int | None = None,
    tokenizer_sha256: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """{"loss", "perplexity", "num_sequences", "seq_len", "tokens"} over the first `limit`
    validation sequences (all when None). `tokenizer_sha256` must match the shards' one."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    if tokenizer_sha256:
        check_tokenizer(manifest, tokenizer_sha256, where=str(data_dir))
    val = ValidationSet(data_dir, manifest)
    n = len(val) if limit is None else min(int(limit), len(val))
    if n < 1:
        raise DataError(f"--limit {limit}: no validation sequences to score")
    if val.seq_len - 1 > model.cfg.max_seq_len:
        raise DataError(
            f"validation sequences of {data_dir} have {val.seq_len - 1} inputs, more than the "
            f"model's max_seq_len={model.cfg.max_seq_len}"
        )
    rank, world = _dist()
    device = next(model.parameters()).device
    mine = list(range(rank, n, world))
    # float64 sums: millions of tokens of ~3-nat losses lose digits in fp32.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, predicted tokens]
    bar = progress(total=len(mine), desc="ppl", unit="seq", disable=not show_progress or rank)
    for a in range(0, len(mine), batch_size):
        ids = mine[a : a + batch_size]
        arr = np.stack([np.asarray(val.reader.document(i)) for i in ids]).astype(np.int64)
        tokens = torch.from_numpy(arr).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            tokens[:, 1:].reshape(-1),
            reduction="sum",
        )
        sums[0] += loss.double()
        sums[1] += tokens[:, 1:].numel()
        bar.update(len(ids))
    bar.close()
    if world > 1:
        sums = sums.to(collective_device())  # the model's device may not be the backend's
        dist.all_reduce(sums)
    mean = float(sums[0] / sums[1])
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "num_sequences": n,
        "seq_len": val.seq_len - 1,
        "tokens": int(sums[1]),
    }
