"""Synthetic tasks of the paper, generated deterministically from a seed.

- `phonebook`: memorise unique (5-letter name, 8-digit number) pairs; recall by name.
- `shortest_path`: edge list of a random graph + a query -> a shortest path.
- `memorization`: Gaussian sequences with random +-1 labels (tensors, no tokenizer).
- `length2_path`: the edges at s and d of a graph -> is there a path s-v-d? (tensors, with
  held-out test graphs; the paper's reasoning theory task).

`writer` holds the common output of the text tasks (jsonl, char tokenizer, token shards,
manifest written last); each module's docstring records its format and choices. CLI:
`python -m data_prep synthetic <task> --out DIR --size N --seed S` (see `cli.py`).

For eval: `writer.load_test_set(DIR)` (rows with prompt, answer, prompt_tokens, ...),
`writer.load_prompt_lengths(DIR)` (per test shard document), and for shortest path
`shortest_path.parse_path` + `shortest_path.is_valid_shortest_path`; for memorization
`memorization.load_memorization(DIR)`, for the length-2 path
`length2_path.load_length2_path(DIR, split)` (the tensor layout: `tensors.py`).
"""
