"""Shortest-path task: given all edges of a random graph and two vertices, write a shortest path.

Choices (the paper gives n in 25..55, p such that the mean shortest-path length is 3.5, the
prompt lists all edges then asks for a path, 1e6 train / 1e3 test; the rest is ours):

- Graphs: Erdos-Renyi G(n, p) on nodes 0..n-1, a fresh graph per example.
- Query: an ordered pair (u, v), u != v, drawn uniformly among the pairs connected in that
  graph; a graph without any edge is skipped (re-sampled). Only connected pairs are asked.
- Answer: the lexicographically smallest shortest path (from u, always step to the smallest
  neighbour one step closer to v), i.e. BFS with sorted neighbours; deterministic.
  Eval should accept any shortest path: `is_valid_shortest_path`.
- Text (char tokenizer over "0123456789 ->|="): edges sorted, i < j, then the query:
      prompt "0-5 0-7 3-9 9-17 | 3>17 ="   answer " 3 9 17"
  Path length = number of edges on the path (here 2).
- p: `calibrate_edge_probability` picks p so that the mean, over examples, of the answer's
  path length is `target` (3.5). Because the query is uniform over a graph's connected
  pairs, that mean is E_graph[mean over its connected pairs]; we estimate it by Monte Carlo
  with common random numbers (one fixed set of uniforms thresholded at each p) and bisect
  on the branch where it decreases in p (for tiny p the graph falls apart into short
  pieces, so the curve first rises, peaks near the percolation point, then falls to 1).
  The CLI calibrates with `--calib-seed` (default 0), independent of `--seed`, so every
  data seed of one n shares one p; `--edge-prob` skips calibration. p is in config.json.
- Seeds: train examples come from stream (seed, 0), test from (seed, 1), so the test set
  does not depend on `--size`. Train/test graphs may coincide only by chance (there are
  2^(n(n-1)/2) graphs); we do not filter.
- Speed: graphs are generated in batches of 2,048: connectivity by repeated squaring of
  A + I, distances to the query's target by batched BFS (frontier @ A), path recovery
  vectorised over the batch; only string formatting is per example (~30-60 us an example
  for n = 30 on one CPU core, so 1e6 examples take about a minute). Calibration uses
  all-pairs distances (a few seconds).
- Limits: with path length counted in edges and the query uniform over connected pairs,
  the mean cannot reach 3.5 for n below about 29 (n = 25 peaks near 3.3); calibration
  then refuses with a clear error; pass --edge-prob or --target-length.
"""

from __future__ import annotations

import numbers
import os
from collections import deque
from collections.abc import Iterator, Sequence
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

TASK = "shortest_path"
ALPHABET = "0123456789 ->|="
MIN_NODES = 3
DEFAULT_NODES = 30
DEFAULT_TARGET = 3.5
_BATCH = 2048  # graphs per vectorised batch (fixed: the output must not depend on it varying)


# -- graphs and distances ------------------------------------------------------------------------


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def adjacency_from_uniforms(u: np.ndarray, n: int, p: float) -> np.ndarray:
    """[B, n(n-1)/2] uniforms -> [B, n, n] symmetric bool adjacency with edges where u < p."""
    iu, ju = _pairs(n)
    adj = np.zeros((u.shape[0], n, n), dtype=bool)
    edges = u < p
    adj[:, iu, ju] = edges
    adj[:, ju, iu] = edges
    return adj


def all_pairs_distances(adj: np.ndarray) -> np.ndarray:
    """[B, n, n] bool adjacency -> int16 hop distances, -1 where unreachable, 0 on the diagonal.

    Layered BFS from every source at once: reach_k = (reach_(k-1) @ (A + I)) > 0, and a
    node's distance is the number of layers in which it was not reached yet.
    """
    b, n, _ = adj.shape
    a = adj.astype(np.float32)
    a[:, np.arange(n), np.arange(n)] = 1.0
    r = np.broadcast_to(np.eye(n, dtype=np.float32), (b, n, n)).copy()
    dist = np.zeros((b, n, n), dtype=np.int16)
    for k in range(n):
        reached = r > 0
        dist += ~reached
        grown = np.matmul(r, a)
        if k and np.array_equal(grown > 0, reached):
            break
        r = np.minimum(grown, 1.0, out=grown)  # keep values small: counts would overflow
    dist[~reached] = -1
    return dist


def reachability(adj: np.ndarray) -> np.ndarray:
    """[B, n, n] bool: connected pairs (incl. i == i), by repeated squaring of A + I."""
    n = adj.shape[1]
    r = adj.astype(np.float32)
    r[:, np.arange(n), np.arange(n)] = 1.0
    for _ in range(max(1, int(np.ceil(np.log2(n))))):  # 2^k hops cover every path
        r = (np.matmul(r, r) > 0).astype(np.float32)
    return r > 0


def distances_to(adj: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[B, n] int16 hop distance of every node to its graph's target, -1 if unreachable."""
    b, n, _ = adj.shape
    a = adj.astype(np.float32)
    rows = np.arange(b)
    seen = np.zeros((b, n), dtype=bool)
    seen[rows, targets] = True
    dist = np.where(seen, 0, -1).astype(np.int16)
    frontier = seen.astype(np.float32)[:, None, :]
    for k in range(1, n):
        new = (np.matmul(frontier, a)[:, 0, :] > 0) & ~seen
        if not new.any():
            break
        dist[new] = k
        seen |= new
        frontier = new.astype(np.float32)[:, None, :]
    return dist


def mean_connected_path_length(dist: np.ndarray) -> tuple[float, int]:
    """Mean over graphs of the mean distance over a graph's connected ordered pairs u != v.

    Returns (mean, number of graphs with at least one connected pair). This is the expected
    answer length of the generated data (one uniform connected pair per graph).
    """
    ok = dist > 0
    pairs = ok.sum(axis=(1, 2))
    has = pairs > 0
    if not has.any():
        return 0.0, 0
    per_graph = np.where(ok, dist, 0).sum(axis=(1, 2))[has] / pairs[has]
    return float(per_graph.mean()), int(has.sum())


def calibrate_edge_probability(
    n: int,
    target: float = DEFAULT_TARGET,
    seed: int = 0,
    num_graphs: int = 2000,
    tol: float = 1e-4,
) -> float:
    """Edge probability p of G(n, p) whose mean shortest-path length (connected pairs) = target.

    Monte Carlo over `num_graphs` graphs with common random numbers; scans p on a log grid
    from 1/n to 1 to find the peak of the curve, then bisects on its falling side. Raises
    ConfigError when no p reaches `target` for this n (too few nodes).
    """
    if n < MIN_NODES:
        raise ConfigError(f"--nodes must be at least {MIN_NODES}, got {n}")
    if not target > 1.0:
        raise ConfigError(f"--target-length must be > 1 (one edge), got {target}")
    rng = np.random.default_rng([seed, 2])
    u = rng.random((num_graphs, n * (n - 1) // 2))

    def mean_length(p: float) -> float:
        return mean_connected_path_length(all_pairs_distances(adjacency_from_uniforms(u, n, p)))[0]

    grid = np.geomspace(1.0 / n, 1.0, 20)
    values = [mean_length(float(p)) for p in grid]
    peak = int(np.argmax(values))
    if values[peak] < target:
        raise ConfigError(
            f"no edge probability gives mean shortest-path length {target} with {n} nodes "
            f"(the largest is about {values[peak]:.2f}); use more --nodes, a lower "
            "--target-length, or set --edge-prob"
        )
    # First grid point past the peak at or below the target brackets the root with its left
    # neighbour; the curve ends at 1.0 for p = 1, so one exists.
    hi_i = next(i for i in range(peak, len(grid)) if values[i] <= target)
    lo, hi = float(grid[max(hi_i - 1, peak)]), float(grid[hi_i])
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if mean_length(mid) > target:
            lo = mid
        else:
            hi = mid
    return round(0.5 * (lo + hi), 6)


# -- examples ------------------------------------------------------------------------------------


@dataclass
class GraphBatch:
    """Examples of one batch (graphs without any connected pair already dropped)."""

    adj: np.ndarray  # [B, n, n] bool
    src: np.ndarray  # [B]
    dst: np.ndarray  # [B]
    paths: list[list[int]]


def sample_batch(rng: np.random.Generator, n: int, p: float, batch: int = _BATCH) -> GraphBatch:
    """`batch` graphs, a uniform connected query pair each, and the smallest shortest path."""
    adj = adjacency_from_uniforms(rng.random((batch, n * (n - 1) // 2)), n, p)
    # Uniform connected pair: the largest random key among valid (u, v), u != v.
    keys = rng.random((batch, n, n))
    keys[~reachability(adj)] = -1.0
    keys[:, np.arange(n), np.arange(n)] = -1.0
    flat = keys.reshape(batch, -1).argmax(axis=1)
    keep = keys.reshape(batch, -1)[np.arange(batch), flat] >= 0
    adj, flat = adj[keep], flat[keep]
    src, dst = flat // n, flat % n
    rows = np.arange(len(src))
    to_dst = distances_to(adj, dst)  # BFS from the target: only n^2 work per step
    length = to_dst[rows, src].astype(np.int64)
    cur = src.copy()
    steps = [cur]
    for k in range(int(length.max(initial=0))):
        # Smallest-numbered neighbour one hop closer to dst: argmax returns the first True.
        closer = adj[rows, cur] & (to_dst == (length - k - 1)[:, None])
        cur = np.where(k < length, closer.argmax(axis=1), cur)
        steps.append(cur)
    walk = np.stack(steps, axis=1).tolist()
    paths = [w[: d + 1] for w, d in zip(walk, length.tolist())]
    return GraphBatch(adj=adj, src=src, dst=dst, paths=paths)


def edge_lists(adj: np.ndarray) -> list[list[tuple[int, int]]]:
    """Sorted (i, j), i < j, edge list of each graph of a batch."""
    b, i, j = np.nonzero(np.triu(adj, k=1))  # row-major: sorted by graph, then i, then j
    bounds = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=adj.shape[0]))])
    pairs = list(zip(i.tolist(), j.tolist()))
    return [pairs[bounds[g] : bounds[g + 1]] for g in range(adj.shape[0])]


def format_prompt(edges: Sequence[tuple[int, int]], src: int, dst: int) -> str:
    """'0-5 0-7 3-9 | 3>17 =' (edges as given; the generator sorts them)."""
    return " ".join(f"{i}-{j}" for i, j in edges) + f" | {src}>{dst} ="


def _batch_prompts(adj: np.ndarray, src: np.ndarray, dst: np.ndarray) -> list[str]:
    # Same strings as format_prompt(edge_lists(...)), from a table of "i-j" labels: an
    # f-string per edge was the slowest step of generation.
    n = adj.shape[1]
    table = [f"{i}-{j}" for i in range(n) for j in range(n)]
    b, i, j = np.nonzero(np.triu(adj, k=1))
    labels = [table[c] for c in (i * n + j).tolist()]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=adj.shape[0]))]).tolist()
    return [
        " ".join(labels[bounds[g] : bounds[g + 1]]) + f" | {u}>{v} ="
        for g, (u, v) in enumerate(zip(src.tolist(), dst.tolist()))
    ]


def format_path(path: Sequence[int]) -> str:
    return " " + " ".join(str(v) for v in path)


def parse_path(answer: str) -> list[int] | None:
    """A generated answer (" 3 9 17", trailing text after a newline/EOS removed) -> nodes."""
    try:
        nodes = [int(tok) for tok in answer.split()]
    except ValueError:
        return None
    return nodes or None


def bfs_distance(edges: Sequence[Sequence[int]], n: int, src: int, dst: int) -> int | None:
    """Hop distance from src to dst, None if unreachable (plain BFS, for eval and checks)."""
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        neighbours[i].append(j)
        neighbours[j].append(i)
    dist = {src: 0}
    queue = deque([src])
    while queue:
        v = queue.popleft()
        if v == dst:
            return dist[v]
        for w in neighbours[v]:
            if w not in dist:
                dist[w] = dist[v] + 1
                queue.append(w)
    return None


def is_valid_shortest_path(
    edges: Sequence[Sequence[int]], n: int, src: int, dst: int, path: Sequence[int] | None
) -> bool:
    """True if `path` goes src -> dst along edges of the graph with the fewest possible hops."""
    if not path or path[0] != src or path[-1] != dst:
        return False
    if any(not (isinstance(v, numbers.Integral) and 0 <= v < n) for v in path):
        return False
    edge_set = {(min(i, j), max(i, j)) for i, j in edges}
    if any((min(a, b), max(a, b)) not in edge_set for a, b in zip(path, path[1:])):
        return False
    return bfs_distance(edges, n, src, dst) == len(path) - 1


# -- config and writing --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShortestPathConfig:
    size: int
    seed: int = 0
    num_test: int = 1000
    nodes: int = DEFAULT_NODES
    edge_prob: float | None = None  # None: calibrated to target_length
    target_length: float = DEFAULT_TARGET
    calib_seed: int = 0
    calib_graphs: int = 2000
    shard_tokens: int = DEFAULT_SHARD_TOKENS

    def validate(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"--size must be positive, got {self.size}")
        if self.num_test <= 0:
            raise ConfigError(f"--num-test must be positive, got {self.num_test}")
        if self.nodes < MIN_NODES:
            raise ConfigError(f"--nodes must be at least {MIN_NODES}, got {self.nodes}")
        if self.nodes > 1000:
            raise ConfigError(f"--nodes {self.nodes} is too large for dense batched BFS (<= 1000)")
        if self.edge_prob is not None and not 0.0 < self.edge_prob <= 1.0:
            raise ConfigError(f"--edge-prob must be in (0, 1], got {self.edge_prob}")
        if self.calib_graphs <= 0:
            raise ConfigError(f"--calib-graphs must be positive, got {self.calib_graphs}")
        if self.shard_tokens <= 0:
            raise ConfigError(f"--shard-tokens must be positive, got {self.shard_tokens}")

    def resolve_edge_prob(self) -> float:
        if self.edge_prob is not None:
            return float(self.edge_prob)
        return calibrate_edge_probability(
            self.nodes, self.target_length, self.calib_seed, self.calib_graphs
        )


def _split_batches(
    rng: np.random.Generator, count: int, n: int, p: float, enc: CharEncoder, test: bool, desc: str
) -> Iterator[tuple]:
    done, empty = 0, 0
    with progress(total=count, desc=desc, unit="ex") as bar:
        while done < count:
            gb = sample_batch(rng, n, p)
            take = min(len(gb.paths), count - done)
            empty = 0 if take else empty + 1
            if empty >= 50:  # not one edge in 100k graphs: p is far too small to make data
                raise ConfigError(f"--edge-prob {p} gives graphs without edges; raise it")
            prompts = _batch_prompts(gb.adj[:take], gb.src[:take], gb.dst[:take])
            answers = [format_path(path) for path in gb.paths[:take]]
            if test:
                edges = edge_lists(gb.adj[:take])
                rows = [
                    {
                        "prompt": prompt,
                        "answer": answer,
                        "text": prompt + answer,
                        "prompt_tokens": len(prompt),  # char tokenizer: one token a character
                        "n": n,
                        "src": int(gb.src[k]),
                        "dst": int(gb.dst[k]),
                        "edges": [list(e) for e in edges[k]],
                        "path_length": len(gb.paths[k]) - 1,
                    }
                    for k, (prompt, answer) in enumerate(zip(prompts, answers))
                ]
                lines = [jsonl_line(row) for row in rows]
            else:
                # What jsonl_line() gives for these keys; the alphabet needs no JSON escapes.
                lines = [
                    f'{{"answer":"{a}","prompt":"{q}","text":"{q}{a}"}}\n'
                    for q, a in zip(prompts, answers)
                ]
            flat, doc_lengths = enc.encode_texts([a + b for a, b in zip(prompts, answers)])
            # char tokenizer: prompt tokens = prompt characters
            plen = np.fromiter(map(len, prompts), np.int64, take) if test else None
            yield "".join(lines).encode("ascii"), flat, doc_lengths, plen
            done += take
            bar.update(take)


def write_shortest_path(out_dir: str | os.PathLike, cfg: ShortestPathConfig) -> dict:
    """Calibrate p (unless given), generate train and test, write them; returns the manifest."""
    cfg.validate()
    p = cfg.resolve_edge_prob()
    tok = char_tokenizer(ALPHABET, EOS_TOKEN)
    enc = CharEncoder(tok, ALPHABET)
    config = {
        "task": TASK,
        "format_version": SYNTHETIC_FORMAT_VERSION,
        **asdict(cfg),
        "edge_prob": p,
        "edge_prob_calibrated": cfg.edge_prob is None,
        "query": "uniform ordered pair u != v among connected pairs",
        "answer": "lexicographically smallest shortest path, nodes separated by spaces",
        "text_format": "'i-j i-j ... | u>v =' + ' u ... v'",
    }
    n = cfg.nodes
    batches = {
        "train": _split_batches(
            np.random.default_rng([cfg.seed, 0]), cfg.size, n, p, enc, False, "shortest-path train"
        ),
        "test": _split_batches(
            np.random.default_rng([cfg.seed, 1]),
            cfg.num_test,
            n,
            p,
            enc,
            True,
            "shortest-path test",
        ),
    }
    return write_text_task(out_dir, TASK, config, tok, batches, cfg.shard_tokens)
