"""Batched greedy decoding with the model's KV cache.

Prompts of different lengths are left-padded into one batch with an attention mask (the model
masks padded keys; rotary scores depend only on token distances, so padding does not change a
row's logits beyond float rounding). Finished rows are dropped from the batch and the cache, so
a batch costs as many steps as its longest generation, on a shrinking batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pretrain.model.transformer import Transformer


@torch.no_grad()
def greedy_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), each at most `max_new_tokens` long.

    A row stops at `eos_id` (not included in its output) or once `stop(generated_ids)` is true
    (the caller decodes and looks for stop strings; its output keeps those tokens). The caller
    must keep len(prompt) + max_new_tokens within the model's context.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate needs at least one prompt token per row")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)

    out: list[list[int]] = [[] for _ in prompts]
    active = torch.arange(len(prompts), device=device)  # original row of each batch row
    cache = model.new_kv_cache()
    with _autocast(device, autocast_dtype):
        logits = model(ids, kv_cache=cache, attention_mask=mask).logits[:, -1]
    for step in range(max_new_tokens):
        nxt = logits.float().argmax(dim=-1)
        keep = []
        for j, (row, tok) in enumerate(zip(active.tolist(), nxt.tolist())):
            if eos_id is not None and tok == eos_id:
                continue
            out[row].append(tok)
            if stop is not None and stop(out[row]):
                continue
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            cache.select(rows)
            active, nxt = active[rows], nxt[rows]
        with _autocast(device, autocast_dtype):
            logits = model(nxt[:, None], kv_cache=cache).logits[:, -1]
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """Text before the first occurrence of any stop string (as the harness's HF model cuts)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out
