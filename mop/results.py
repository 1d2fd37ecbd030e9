"""The `results.json` written beside each evaluated checkpoint, and how sections merge.

One file per checkpoint directory; each suite fills its own section, so running the suites
one by one (or on different machines) accumulates into the same file:

    {
      "schema": "mop-results-v1",
      "checkpoint": "/abs/run/checkpoints/step_00001000", "run_dir": "/abs/run", "step": 1000,
      "model": {"name": "moe_d512_e8", "ffn": "moe", "d_model": 512, "n_layers": 20,
                "num_experts": 8, "top_k": 2, "total_params": 4.0e8, "active_params": 1.4e8},
      "ppl": {"loss": 3.1, "perplexity": 22.2, "num_sequences": 5000, "seq_len": 2048},
      "tasks": {"triviaqa": {"category": "knowledge", "primary": "f1", "score": 0.12,
                             "metrics": {"f1": 0.12, "exact_match": 0.08}, "n": 17944,
                             "num_fewshot": 5,
                             "settings": {"limit": null, "num_fewshot": null,
                                          "dtype": "bfloat16", "max_gen_toks": 256},
                             "meta": {"suite": "knowledge", "date": "...", ...}}, ...},
      "categories": {"knowledge": 0.10, "commonsense": 0.45, "math": 0.03},
      "synthetic": {"phonebook": {"book_size": 100000, "accuracy": 0.93, "n": 1000},
                    "shortest_path": {"exact_match": 0.4, "valid_shortest_path": 0.5, "n": 1000},
                    "memorization": {"accuracy": 0.99, "n": 4096}},
      "meta": {"<suite>": {"date": "...", "device": "...", "limit": null, "seconds": 12.3}}
    }

`score` is the task's primary metric in [0, 1]; a category's value is the unweighted mean of
its tasks' scores (as the paper averages within a category).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mop.errors import DataError
from mop.fileio import atomic_write_json, read_json

SCHEMA = "mop-results-v1"
RESULTS_FILE = "results.json"
CATEGORIES = ("knowledge", "commonsense", "math")


def results_path(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / RESULTS_FILE


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise DataError(f"no {RESULTS_FILE} at {path}")
    data = read_json(path)
    if data.get("schema") != SCHEMA:
        raise DataError(f"{path} has schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data


def category_means(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean of the primary scores per category (categories without tasks omitted)."""
    out: dict[str, float] = {}
    for cat in CATEGORIES:
        scores = [t["score"] for t in tasks.values() if t.get("category") == cat]
        if scores:
            out[cat] = sum(scores) / len(scores)
    return out


def update_results(
    checkpoint_dir: str | os.PathLike,
    header: dict[str, Any],
    section: str,
    data: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge one suite's output into results.json atomically and return the whole document.

    `header` holds checkpoint/run_dir/step/model (refreshed every time). For `tasks` and
    `synthetic`, entries are merged key by key so suites accumulate; `categories` is
    recomputed from all tasks.
    """
    path = results_path(checkpoint_dir)
    doc: dict[str, Any] = read_json(path) if path.is_file() else {"schema": SCHEMA}
    if doc.get("schema") != SCHEMA:
        raise DataError(f"{path} has schema {doc.get('schema')!r}; move it away to re-evaluate")
    doc.update(header)
    if section in ("tasks", "synthetic"):
        doc.setdefault(section, {}).update(data)
    else:
        doc[section] = data
    doc["categories"] = category_means(doc.get("tasks", {}))
    if meta is not None:
        doc.setdefault("meta", {})[section] = meta
    atomic_write_json(path, doc)
    return doc
