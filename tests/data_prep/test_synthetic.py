"""Synthetic tasks: determinism, correctness of every example, shards, CLI errors."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import ShardReader, ShardWriter, verify_shard
from data_prep.synthetic import memorization, phonebook, shortest_path, writer
from data_prep.synthetic.cli import add_parser
from data_prep.synthetic.length2_path import (
    Length2PathConfig,
    graph_edges,
    load_length2_path,
    write_length2_path,
)
from data_prep.synthetic.memorization import MemorizationConfig, load_memorization
from data_prep.synthetic.phonebook import PhonebookConfig, write_phonebook
from data_prep.synthetic.shortest_path import (
    ShortestPathConfig,
    all_pairs_distances,
    calibrate_edge_probability,
    is_valid_shortest_path,
    parse_path,
    write_shortest_path,
)
from data_prep.tokenizer import load_tokenizer_dir
from mop.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _floyd_warshall(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    inf = 10**9
    d = np.full((n, n), inf, dtype=np.int64)
    np.fill_diagonal(d, 0)
    for i, j in edges:
        d[i, j] = d[j, i] = 1
    for k in range(n):
        d = np.minimum(d, d[:, k : k + 1] + d[k : k + 1, :])
    d[d >= inf] = -1
    return d


def _parse_prompt(prompt: str) -> tuple[list[tuple[int, int]], int, int]:
    m = re.fullmatch(r"((?:\d+-\d+ )*)\| (\d+)>(\d+) =", prompt)
    assert m, prompt
    edges = [tuple(map(int, e.split("-"))) for e in m.group(1).split()]
    return edges, int(m.group(2)), int(m.group(3))


def _check_shards(out: Path) -> None:
    """Every shard verifies and decodes back to the jsonl `text` of its split, in order."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "mop-shards-v1"
    tok = load_tokenizer_dir(out)
    assert manifest["tokenizer"]["sha256"] == tok.hash
    for split in ("train", "test"):
        rows = writer.read_jsonl(out / f"{split}.jsonl")
        recs = [r for r in manifest["shards"] if r["split"] == split]
        assert [r["path"] for r in recs] == [
            f"shards/{split}/part-{k:05d}" for k in range(len(recs))
        ]
        decoded = []
        for rec in recs:
            verify_shard(out / rec["path"], rec)
            reader = ShardReader(out / rec["path"], rec["dtype"])
            for i in range(len(reader)):
                doc = reader.document(i)
                assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
                decoded.append(tok.decode(doc[:-1]))
        assert decoded == [r["text"] for r in rows]
        for r in rows:
            assert r["text"] == r["prompt"] + r["answer"]
    test_rows = writer.load_test_set(out)
    lengths = writer.load_prompt_lengths(out)
    assert lengths.tolist() == [r["prompt_tokens"] for r in test_rows]
    assert all(len(tok.encode(r["prompt"])) == r["prompt_tokens"] for r in test_rows)


# -- phone-book ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def book_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    write_phonebook(out, PhonebookConfig(size=3000, seed=7, num_test=200))
    return out


def test_phonebook_entries_unique_and_well_formed(book_dir: Path) -> None:
    rows = writer.read_jsonl(book_dir / "train.jsonl")
    assert len(rows) == 3000
    names = [r["prompt"][:-1] for r in rows]
    numbers = [r["answer"][1:] for r in rows]
    assert all(re.fullmatch(r"[a-z]{5}:", r["prompt"]) for r in rows)
    assert all(re.fullmatch(r" [0-9]{8}", r["answer"]) for r in rows)
    assert len(set(names)) == len(names) and len(set(numbers)) == len(numbers)


def test_phonebook_test_queries_come_from_book(book_dir: Path) -> None:
    book = phonebook.parse_book(book_dir / "train.jsonl")
    test_rows = writer.load_test_set(book_dir)
    assert len(test_rows) == 200
    assert len({r["prompt"] for r in test_rows}) == 200  # distinct queries
    for r in test_rows:
        assert book[r["prompt"][:-1]] == r["answer"].strip()
        assert r["prompt_tokens"] == 6


def test_phonebook_shards_decode_to_text(book_dir: Path) -> None:
    _check_shards(book_dir)
    cfg = json.loads((book_dir / "config.json").read_text())
    assert cfg["task"] == "phonebook" and cfg["size"] == 3000 and cfg["seed"] == 7


def test_phonebook_deterministic_and_seed_dependent(tmp_path: Path, book_dir: Path) -> None:
    again = tmp_path / "again"
    write_phonebook(again, PhonebookConfig(size=3000, seed=7, num_test=200))
    assert _files(again) == _files(book_dir)
    other = tmp_path / "other"
    write_phonebook(other, PhonebookConfig(size=3000, seed=8, num_test=200))
    assert (other / "train.jsonl").read_bytes() != (book_dir / "train.jsonl").read_bytes()


def test_phonebook_splits_shards_and_rerun_removes_stale_parts(tmp_path: Path) -> None:
    out = tmp_path / "pb"
    manifest = write_phonebook(
        out, PhonebookConfig(size=500, seed=1, num_test=50, shard_tokens=1000)
    )
    train = [r for r in manifest["shards"] if r["split"] == "train"]
    assert len(train) == 9  # 16 tokens a document: 62 fit in 1,000 tokens; ceil(500 / 62)
    assert all(r["tokens"] <= 1000 for r in train)
    assert sum(r["documents"] for r in train) == 500
    _check_shards(out)
    write_phonebook(out, PhonebookConfig(size=500, seed=1, num_test=50))  # one shard now
    assert sorted(p.name for p in (out / "shards" / "train").iterdir()) == [
        "part-00000.bin",
        "part-00000.idx",
    ]
    _check_shards(out)


def test_unique_codes_sparse_and_dense_paths() -> None:
    rng = np.random.default_rng(0)
    for space, size in ((10**8, 5000), (1000, 900), (1000, 1000)):
        codes = phonebook._unique_codes(rng, space, size)
        assert len(codes) == size == len(np.unique(codes))
        assert codes.min() >= 0 and codes.max() < space


def test_phonebook_config_errors() -> None:
    for kw in ({"size": 0}, {"size": 26**5 + 1}, {"size": 10, "num_test": 11}):
        with pytest.raises(ConfigError):
            PhonebookConfig(**kw).validate()


def test_killed_run_leaves_no_manifest_and_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "pb"
    write_phonebook(out, PhonebookConfig(size=100, seed=0, num_test=10))
    assert (out / "manifest.json").is_file()

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(phonebook, "query_indices", boom)  # fails after train is written
    with pytest.raises(RuntimeError):
        write_phonebook(out, PhonebookConfig(size=200, seed=0, num_test=10))
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# -- shards --------------------------------------------------------------------------------------


def test_batch_shard_writer_matches_per_document_add(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=int(k)) for k in rng.integers(1, 20, size=30)]
    one = ShardWriter(tmp_path / "one", np.uint16)
    for d in docs:
        one.add(d)
    rec_one = one.finish()
    many = ShardWriter(tmp_path / "many", np.uint16)
    many.add_batch(np.concatenate(docs[:10]), np.array([len(d) for d in docs[:10]]))
    many.add_batch(np.concatenate(docs[10:]), np.array([len(d) for d in docs[10:]]))
    rec_many = many.finish()
    assert {k: v for k, v in rec_one.items() if k != "name"} == {
        k: v for k, v in rec_many.items() if k != "name"
    }


# -- shortest path -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs")
    write_shortest_path(
        out, ShortestPathConfig(size=400, seed=3, num_test=100, nodes=12, edge_prob=0.2)
    )
    return out


def test_shortest_path_answers_are_shortest_paths(graph_dir: Path) -> None:
    for split in ("train", "test"):
        for row in writer.read_jsonl(graph_dir / f"{split}.jsonl"):
            edges, src, dst = _parse_prompt(row["prompt"])
            assert edges == sorted(set(edges)) and all(i < j < 12 for i, j in edges)
            dist = _floyd_warshall(12, edges)
            assert src != dst and dist[src, dst] > 0  # only connected pairs are asked
            path = parse_path(row["answer"])
            assert path[0] == src and path[-1] == dst
            assert len(path) - 1 == dist[src, dst]
            assert all(dist[a, b] == 1 for a, b in itertools.pairwise(path))
            assert is_valid_shortest_path(edges, 12, src, dst, path)
            if split == "test":
                assert [tuple(e) for e in row["edges"]] == edges
                assert (row["src"], row["dst"], row["n"]) == (src, dst, 12)
                assert row["path_length"] == len(path) - 1
                assert row["prompt_tokens"] == len(row["prompt"])


def test_shortest_path_shards_and_determinism(graph_dir: Path, tmp_path: Path) -> None:
    _check_shards(graph_dir)
    cfg = json.loads((graph_dir / "config.json").read_text())
    assert cfg["edge_prob"] == 0.2 and cfg["nodes"] == 12 and not cfg["edge_prob_calibrated"]
    again = tmp_path / "again"
    write_shortest_path(
        again, ShortestPathConfig(size=400, seed=3, num_test=100, nodes=12, edge_prob=0.2)
    )
    assert _files(again) == _files(graph_dir)
    other = tmp_path / "other"
    write_shortest_path(
        other, ShortestPathConfig(size=400, seed=4, num_test=100, nodes=12, edge_prob=0.2)
    )
    assert (other / "train.jsonl").read_bytes() != (graph_dir / "train.jsonl").read_bytes()


def test_is_valid_shortest_path_rejects_bad_paths() -> None:
    edges = [(0, 1), (1, 2), (2, 3), (0, 4), (4, 3)]
    assert is_valid_shortest_path(edges, 5, 0, 3, [0, 4, 3])
    assert is_valid_shortest_path(edges, 5, 3, 0, [3, 4, 0])
    assert not is_valid_shortest_path(edges, 5, 0, 3, [0, 1, 2, 3])  # a path, not shortest
    assert not is_valid_shortest_path(edges, 5, 0, 3, [0, 3])  # not an edge
    assert not is_valid_shortest_path(edges, 5, 0, 3, [0, 4])  # wrong end
    assert not is_valid_shortest_path(edges, 5, 0, 3, [0, 9, 3])  # no such node
    assert not is_valid_shortest_path(edges, 5, 0, 3, None)
    assert parse_path(" 0 4 3") == [0, 4, 3] and parse_path(" 0 x") is None


def test_all_pairs_distances_match_floyd_warshall() -> None:
    rng = np.random.default_rng(5)
    n = 9
    adj = shortest_path.adjacency_from_uniforms(rng.random((40, n * (n - 1) // 2)), n, 0.25)
    dist = all_pairs_distances(adj)
    reach = shortest_path.reachability(adj)
    for g in range(40):
        i, j = np.nonzero(np.triu(adj[g], k=1))
        expected = _floyd_warshall(n, list(zip(i.tolist(), j.tolist())))
        assert (dist[g] == expected).all()
        assert (reach[g] == (expected >= 0)).all()
    targets = rng.integers(0, n, size=40)
    to = shortest_path.distances_to(adj, targets)
    assert (to == dist[np.arange(40), :, targets]).all()


def test_calibrated_mean_path_length_is_near_target() -> None:
    p = calibrate_edge_probability(30, target=3.5, seed=0, num_graphs=300)
    assert 0.03 < p < 0.2
    batch = shortest_path.sample_batch(np.random.default_rng(123), 30, p, batch=1500)
    mean = np.mean([len(path) - 1 for path in batch.paths])
    assert abs(mean - 3.5) <= 0.3, (p, mean)


def test_calibration_refuses_unreachable_target() -> None:
    with pytest.raises(ConfigError, match="no edge probability"):
        calibrate_edge_probability(8, target=3.5, num_graphs=50)
    with pytest.raises(ConfigError):
        ShortestPathConfig(size=10, nodes=2).validate()


# -- memorization --------------------------------------------------------------------------------


def test_memorization_tensors(tmp_path: Path) -> None:
    out = tmp_path / "mem"
    cfg = MemorizationConfig(size=5000, seed=2, seq_len=4, dim=3)
    manifest = memorization.write_memorization(out, cfg)
    x, y = load_memorization(out)
    assert x.shape == (5000, 4, 3) and x.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int8
    assert set(np.unique(y).tolist()) == {-1, 1}
    assert abs(float(y.mean())) < 0.05  # balanced up to sampling noise (sd ~0.014)
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02
    assert manifest["tensors"]["x"]["shape"] == [5000, 4, 3]
    again = tmp_path / "again"
    memorization.write_memorization(again, cfg)
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    memorization.write_memorization(other, MemorizationConfig(size=5000, seed=3, seq_len=4, dim=3))
    assert (other / "train_x.npy").read_bytes() != (out / "train_x.npy").read_bytes()
    with open(out / "train_y.npy", "r+b") as fh:  # corrupt one byte of the labels
        fh.seek(-1, 2)
        fh.write(b"\x05")
    with pytest.raises(DataError, match="sha256"):
        load_memorization(out)


# -- length-2 path -------------------------------------------------------------------------------


def _brute_force_path(x: np.ndarray, vertices: int) -> bool:
    """Read the graph back from its tokens (two endpoints each) and look for s - v - d."""
    adj = np.zeros((vertices, vertices), dtype=np.int64)
    for token in x[:-1]:
        ends = np.flatnonzero(token[:vertices])
        if len(ends):
            assert len(ends) == 2 and token[vertices] == 0, token  # one edge, not the query
            adj[ends[0], ends[1]] = adj[ends[1], ends[0]] = 1
    return bool((adj @ adj)[0, vertices - 1] > 0)


def _edge_set(x: np.ndarray) -> frozenset:
    return frozenset(graph_edges(x))


@pytest.mark.parametrize("vertices, size", [(8, 300), (10, 1000), (16, 1000)])
def test_length2_path_labels_match_brute_force(tmp_path: Path, vertices: int, size: int) -> None:
    out = tmp_path / "l2p"
    cfg = Length2PathConfig(size=size, seed=1, vertices=vertices, max_degree=3, num_test=40)
    write_length2_path(out, cfg)
    lo, hi = cfg.degrees
    for split in ("train", "test"):
        x, y = load_length2_path(out, split)
        assert x.shape[1:] == (2 * hi + 1, vertices + 1) and x.dtype == np.float32
        assert np.array_equal(x[:, -1, [0, vertices - 1, vertices]], np.ones((len(x), 3)))
        for row, label in zip(x, y):
            assert _brute_force_path(row, vertices) == (label == 1)
            edges = graph_edges(row)
            at_s = [e for e in edges if e[0] == 0]
            at_d = [e for e in edges if e[1] == vertices - 1]
            # every listed edge touches s or d (never both: no s-d edge), degrees in range
            assert len(at_s) + len(at_d) == len(edges) and (0, vertices - 1) not in edges
            assert lo <= len(at_s) <= hi and lo <= len(at_d) <= hi
            shared = {w for _, w in at_s} & {u for u, _ in at_d}
            assert len(shared) == (1 if label == 1 else 0)  # positives: exactly one s-v-d
            # edges come first (in random order), padding after them
            filled = x.shape[1] - 1 if len(edges) == 2 * hi else len(edges)
            assert row[:filled].any(axis=1).all() and not row[filled:-1].any()


def test_length2_path_balanced_counts_uninformative_and_held_out(tmp_path: Path) -> None:
    out = tmp_path / "l2p"
    write_length2_path(out, Length2PathConfig(size=10000, seed=0, vertices=16, num_test=500))
    x, y = load_length2_path(out, "train")
    xt, yt = load_length2_path(out, "test")
    assert int((y == 1).sum()) == 5000 and int((yt == 1).sum()) == 250  # exactly balanced
    # Edge counts say nothing: the best rule on (deg s, deg d) alone is near chance. (In a
    # G(n, p) graph with balanced labels it would be right 72% of the time at |V| = 16.)
    deg_s = x[:, :-1, 0].sum(axis=1).astype(int)
    deg_d = x[:, :-1, 15].sum(axis=1).astype(int)
    right = 0
    for a, b in {(a, b) for a, b in zip(deg_s, deg_d)}:
        sel = (deg_s == a) & (deg_d == b)
        right += max(int((y[sel] == 1).sum()), int((y[sel] == -1).sum()))
    assert right / len(y) < 0.53, right / len(y)
    # The shared vertex is uniform over the middle vertices: none of them marks the positives.
    shared = []
    for row in x[y == 1][:3000]:
        edges = graph_edges(row)
        (v,) = {w for u, w in edges if u == 0} & {u for u, w in edges if w == 15}
        shared.append(v)
    counts = np.bincount(shared, minlength=15)[1:]
    assert counts.min() > 0.7 * counts.mean(), counts
    # Held out: test graphs are distinct and none is a training graph (as an edge set).
    train_sets = {_edge_set(row) for row in x}
    test_sets = [_edge_set(row) for row in xt]
    assert len(set(test_sets)) == len(test_sets)
    assert not train_sets.intersection(test_sets)


def test_length2_path_deterministic_by_seed(tmp_path: Path) -> None:
    cfg = Length2PathConfig(
        size=5000, seed=4, vertices=12, min_degree=1, max_degree=3, num_test=100
    )
    write_length2_path(tmp_path / "a", cfg)
    write_length2_path(tmp_path / "b", cfg)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    write_length2_path(
        tmp_path / "c", Length2PathConfig(size=5000, seed=5, vertices=12, num_test=100)
    )
    for name in ("train_x.npy", "test_x.npy"):
        assert (tmp_path / "c" / name).read_bytes() != (tmp_path / "a" / name).read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["splits"] == {"train": ["x", "y"], "test": ["test_x", "test_y"]}
    assert (
        manifest["task"]["config"]["min_degree"] == 1
        and manifest["task"]["config"]["max_degree"] == 3
    )
    with open(tmp_path / "a" / "test_y.npy", "r+b") as fh:  # corrupt one label
        fh.seek(-1, 2)
        fh.write(b"\x05")
    with pytest.raises(DataError, match="sha256"):
        load_length2_path(tmp_path / "a", "test")
    with pytest.raises(DataError, match="not a length-2-path"):
        load_length2_path(_memorization_dir(tmp_path / "m"))


def _memorization_dir(out: Path) -> Path:
    memorization.write_memorization(out, MemorizationConfig(size=10, seq_len=2, dim=3))
    return out


def test_length2_path_refuses_what_cannot_be_held_out(tmp_path: Path) -> None:
    # |V| = 6, degrees 1..2: a few dozen distinct graphs; 200 held-out ones cannot exist
    cfg = Length2PathConfig(size=2000, vertices=6, min_degree=1, max_degree=2, num_test=200)
    with pytest.raises(ConfigError, match="too few distinct graphs"):
        write_length2_path(tmp_path / "l2p", cfg)
    assert not (tmp_path / "l2p" / "manifest.json").exists()


# -- CLI -----------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep.synthetic.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help() -> None:
    for args in ((), ("phonebook",), ("shortest-path",), ("memorization",), ("length2-path",)):
        res = _cli(*args, "--help")
        assert res.returncode == 0, res.stderr
        assert "--out" in res.stdout or "phonebook" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("phonebook", "--size", "0"), "--size must be positive"),
        (("phonebook", "--size", "2e7"), "exceeds"),
        (("phonebook", "--size", "ten"), "whole number"),
        (("phonebook", "--size", "10", "--num-test", "20"), "--num-test"),
        (("shortest-path", "--size", "10", "--nodes", "2"), "--nodes"),
        (("shortest-path", "--size", "10", "--nodes", "8"), "no edge probability"),
        (("shortest-path", "--size", "10", "--edge-prob", "1.5"), "--edge-prob"),
        (("memorization", "--size", "10", "--dim", "0"), "--dim"),
        (("length2-path", "--size", "10", "--vertices", "8"), "--max-degree 4 is too large"),
        (("length2-path", "--size", "10", "--vertices", "3"), "--vertices must be >= 4"),
        (("length2-path", "--size", "10", "--min-degree", "5"), "--min-degree"),
        (("length2-path", "--size", "10", "--num-test", "0"), "--num-test must be positive"),
    ],
)
def test_cli_bad_args_give_one_line_error(tmp_path: Path, args, message) -> None:
    res = _cli(*args, "--out", str(tmp_path / "o"))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_cli_runs_a_task(tmp_path: Path) -> None:
    out = tmp_path / "sp"
    res = _cli("shortest-path", "--out", str(out), "--size", "50", "--num-test", "5",
               "--nodes", "10", "--edge-prob", "0.3", "--seed", "1")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "train: 50 examples" in res.stdout
    _check_shards(out)


def test_add_parser_registers_synthetic_subcommand(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="data_prep")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "mem"
    args = parser.parse_args(
        ["synthetic", "memorization", "--out", str(out), "--size", "1e2", "--seq-len", "2"]
    )
    assert args.func(args) == 0
    x, y = load_memorization(out)
    assert x.shape == (100, 2, 32) and y.shape == (100,)
    bad = parser.parse_args(["synthetic", "phonebook", "--out", str(out), "--size", "-1"])
    assert bad.func(bad) == 2
