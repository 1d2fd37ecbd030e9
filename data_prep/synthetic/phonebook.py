"""Phone-book task: memorise a book of (name, number) pairs, then recall numbers by name.

Choices (the paper gives sizes 1e5..3e6, 5-letter names, 8-digit numbers, both unique, and
1,000 test queries from the training book; the rest is ours):

- Names: unique strings of 5 lowercase letters a-z (26^5 = 11,881,376 possible), so
  `size` may not exceed 26^5. Numbers: unique strings of 8 digits 0-9; a leading 0 is
  allowed (10^8 possible) because nothing here is a real phone number.
- Sampling: integer codes drawn uniformly without replacement (`_unique_codes`), then turned
  into characters arithmetically, column by column; no Python loop over entries.
- Train: the whole book, one entry per document: "abcde: 01234567" + EOS (15 characters,
  16 tokens). The manifest sets `task.train_packing: document`, so `python -m pretrain`
  (data.packing=auto) trains each entry as its own sample at position 0, padded, with the
  padding out of the loss: exactly the context the eval asks in (the paper trains the book
  as an LM and prompts with the name; packed windows would show most entries only after
  other entries and an EOS, a context the eval never uses). Test: `num_test` distinct
  entries of the book, prompt "abcde:" at position 0, answer " 01234567"; score an exact
  match of the answer, the digits right, and the loss of the answer.
- Seeds: the book comes from stream (seed, 0) and the test draw from (seed, 1), so changing
  `num_test` does not change the book.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.synthetic.writer import (
    DEFAULT_SHARD_TOKENS,
    EOS_TOKEN,
    SYNTHETIC_FORMAT_VERSION,
    CharEncoder,
    jsonl_line,
    write_text_task,
)
from data_prep.tokenizer import char_tokenizer
from mop.errors import ConfigError
from mop.progress import progress

TASK = "phonebook"
NAME_LETTERS = 5
NUMBER_DIGITS = 8
NAME_SPACE = 26**NAME_LETTERS
NUMBER_SPACE = 10**NUMBER_DIGITS
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789: "
SEPARATOR = ": "  # between name and number; the prompt ends at ":"
TRAIN_PACKING = "document"  # one entry per training sample, at position 0 (see above)
_CHUNK = 1 << 18  # entries per write batch: bounds memory (~30 MB) without slowing down


@dataclass(frozen=True)
class PhonebookConfig:
    size: int
    seed: int = 0
    num_test: int | None = None  # None: min(1000, size); the test set is drawn from the book
    shard_tokens: int = DEFAULT_SHARD_TOKENS

    def __post_init__(self) -> None:
        if self.num_test is None:  # a small book must not be refused for its default test set
            object.__setattr__(self, "num_test", min(1000, self.size))

    def validate(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"--size must be positive, got {self.size}")
        if self.size > NAME_SPACE:
            raise ConfigError(
                f"--size {self.size} exceeds the {NAME_SPACE:,} distinct 5-letter names"
            )
        if not 0 < self.num_test <= self.size:
            raise ConfigError(f"--num-test must be in 1..size ({self.size}), got {self.num_test}")
        if self.shard_tokens <= 0:
            raise ConfigError(f"--shard-tokens must be positive, got {self.shard_tokens}")

    def to_json(self) -> dict:
        return {
            "task": TASK,
            "format_version": SYNTHETIC_FORMAT_VERSION,
            **asdict(self),
            "name_letters": NAME_LETTERS,
            "number_digits": NUMBER_DIGITS,
            "number_leading_zero": True,
            "document": "one entry per document: '<name>: <number>' + EOS",
            "train_packing": TRAIN_PACKING,
            "test_prompt": "'<name>:'",
            "test_answer": "' <number>'",
        }


def _unique_codes(rng: np.random.Generator, space: int, size: int) -> np.ndarray:
    """`size` distinct integers in [0, space), in random order, without materialising space."""
    if size > space // 4:
        # Dense case: a permutation costs 8 bytes x space (95 MB for all names) but no retries.
        return rng.permutation(space)[:size].astype(np.int64)
    # Sparse case: draw with replacement and keep first occurrences; retries are rare.
    codes = np.zeros(0, dtype=np.int64)
    while len(codes) < size:
        extra = size - len(codes)
        draw = rng.integers(0, space, size=extra + extra // 8 + 16, dtype=np.int64)
        allc = np.concatenate([codes, draw])
        _, first = np.unique(allc, return_index=True)
        codes = allc[np.sort(first)]
    return codes[:size]


def _code_chars(codes: np.ndarray, base: int, width: int, first: str) -> np.ndarray:
    """Integer codes -> [len, width] uint8 characters, most significant digit first."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((codes[:, None] // powers) % base + ord(first)).astype(np.uint8)


def generate_book(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(names [size, 5] uint8 'a'-'z', numbers [size, 8] uint8 '0'-'9'), all unique."""
    rng = np.random.default_rng([seed, 0])
    names = _code_chars(_unique_codes(rng, NAME_SPACE, size), 26, NAME_LETTERS, "a")
    numbers = _code_chars(_unique_codes(rng, NUMBER_SPACE, size), 10, NUMBER_DIGITS, "0")
    return names, numbers


def query_indices(size: int, num_test: int, seed: int) -> np.ndarray:
    """Book rows queried at test time: distinct, in random order."""
    return np.random.default_rng([seed, 1]).choice(size, size=num_test, replace=False)


def _line_template(test: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Render one placeholder row with json.dumps and find where the characters go, so the
    # bytes equal jsonl_line() of the same row without calling it 3e6 times.
    name, number = "N" * NAME_LETTERS, "D" * NUMBER_DIGITS
    row = {"prompt": name + ":", "answer": " " + number, "text": name + SEPARATOR + number}
    if test:
        row["prompt_tokens"] = NAME_LETTERS + 1
    line = np.frombuffer(jsonl_line(row).encode("ascii"), dtype=np.uint8)
    name_pos = np.flatnonzero(line == ord("N")).reshape(-1, NAME_LETTERS)
    number_pos = np.flatnonzero(line == ord("D")).reshape(-1, NUMBER_DIGITS)
    return line, name_pos, number_pos


def _batch(
    names: np.ndarray, numbers: np.ndarray, enc: CharEncoder, test: bool
) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray | None]:
    n = len(names)
    template, name_pos, number_pos = _line_template(test)
    lines = np.tile(template, (n, 1))
    for cols in name_pos:
        lines[:, cols] = names
    for cols in number_pos:
        lines[:, cols] = numbers
    sep = np.frombuffer(SEPARATOR.encode("ascii"), dtype=np.uint8)
    text = np.concatenate([names, np.tile(sep, (n, 1)), numbers], axis=1)
    ids = enc.encode_fixed(text)
    doc_lengths = np.full(n, ids.shape[1], dtype=np.int64)
    prompt = np.full(n, NAME_LETTERS + 1, dtype=np.int64) if test else None
    return lines.tobytes(), ids.reshape(-1), doc_lengths, prompt


def write_phonebook(out_dir: str | os.PathLike, cfg: PhonebookConfig) -> dict:
    """Generate the book and its test queries into `out_dir`; returns the manifest."""
    cfg.validate()
    names, numbers = generate_book(cfg.size, cfg.seed)
    tok = char_tokenizer(ALPHABET, EOS_TOKEN)
    enc = CharEncoder(tok, ALPHABET)

    def train() -> Iterator[tuple]:
        with progress(total=cfg.size, desc="phonebook train", unit="entry") as bar:
            for lo in range(0, cfg.size, _CHUNK):
                hi = min(lo + _CHUNK, cfg.size)
                yield _batch(names[lo:hi], numbers[lo:hi], enc, test=False)
                bar.update(hi - lo)

    def test() -> Iterator[tuple]:
        idx = query_indices(cfg.size, cfg.num_test, cfg.seed)
        yield _batch(names[idx], numbers[idx], enc, test=True)

    return write_text_task(
        out_dir,
        TASK,
        cfg.to_json(),
        tok,
        {"train": train(), "test": test()},
        cfg.shard_tokens,
        train_packing=TRAIN_PACKING,
    )


def parse_book(jsonl_path: str | os.PathLike) -> dict[str, str]:
    """name -> number from a train.jsonl (for checks and eval; loads the whole book)."""
    book = {}
    with open(jsonl_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            book[row["prompt"][:-1]] = row["answer"].strip()
    return book
