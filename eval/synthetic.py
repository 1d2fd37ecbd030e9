"""Evaluation of the synthetic tasks (phone-book, shortest path, memorization).

`run_synthetic(model, tokenizer, data_dir, limit, device)` reads the task name from
`<data_dir>/manifest.json` (or config.json) and returns the `synthetic` section of
results.json for that task:

- phone-book: greedy-decode as many tokens as the answer has and count exact matches of the
  whole answer (the 8 digits); beside it the fraction of digits right at their position
  (chance 0.1) and the loss on the book: the mean cross-entropy per digit of the reference
  number given the name, teacher-forced (nats; chance ln 10 = 2.30), over the queried
  entries, which are entries of the training book -> {"phonebook": {"book_size", "seed",
  "accuracy", "digit_accuracy", "answer_loss", "n"}}.
- shortest path: greedy-decode until EOS (or the longest possible path), parse the node list
  and score both the exact reference path and *any* valid shortest path (the reference is
  only the lexicographically smallest one) -> {"shortest_path": {"exact_match",
  "valid_shortest_path", "parsed", "nodes", "seed", "n", "valid_by_edges"}}.
  `valid_by_edges` splits the valid rate by the length of the shortest path in edges
  ({"1": {"n", "valid"}, "2": ...}): a one-edge query is a lookup in the prompt's edge list,
  only the longer ones need the model to chain edges, so the overall rate alone can hide
  a model that answers the one-edge queries and no others.
- memorization: sign of a sequence classifier's logit against the +-1 labels (the test set is
  the training set by design) -> {"memorization": {"accuracy", "n"}}.

`seed` is the data seed of the task directory (its config.json), so that a report can tell
the seeds of a grid apart. Decoding is `eval.generate.greedy_generate` (KV cache for a causal Transformer, full recompute
over equal-length batches otherwise; phone-book prompts all have the same length).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.generate import greedy_generate
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


# -- the tasks --------------------------------------------------------------------------------


def _split_tokens(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) as training saw them: the text's tokens cut at prompt_tokens."""
    ids = tokenizer.encode(row["text"])
    k = int(row["prompt_tokens"])
    if not 0 < k < len(ids):
        raise DataError(f"test row {row.get('prompt')!r}: prompt_tokens={k} of {len(ids)} tokens")
    return ids[:k], ids[k:]


def _digit_positions(tokenizer, answer: Sequence[int]) -> list[int]:
    """Positions of an answer whose reference token is a digit (the number, not its space)."""
    return [j for j, t in enumerate(answer) if tokenizer.decode([t]).strip().isdigit()]


def digit_accuracy(
    generated: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
) -> float:
    """Fraction of scored positions (`positions[i]` of answer i) where the generation holds
    the reference token; a generation cut short counts its missing positions as wrong."""
    right = total = 0
    for gen, ans, pos in zip(generated, answers, positions):
        right += sum(j < len(gen) and gen[j] == ans[j] for j in pos)
        total += len(pos)
    return right / total if total else 0.0


@torch.no_grad()
def answer_loss(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    positions: Sequence[Sequence[int]],
    device: torch.device | str,
    batch_size: int = 64,
) -> float:
    """Mean teacher-forced cross-entropy (nats) of the reference answer tokens at `positions`,
    each sequence fed as training saw it: prompt + answer from position 0."""
    total, count = 0.0, 0
    by_len: dict[int, list[int]] = {}
    for i, (p, a) in enumerate(pairs):
        by_len.setdefault(len(p) + len(a), []).append(i)
    for _, idx in sorted(by_len.items()):
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo : lo + batch_size]
            seqs = torch.tensor([[*pairs[i][0], *pairs[i][1]] for i in chunk], dtype=torch.long)
            out = model(seqs[:, :-1].to(device))
            logits = out.logits if hasattr(out, "logits") else out  # a Transformer or a plain LM
            logp = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                k = len(pairs[i][0])
                for j in positions[i]:
                    total -= float(logp[row, k + j - 1, seqs[row, k + j]])
                    count += 1
    return total / count if count else float("nan")


def eval_phonebook(
    model: nn.Module,
    tokenizer,
    rows: Sequence[dict],
    device: torch.device | str,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Exact match of the greedy answer (as many tokens as the reference answer), the digits
    right at their position, and the teacher-forced loss per digit of the reference."""
    pairs = [_split_tokens(tokenizer, r) for r in rows]
    positions = [_digit_positions(tokenizer, ans) for _, ans in pairs]
    generated: list[list[int]] = [[] for _ in pairs]
    correct = 0
    # Group by answer length so each batch decodes exactly its answers' length.
    by_len: dict[int, list[int]] = {}
    for i, (_, ans) in enumerate(pairs):
        by_len.setdefault(len(ans), []).append(i)
    for n_ans, idx in sorted(by_len.items()):
        prompts = [pairs[i][0] for i in idx]
        gens = greedy_generate(model, prompts, n_ans, device=device, batch_size=batch_size)
        correct += sum(gen == pairs[i][1] for i, gen in zip(idx, gens))
        for i, gen in zip(idx, gens):
            generated[i] = list(gen)
    n = len(rows)
    return {
        "accuracy": correct / n if n else 0.0,
        "digit_accuracy": digit_accuracy(generated, [a for _, a in pairs], positions),
        "answer_loss": answer_loss(model, pairs, positions, device, batch_size),
        "n": n,
    }


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
        model, prompts, max_new_tokens, tokenizer.eos_id, device=device, batch_size=batch_size
    )
    exact = valid = parsed = 0
    by_edges: dict[int, list[int]] = {}  # shortest-path length in edges -> [queries, valid]
    for row, gen in zip(rows, gens):
        # Keep the first line only: a model may run on past the answer without an EOS.
        path = parse_path(tokenizer.decode(gen).split("\n")[0])
        ref = parse_path(row["answer"])
        ok = is_valid_shortest_path(row["edges"], int(row["n"]), row["src"], row["dst"], path)
        parsed += path is not None
        exact += path is not None and path == ref
        valid += ok
        tally = by_edges.setdefault(len(ref) - 1, [0, 0])
        tally[0] += 1
        tally[1] += ok
    n = max(len(rows), 1)  # an empty test set scores 0, not a ZeroDivisionError
    return {
        "exact_match": exact / n,
        "valid_shortest_path": valid / n,
        "parsed": parsed / n,
        "nodes": int(rows[0]["n"]) if rows else None,
        "n": len(rows),
        "valid_by_edges": {
            str(k): {"n": q, "valid": v / q} for k, (q, v) in sorted(by_edges.items())
        },
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
        config = _task_config(data_dir)
        seed = {"seed": int(config["seed"])} if "seed" in config else {}
        if task == "phonebook":
            res = eval_phonebook(model, tokenizer, rows, device, batch_size)
            return {"phonebook": {"book_size": int(config["size"]), **seed, **res}}
        res = eval_shortest_path(model, tokenizer, rows, device, batch_size)
        return {"shortest_path": {**res, **seed}}
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
