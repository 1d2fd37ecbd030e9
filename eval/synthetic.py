"""Evaluation of the synthetic tasks (phone-book, shortest path, memorization).

`run_synthetic(model, tokenizer, data_dir, limit, device)` reads the task name from
`<data_dir>/manifest.json` (or config.json) and returns the `synthetic` section of
results.json for that task:

- phone-book: greedy-decode as many tokens as the answer has and count exact matches of the
  whole answer (the 8 digits) -> {"phonebook": {"book_size", "accuracy", "n"}}.
- shortest path: greedy-decode until EOS (or the longest possible path), parse the node list
  and score both the exact reference path and *any* valid shortest path (the reference is
  only the lexicographically smallest one) -> {"shortest_path": {"exact_match",
  "valid_shortest_path", "parsed", "nodes", "n"}}.
- memorization: sign of a sequence classifier's logit against the +-1 labels (the test set is
  the training set by design) -> {"memorization": {"accuracy", "n"}}.

Decoding is plain full-forward greedy decoding (no KV cache), batched. A causal model lets
prompts of different lengths share a batch by right-padding: the logits at a sequence's own
last position never see the padding after it. A non-causal model only batches prompts of
equal length (phone-book prompts all have the same length).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mop.errors import ConfigError, DataError
from mop.fileio import read_json
from pretrain.memorization import classifier_accuracy

TEXT_TASKS = ("phonebook", "shortest_path")
TASKS = (*TEXT_TASKS, "memorization")


# -- task detection --------------------------------------------------------------------------


def detect_task(data_dir: str | os.PathLike) -> str:
    """Task name of a finished synthetic directory (manifest first, config.json as fallback)."""
    data_dir = Path(data_dir)
    name = None
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        task = read_json(manifest).get("task")
        name = task.get("name") if isinstance(task, dict) else task
    elif (data_dir / "config.json").is_file():
        name = read_json(data_dir / "config.json").get("task")
    else:
        raise DataError(f"{data_dir} has no manifest.json: not a finished synthetic task dir")
    if name not in TASKS:
        raise DataError(f"{data_dir}: unknown synthetic task {name!r} (known: {', '.join(TASKS)})")
    return name


def _task_config(data_dir: Path) -> dict[str, Any]:
    manifest = read_json(data_dir / "manifest.json")
    task = manifest.get("task")
    if isinstance(task, dict) and isinstance(task.get("config"), dict):
        return task["config"]
    return read_json(data_dir / "config.json")


# -- greedy decoding -------------------------------------------------------------------------


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def _is_causal(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(getattr(cfg, "causal", True))


def _max_seq_len(model: nn.Module) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "max_seq_len", None)


@torch.no_grad()
def greedy_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None,
    device: torch.device | str,
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuation of each prompt (right-padded into one batch), EOS not included.

    Every sequence advances every step, so sequences that start with equal lengths stay
    aligned; decoding stops once each has emitted EOS (when `eos_id` is given) or after
    `max_new_tokens`. Right padding is only correct for a causal model (callers batch equal
    lengths otherwise).
    """
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if (lengths == 0).any():
        raise DataError("empty prompt: nothing to condition on")
    width = int(lengths.max()) + max_new_tokens
    buf = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    buf, cur = buf.to(device), lengths.to(device)
    rows = torch.arange(len(prompts), device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = _logits(model, buf[:, : int(cur.max())])
        nxt = logits[rows, cur - 1].argmax(dim=-1)
        buf[rows, cur] = nxt
        cur = cur + 1
        if eos_id is not None:
            finished |= nxt == eos_id
            if bool(finished.all()):
                break
    out = []
    for i, start in enumerate(lengths.tolist()):
        gen = buf[i, start : int(cur[i])].tolist()
        if eos_id is not None and eos_id in gen:
            gen = gen[: gen.index(eos_id)]
        out.append(gen)
    return out


def _batches(lengths: Sequence[int], batch_size: int, causal: bool) -> Iterable[list[int]]:
    """Index batches: sorted by length (little padding); equal lengths only if not causal."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) >= batch_size or (not causal and lengths[i] != lengths[batch[0]])):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None,
    device: torch.device | str,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuations of many prompts, batched, in the order of `prompts`.

    `max_new_tokens` is cut to the model's `max_seq_len` (when it has one); a prompt that
    does not fit at all is an error rather than a silent zero.
    """
    limit = _max_seq_len(model)
    longest = max((len(p) for p in prompts), default=0)
    if limit is not None:
        if longest >= limit:
            raise ConfigError(
                f"a prompt of {longest} tokens leaves no room to generate within the model's "
                f"max_seq_len={limit}"
            )
        max_new_tokens = min(max_new_tokens, limit - longest)
    causal = _is_causal(model)
    results: list[list[int]] = [[] for _ in prompts]
    for idx in _batches([len(p) for p in prompts], batch_size, causal):
        outs = greedy_batch(model, [prompts[i] for i in idx], max_new_tokens, eos_id, device)
        for i, gen in zip(idx, outs):
            results[i] = gen
    return results


# -- the tasks --------------------------------------------------------------------------------


def _split_tokens(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) as training saw them: the text's tokens cut at prompt_tokens."""
    ids = tokenizer.encode(row["text"])
    k = int(row["prompt_tokens"])
    if not 0 < k < len(ids):
        raise DataError(f"test row {row.get('prompt')!r}: prompt_tokens={k} of {len(ids)} tokens")
    return ids[:k], ids[k:]


def eval_phonebook(
    model: nn.Module,
    tokenizer,
    rows: Sequence[dict],
    device: torch.device | str,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Exact-match accuracy of the greedy answer (as many tokens as the reference answer)."""
    pairs = [_split_tokens(tokenizer, r) for r in rows]
    correct = 0
    # Group by answer length so each batch decodes exactly its answers' length.
    by_len: dict[int, list[int]] = {}
    for i, (_, ans) in enumerate(pairs):
        by_len.setdefault(len(ans), []).append(i)
    for n_ans, idx in sorted(by_len.items()):
        gens = greedy_generate(
            model, [pairs[i][0] for i in idx], n_ans, None, device, batch_size=batch_size
        )
        correct += sum(gen == pairs[i][1] for i, gen in zip(idx, gens))
    n = len(rows)
    return {"accuracy": correct / n if n else 0.0, "n": n}


def _max_path_tokens(tokenizer, n_nodes: int) -> int:
    # Longest possible answer: a path through every node, each " <id>", then EOS.
    widest = " " + " ".join(str(v) for v in range(n_nodes))
    return len(tokenizer.encode(widest)) + 1


def eval_shortest_path(
    model: nn.Module,
    tokenizer,
    rows: Sequence[dict],
    device: torch.device | str,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Exact match with the reference path and the rate of valid shortest paths."""
    from data_prep.synthetic.shortest_path import is_valid_shortest_path, parse_path

    prompts = [_split_tokens(tokenizer, r)[0] for r in rows]
    if max_new_tokens is None:
        max_new_tokens = max((_max_path_tokens(tokenizer, int(r["n"])) for r in rows), default=1)
    gens = greedy_generate(
        model, prompts, max_new_tokens, tokenizer.eos_id, device, batch_size=batch_size
    )
    exact = valid = parsed = 0
    for row, gen in zip(rows, gens):
        # Keep the first line only: a model may run on past the answer without an EOS.
        path = parse_path(tokenizer.decode(gen).split("\n")[0])
        parsed += path is not None
        exact += path is not None and path == parse_path(row["answer"])
        valid += is_valid_shortest_path(row["edges"], int(row["n"]), row["src"], row["dst"], path)
    n = max(len(rows), 1)  # an empty test set scores 0, not a ZeroDivisionError
    return {
        "exact_match": exact / n,
        "valid_shortest_path": valid / n,
        "parsed": parsed / n,
        "nodes": int(rows[0]["n"]) if rows else None,
        "n": len(rows),
    }


def eval_memorization(
    model: nn.Module, data_dir: str | os.PathLike, limit: int | None, device: torch.device | str
) -> dict[str, Any]:
    from data_prep.synthetic.memorization import load_memorization

    x, y = load_memorization(data_dir)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return {"accuracy": classifier_accuracy(model, x, y, device), "n": int(len(y))}


def run_synthetic(
    model: nn.Module,
    tokenizer,
    data_dir: str | os.PathLike,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate `model` on the synthetic task in `data_dir`; returns {task: metrics}."""
    data_dir = Path(data_dir)
    task = detect_task(data_dir)
    was_training = model.training
    model.eval()
    try:
        if task == "memorization":
            return {"memorization": eval_memorization(model, data_dir, limit, device)}
        if tokenizer is None:
            raise ConfigError(f"the {task} task needs the tokenizer of {data_dir}")
        from data_prep.synthetic.writer import load_test_set

        rows = load_test_set(data_dir)
        if limit is not None:
            rows = rows[:limit]
        if task == "phonebook":
            res = eval_phonebook(model, tokenizer, rows, device, batch_size)
            return {"phonebook": {"book_size": int(_task_config(data_dir)["size"]), **res}}
        return {"shortest_path": eval_shortest_path(model, tokenizer, rows, device, batch_size)}
    finally:
        model.train(was_training)


# -- sweeps -----------------------------------------------------------------------------------


def _phonebook_entry(item: dict[str, Any]) -> dict[str, Any] | None:
    """The phone-book metrics of a results.json document or of a bare phonebook section."""
    if "book_size" in item:
        return item
    return (item.get("synthetic") or {}).get("phonebook")


def max_book_size_at(results_list: Iterable[dict[str, Any]], threshold: float = 0.9) -> int | None:
    """Largest book size whose accuracy is >= threshold across runs of one model (or None).

    Items are results.json documents or their `synthetic.phonebook` sections.
    """
    best: int | None = None
    for item in results_list:
        pb = _phonebook_entry(item)
        if not pb or pb.get("accuracy") is None or pb.get("book_size") is None:
            continue
        if pb["accuracy"] >= threshold and (best is None or pb["book_size"] > best):
            best = int(pb["book_size"])
    return best
