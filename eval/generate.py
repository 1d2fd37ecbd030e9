"""Greedy decoding: the one decoder of every eval (lm-eval `generate_until`, synthetic tasks).

Two ways to get the next token's logits, one loop around them:

- A causal `Transformer` decodes with its KV cache. Prompts of different lengths are left-padded
  into one batch with an attention mask (the model masks padded keys; rotary scores depend only
  on token distances, so padding does not change a row's logits beyond float rounding).
- Any other model (a non-causal Transformer such as Soft MoE, or a plain module mapping ids
  [B, T] to logits, e.g. a test oracle) is re-run on the whole sequence every step. Its batches
  hold prompts of one length only: without a cache there is no mask, and a non-causal model's
  logits would read right padding.

Finished rows are dropped from the batch (and the cache), so a batch costs as many steps as its
longest generation, on a shrinking batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from mop.errors import ConfigError
from pretrain.model.transformer import ModelOutput, Transformer


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), each at most `max_new_tokens` long, in
    the order of `prompts`.

    A row stops at `eos_id` (not included in its output) or once `stop(generated_ids)` is true
    (the caller decodes and looks for stop strings; its output keeps those tokens). Prompts
    are decoded `batch_size` at a time (default: all at once), sorted by length.
    `max_new_tokens` is cut to what the Transformer's `max_seq_len` leaves after the longest
    prompt; a prompt that leaves no room is a ConfigError rather than a silent empty answer.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate needs at least one prompt token per row")
    cached = isinstance(model, Transformer) and model.cfg.causal
    if isinstance(model, Transformer):
        max_new_tokens = _fit_context(prompts, max_new_tokens, model.cfg.max_seq_len)
    if device is None:
        # A parameterless module (a test oracle) runs on the CPU.
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    results: list[list[int]] = [[] for _ in prompts]
    size = batch_size or len(prompts)
    for idx in batches([len(p) for p in prompts], size, equal_lengths=not cached):
        batch = [prompts[i] for i in idx]
        if cached:
            step: _Step = _CachedStep(model, batch, pad_id, device)
        else:
            step = _RecomputeStep(model, batch, device)
        outs = _decode(step, len(batch), max_new_tokens, eos_id, stop, device, autocast_dtype)
        for i, gen in zip(idx, outs):
            results[i] = gen
    return results


def batches(lengths: Sequence[int], batch_size: int, equal_lengths: bool) -> Iterable[list[int]]:
    """Index batches sorted by length (little padding); one length per batch if asked."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batch: list[int] = []
    for i in order:
        full = len(batch) >= batch_size
        if batch and (full or (equal_lengths and lengths[i] != lengths[batch[0]])):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _fit_context(prompts: Sequence[Sequence[int]], max_new_tokens: int, limit: int) -> int:
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise ConfigError(
            f"a prompt of {longest} tokens leaves no room to generate within the model's "
            f"max_seq_len={limit}"
        )
    return min(max_new_tokens, limit - longest)


class _Step(Protocol):
    """Logits of the next token of each batch row; rows can be dropped as they finish."""

    def first(self) -> Tensor: ...  # [B, V] after the prompts

    def next(self, tokens: Tensor) -> Tensor: ...  # [B] chosen tokens -> [B, V]

    def select(self, rows: Tensor) -> None: ...


class _CachedStep:
    """Left-padded prompts, then one token per step through the KV cache."""

    def __init__(
        self, model: Transformer, prompts: list[Sequence[int]], pad_id: int, device: torch.device
    ) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        self.model, self.ids, self.mask = model, ids.to(device), mask.to(device)
        self.cache = model.new_kv_cache()

    def first(self) -> Tensor:
        return self.model(self.ids, kv_cache=self.cache, attention_mask=self.mask).logits[:, -1]

    def next(self, tokens: Tensor) -> Tensor:
        return self.model(tokens[:, None], kv_cache=self.cache).logits[:, -1]

    def select(self, rows: Tensor) -> None:
        self.cache.select(rows)


class _RecomputeStep:
    """Equal-length prompts; every step re-runs the model on the whole sequence so far."""

    def __init__(self, model: nn.Module, prompts: list[Sequence[int]], device: torch.device):
        self.model = model
        self.ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)

    def _last(self) -> Tensor:
        out = self.model(self.ids)
        return (out.logits if isinstance(out, ModelOutput) else out)[:, -1]

    def first(self) -> Tensor:
        return self._last()

    def next(self, tokens: Tensor) -> Tensor:
        self.ids = torch.cat((self.ids, tokens[:, None]), dim=1)
        return self._last()

    def select(self, rows: Tensor) -> None:
        self.ids = self.ids[rows]


def _decode(
    step: _Step,
    n: int,
    max_new_tokens: int,
    eos_id: int | None,
    stop: Callable[[list[int]], bool] | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens <= 0:
        return out
    active = torch.arange(n, device=device)  # original row of each batch row
    with _autocast(device, autocast_dtype):
        logits = step.first()
    for i in range(max_new_tokens):
        nxt = logits.float().argmax(dim=-1)
        keep = []
        for j, (row, tok) in enumerate(zip(active.tolist(), nxt.tolist())):
            if eos_id is not None and tok == eos_id:
                continue
            out[row].append(tok)
            if stop is not None and stop(out[row]):
                continue
            keep.append(j)
        if not keep or i == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            step.select(rows)
            active, nxt = active[rows], nxt[rows]
        with _autocast(device, autocast_dtype):
            logits = step.next(nxt)
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
