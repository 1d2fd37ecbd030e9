"""Synthetic-task evaluation with oracle models on data from the real generators."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import pytest
import torch
from torch import nn

from data_prep.synthetic.cli import main as synthetic_cli
from data_prep.synthetic.shortest_path import is_valid_shortest_path, parse_path
from data_prep.synthetic.writer import load_test_set
from data_prep.tokenizer import load_tokenizer_dir
from eval.generate import batches, greedy_generate
from eval.synthetic import detect_task, digit_accuracy, max_book_size_at, run_synthetic
from mop.errors import DataError


class LookupLM(nn.Module):
    """Causal oracle: one-hot logits on the token that follows the prefix in `sequences`.

    Only the prefix up to each position is read, so right padding after it changes nothing
    (as in a real causal LM). Unknown prefixes predict token 0.
    """

    def __init__(self, sequences: list[list[int]], vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.table = {tuple(s[:t]): s[t] for s in sequences for t in range(1, len(s))}
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab_size)
        rows = input_ids.tolist()
        for i in range(b):
            for j in range(t):
                logits[i, j, self.table.get(tuple(rows[i][: j + 1]), 0)] = 1.0
        return logits


def _gen(*args: str) -> None:
    assert synthetic_cli(list(args)) == 0


@pytest.fixture(scope="module")
def book_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pb") / "book"
    _gen("phonebook", "--out", str(out), "--size", "200", "--num-test", "50")
    return out


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp") / "graphs"
    _gen(
        "shortest-path",
        "--out",
        str(out),
        "--size",
        "50",
        "--num-test",
        "30",
        "--nodes",
        "10",
        "--edge-prob",
        "0.3",
    )
    return out


def _oracle(tok, rows: list[dict], answer_of) -> LookupLM:
    seqs = [tok.encode(r["prompt"] + answer_of(r)) + [tok.eos_id] for r in rows]
    return LookupLM(seqs, tok.vocab_size)


def _shift_digits(answer: str) -> str:
    return "".join(str((int(c) + 1) % 10) if c.isdigit() else c for c in answer)


def test_phonebook_oracle_scores_one_and_wrong_model_zero(book_dir: Path) -> None:
    tok = load_tokenizer_dir(book_dir)
    rows = load_test_set(book_dir)
    assert detect_task(book_dir) == "phonebook"
    oracle = _oracle(tok, rows, lambda r: r["answer"])
    res = run_synthetic(oracle, tok, str(book_dir), None, "cpu")
    # One-hot logits of 1.0 on the right token: loss -log(e / (e + V - 1)) per digit.
    oracle_loss = -math.log(math.e / (math.e + tok.vocab_size - 1))
    assert res == {
        "phonebook": {
            "book_size": 200,
            "seed": 0,  # the data seed (config.json): a report tells a grid's seeds apart
            "accuracy": 1.0,
            "digit_accuracy": 1.0,
            "answer_loss": pytest.approx(oracle_loss),
            "n": 50,
        }
    }
    # Equal-length prompts: one batch of 50 decodes 9 answer tokens in 9 forwards, and one
    # teacher-forced forward scores the loss.
    assert oracle.calls == 9 + 1

    wrong = _oracle(tok, rows, lambda r: _shift_digits(r["answer"]))
    res = run_synthetic(wrong, tok, str(book_dir), None, "cpu")["phonebook"]
    assert res["accuracy"] == 0.0 and res["digit_accuracy"] == 0.0
    # the reference digit gets logit 0 beside the model's 1: -log(1 / (e + V - 1))
    assert res["answer_loss"] == pytest.approx(math.log(math.e + tok.vocab_size - 1))


def test_phonebook_one_wrong_digit_is_wrong_and_limit(book_dir: Path) -> None:
    tok = load_tokenizer_dir(book_dir)
    rows = load_test_set(book_dir)
    # The last digit wrong for the first 10 rows only: exact match of all 8 digits needed.
    flip = {r["prompt"] for r in rows[:10]}
    model = _oracle(
        tok,
        rows,
        lambda r: (
            r["answer"][:-1] + _shift_digits(r["answer"][-1])
            if r["prompt"] in flip
            else r["answer"]
        ),
    )
    res = run_synthetic(model, tok, book_dir, None, "cpu", batch_size=7)["phonebook"]
    assert res["accuracy"] == pytest.approx(40 / 50)
    assert res["digit_accuracy"] == pytest.approx(1 - 10 / (50 * 8))  # 10 of 400 digits wrong
    res = run_synthetic(model, tok, book_dir, 20, "cpu")["phonebook"]
    assert res["n"] == 20 and res["accuracy"] == pytest.approx(10 / 20)


def test_digit_accuracy_counts_positions_and_short_generations() -> None:
    answers = [[9, 1, 2, 3], [9, 4, 5, 6]]  # token 9 is the space: not scored
    positions = [[1, 2, 3], [1, 2, 3]]
    # row 0: 2 of 3 digits right; row 1: cut short after one digit (the rest count wrong)
    assert digit_accuracy([[9, 1, 2, 0], [9, 4]], answers, positions) == pytest.approx(3 / 6)
    assert digit_accuracy([[0, 1, 2, 3], [9, 4, 5, 6]], answers, positions) == 1.0


def _all_shortest_paths(edges: list[list[int]], n: int, src: int, dst: int) -> list[list[int]]:
    adj: dict[int, list[int]] = {v: [] for v in range(n)}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    dist = {dst: 0}
    queue = deque([dst])
    while queue:
        v = queue.popleft()
        for w in adj[v]:
            if w not in dist:
                dist[w] = dist[v] + 1
                queue.append(w)

    def paths_from(v: int) -> list[list[int]]:
        if v == dst:
            return [[v]]
        return [
            [v, *p] for w in sorted(adj[v]) if dist.get(w) == dist[v] - 1 for p in paths_from(w)
        ]

    return paths_from(src)


def _path_text(path: list[int]) -> str:
    return " " + " ".join(map(str, path))


def test_shortest_path_accepts_any_valid_shortest_path(graph_dir: Path) -> None:
    tok = load_tokenizer_dir(graph_dir)
    rows = load_test_set(graph_dir)
    assert detect_task(graph_dir) == "shortest_path"
    alternative: dict[str, str] = {}
    for r in rows:
        paths = _all_shortest_paths(r["edges"], r["n"], r["src"], r["dst"])
        ref = parse_path(r["answer"])
        assert ref in paths
        others = [p for p in paths if p != ref]
        alternative[r["prompt"]] = _path_text(others[-1] if others else ref)
    n_alt = sum(alternative[r["prompt"]] != r["answer"] for r in rows)
    assert n_alt > 0, "the test graphs should have some pair with several shortest paths"

    oracle = _oracle(tok, rows, lambda r: r["answer"])
    res = run_synthetic(oracle, tok, graph_dir, None, "cpu", batch_size=8)["shortest_path"]
    assert res["exact_match"] == 1.0 and res["valid_shortest_path"] == 1.0
    assert res["n"] == 30 and res["nodes"] == 10 and res["parsed"] == 1.0
    assert res["seed"] == 0

    lengths = [len(parse_path(r["answer"])) - 1 for r in rows]
    assert res["valid_by_edges"] == {
        str(k): {"n": lengths.count(k), "valid": 1.0} for k in sorted(set(lengths))
    }
    assert len(res["valid_by_edges"]) > 1, "the test graphs should have paths of several lengths"

    alt = _oracle(tok, rows, lambda r: alternative[r["prompt"]])
    res = run_synthetic(alt, tok, graph_dir, None, "cpu", batch_size=8)["shortest_path"]
    assert res["valid_shortest_path"] == 1.0
    assert res["exact_match"] == pytest.approx((30 - n_alt) / 30)


def test_shortest_path_valid_rate_by_path_length(graph_dir: Path) -> None:
    """A model that answers only the one-edge queries (the direct edge) and gets every longer
    one wrong: the overall rate is the one-edge share, the split shows where it fails."""
    tok = load_tokenizer_dir(graph_dir)
    rows = load_test_set(graph_dir)

    def direct(r: dict) -> str:
        return _path_text([r["src"], r["dst"]])

    res = run_synthetic(_oracle(tok, rows, direct), tok, graph_dir, None, "cpu")["shortest_path"]
    split = res["valid_by_edges"]
    one = sum(len(parse_path(r["answer"])) == 2 for r in rows)
    assert split["1"] == {"n": one, "valid": 1.0} and one > 0
    assert all(v["valid"] == 0.0 for k, v in split.items() if k != "1")
    assert res["valid_shortest_path"] == pytest.approx(one / len(rows))


def test_shortest_path_rejects_invalid_paths(graph_dir: Path) -> None:
    tok = load_tokenizer_dir(graph_dir)
    rows = load_test_set(graph_dir)

    def detour(r: dict) -> str:
        # A walk that leaves src along an edge and comes back: valid edges, not shortest.
        ref = parse_path(r["answer"])
        nbr = next(b if a == r["src"] else a for a, b in r["edges"] if r["src"] in (a, b))
        path = [r["src"], nbr, *ref]
        assert not is_valid_shortest_path(r["edges"], r["n"], r["src"], r["dst"], path)
        return _path_text(path)

    for make in (lambda r: _path_text(parse_path(r["answer"])[::-1]), detour, lambda r: " x"):
        model = _oracle(tok, rows, make)
        res = run_synthetic(model, tok, graph_dir, None, "cpu")["shortest_path"]
        assert res["valid_shortest_path"] == 0.0 and res["exact_match"] == 0.0


def test_batched_greedy_matches_one_by_one_on_a_real_causal_model() -> None:
    from pretrain.model.config import ModelConfig
    from pretrain.model.transformer import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=17, d_model=32, n_layers=2, n_heads=2, max_seq_len=40)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 17, (int(k),), generator=g).tolist() for k in (3, 9, 5, 9, 12, 1)]
    batched = greedy_generate(model, prompts, 6, batch_size=4)
    single = [greedy_generate(model, [p], 6)[0] for p in prompts]
    assert batched == single and all(len(s) == 6 for s in single)
    # The KV-cache decoder agrees with re-running the whole sequence (the non-causal path).
    assert greedy_generate(_Uncached(model), prompts, 6, batch_size=4) == single
    # Generation is cut at max_seq_len: 12 + 30 > 40.
    assert len(greedy_generate(model, [prompts[4]], 30)[0]) == 28


def test_non_causal_transformer_decodes_by_recomputing_the_whole_sequence() -> None:
    from pretrain.model.config import ModelConfig
    from pretrain.model.transformer import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=17, d_model=32, n_layers=2, n_heads=2, causal=False, ffn="soft_moe"
    )
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 17, (int(k),), generator=g).tolist() for k in (4, 7, 4, 7)]

    def by_hand(prompt: list[int]) -> list[int]:
        # Every new token changes the whole sequence's states: re-run it from scratch.
        ids = list(prompt)
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt) :]

    with torch.no_grad():
        want = [by_hand(p) for p in prompts]
    assert greedy_generate(model, prompts, 5, batch_size=4) == want


class _Uncached(nn.Module):
    """The same causal model seen as a plain ids -> logits module (no KV cache to use)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def test_non_causal_models_only_batch_equal_lengths() -> None:
    lengths = [5, 3, 5, 3, 7, 5]
    assert [sorted(b) for b in batches(lengths, 10, equal_lengths=True)] == [[1, 3], [0, 2, 5], [4]]
    assert [len(b) for b in batches(lengths, 4, equal_lengths=False)] == [4, 2]


def test_memorization_eval_with_an_oracle_classifier(tmp_path: Path) -> None:
    from data_prep.synthetic.memorization import load_memorization

    out = tmp_path / "mem"
    _gen("memorization", "--out", str(out), "--size", "40", "--seq-len", "4", "--dim", "3")
    x, y = load_memorization(out)
    lookup = {float(xi[0, 0]): int(yi) for xi, yi in zip(x, y)}

    class Oracle(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return torch.tensor([2.0 * lookup[float(v)] for v in xb[:, 0, 0]])

    assert run_synthetic(Oracle(), None, out, None, "cpu") == {
        "memorization": {"accuracy": 1.0, "n": 40}
    }
    flipped = run_synthetic(nn.Sequential(Oracle(), _Neg()), None, out, 10, "cpu")
    assert flipped == {"memorization": {"accuracy": 0.0, "n": 10}}


class _Neg(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_unfinished_dir_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest"):
        detect_task(tmp_path)


def test_max_book_size_at() -> None:
    def doc(size: int, acc: float) -> dict:
        return {"synthetic": {"phonebook": {"book_size": size, "accuracy": acc, "n": 1000}}}

    sweep = [doc(100_000, 0.99), doc(300_000, 0.95), doc(1_000_000, 0.5), doc(500_000, 0.9)]
    assert max_book_size_at(sweep) == 500_000  # exactly at the threshold counts
    assert max_book_size_at(sweep, threshold=0.96) == 100_000
    assert max_book_size_at(sweep, threshold=0.999) is None
    assert max_book_size_at([]) is None
    # Bare sections and documents without a phone-book section mix freely.
    mixed = [{"book_size": 2_000_000, "accuracy": 0.97}, {"synthetic": {}}, {"tasks": {}}]
    assert max_book_size_at(mixed + sweep) == 2_000_000


def test_real_untrained_model_runs_on_both_text_tasks(book_dir: Path, graph_dir: Path) -> None:
    from pretrain.model.config import ModelConfig
    from pretrain.model.transformer import build_model

    torch.manual_seed(0)
    for data_dir in (book_dir, graph_dir):
        tok = load_tokenizer_dir(data_dir)
        cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2)
        model = build_model(cfg).train()
        res = run_synthetic(model, tok, data_dir, 8, "cpu")
        (metrics,) = res.values()
        assert metrics["n"] == 8 and model.training  # the mode is restored
        skip = ("n", "nodes", "book_size", "answer_loss", "seed")
        assert all(
            0.0 <= v <= 1.0 for k, v in metrics.items() if k not in (*skip, "valid_by_edges")
        )
        for split in metrics.get("valid_by_edges", {}).values():
            assert 0.0 <= split["valid"] <= 1.0 and split["n"] >= 1
        if "answer_loss" in metrics:  # an untrained model is close to a uniform guess
            assert abs(metrics["answer_loss"] - math.log(tok.vocab_size)) < 0.5
