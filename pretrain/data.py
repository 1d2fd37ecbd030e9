"""Training data: memmap reader over the manifest's train shards and a pure-function sample order.

Global sample i is computed from (seed, i) alone, with no per-run state:

1. Source. Samples are grouped in periods of `mixture_period` slots. Each period holds
   round(share * period) slots of every source (largest remainder, so the counts sum to the
   period), shuffled by a seeded bijection keyed on (seed, period index). The k-th sample of
   source s is then `period * count_s + (earlier slots of s in this period)`.
2. Window. Each source's train shards, concatenated in manifest order, are cut into windows of
   seq_len + 1 tokens with stride seq_len (the last token of a window is the first of the next,
   so every token is a target exactly once). Sample k of source s is window
   perm_{seed, s, epoch}(k mod W_s), epoch = k // W_s: every epoch visits every window once,
   in a different order, and a source smaller than its planned share simply repeats.

`data.packing=document` (or `auto` on a directory whose manifest sets `task.train_packing:
document`, as the phone-book generator does) replaces step 2: each train document is one
sample, at position 0, right-padded to seq_len + 1 tokens; padded targets are IGNORE_INDEX, so
the loss covers exactly the document's own next tokens (padded inputs are token 0 and, the
model being causal, never seen by a real position). A micro-batch is cut to its longest
document, rounded up to a multiple of `pad_multiple` (the tensor-parallel size, which
sequence parallel needs), so seq_len is only an upper bound and short entries cost no
compute for a long seq_len. Padded tokens are still routed by an MoE (they count in its
load-balancing loss, not in the LM loss). Sample k of source s is then document
perm_{seed, s, epoch}(k mod D_s): every epoch (one pass of the book) shows every entry once,
in the same context the eval asks it in. A document longer than seq_len + 1 is an error.

The bijections are Feistel networks over the next power of four with cycle walking, so a
permutation of billions of windows costs nothing to hold. Data parallel rank r of dp takes
the samples i of each global batch with i % dp == r; the union over ranks is the same for any
dp, so a run resumed on another number of GPUs (same global batch) sees the same samples.

Skipped ranges: a spike rollback (pretrain/spike.py) names global sample ranges that no batch
may take. A global batch starting at position p is then the next global_batch indices >= p
outside every range, and the position after it is its last index + 1: the trainer's `samples`
counter is a position in the order above, not a count. The ranges travel in the checkpoint
and in rollbacks.json, so every restart, requeue and dp size applies the same ones.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import PLAN
from data_prep.shards import ShardReader
from mop.errors import DataError
from mop.fileio import read_json
from pretrain.config import DataConfig
from pretrain.preflight import open_manifest  # noqa: F401  (its torch-free home)

_MASK64 = (1 << 64) - 1
IGNORE_INDEX = -100  # targets the loss skips (lm_loss's ignore_index)


def mix64(*values: int) -> int:
    """splitmix64 over a sequence of ints: a cheap, well-mixed, platform-independent hash."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


class FeistelPermutation:
    """A seeded bijection of range(n), evaluated one index at a time (O(1) memory)."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("permutation of an empty range")
        self.n, self.key = n, key
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for r in range(self.ROUNDS):
            left, right = right, left ^ (mix64(self.key, r, right) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside range({self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: the domain is < 4n, so few repeats on average
            x = self._encrypt(x)
        return x


def largest_remainder(total: int, shares: list[float]) -> list[int]:
    raw = [total * s / sum(shares) for s in shares]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda j: (counts[j] - raw[j], j))
    for j in order[: total - sum(counts)]:
        counts[j] += 1
    return counts


class SourceSchedule:
    """Which source global sample i comes from, and its index within that source."""

    def __init__(self, shares: list[float], period: int, seed: int):
        self.period, self.seed = period, seed
        self.counts = largest_remainder(period, shares)
        self.base = np.repeat(np.arange(len(shares)), self.counts)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few periods per object, freed with it
    def _period(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        perm = FeistelPermutation(self.period, mix64(self.seed, 0x5C4ED, p))
        sources = self.base[[perm(j) for j in range(self.period)]]
        ranks = np.zeros(self.period, dtype=np.int64)
        seen = np.zeros(len(self.counts), dtype=np.int64)
        for j, s in enumerate(sources):
            ranks[j] = seen[s]
            seen[s] += 1
        return sources, ranks

    def locate(self, i: int) -> tuple[int, int]:
        p, slot = divmod(i, self.period)
        sources, ranks = self._period(p)
        s = int(sources[slot])
        return s, p * self.counts[s] + int(ranks[slot])


class SourceStream:
    """One source's train shards, concatenated, cut into seq_len + 1 windows (stride seq_len)."""

    def __init__(self, label: str, readers: list[ShardReader], seq_len: int):
        self.label, self.readers, self.seq_len = label, readers, seq_len
        sizes = [r.num_tokens for r in readers]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self.starts[-1])
        self.num_windows = (total - 1) // seq_len if total > seq_len else 0
        if self.num_windows == 0:
            raise DataError(
                f"source {label!r} has {total} training tokens, fewer than one sequence of "
                f"{seq_len + 1}"
            )

    def window(self, j: int) -> np.ndarray:
        a, b = j * self.seq_len, j * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts, pos, k = [], a, first
        while pos < b:  # a window may span the end of one shard and the start of the next
            r = self.readers[k]
            lo, hi = (
                pos - int(self.starts[k]),
                min(b, int(self.starts[k + 1])) - int(self.starts[k]),
            )
            parts.append(np.asarray(r.tokens[lo:hi]))
            pos += hi - lo
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class DocumentStream:
    """One source's train documents, one per sample, right-padded with IGNORE_INDEX to
    seq_len + 1 tokens (`num_windows` and `window(j)` as SourceStream, so the sample order
    is shared)."""

    def __init__(self, label: str, readers: list[ShardReader], seq_len: int):
        self.label, self.readers, self.seq_len = label, readers, seq_len
        self.starts = np.concatenate([[0], np.cumsum([len(r) for r in readers])]).astype(np.int64)
        self.num_windows = int(self.starts[-1])
        if self.num_windows == 0:
            raise DataError(f"source {label!r} has no training documents")
        longest = max(int(np.diff(r.offsets).max()) for r in readers if len(r))
        if longest > seq_len + 1:
            raise DataError(
                f"source {label!r} has a document of {longest} tokens; data.packing=document "
                f"needs data.seq_len >= {longest - 1} (one document per sample, never cut)"
            )

    def window(self, j: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, j, side="right")) - 1
        doc = self.readers[k].document(j - int(self.starts[k]))
        out = np.full(self.seq_len + 1, IGNORE_INDEX, dtype=np.int64)
        out[: len(doc)] = doc
        return out


def resolve_packing(cfg: DataConfig, manifest: dict) -> str:
    """`pack` or `document`: the config's choice, or with `auto` the manifest's hint."""
    if cfg.packing != "auto":
        return cfg.packing
    task = manifest.get("task")
    hint = task.get("train_packing") if isinstance(task, dict) else None
    if hint not in (None, "pack", "document"):
        raise DataError(f"manifest of {cfg.data_dir}: unknown task.train_packing {hint!r}")
    return hint or "pack"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64, shifted by one
    source_ids: torch.Tensor  # [B] int64, index into TrainData.labels
    sample_ids: list[int]  # global sample indices, for checks and debugging


class TrainData:
    """The training stream of a data directory: `sample(i)` and per-rank micro-batches."""

    def __init__(
        self,
        data_dir: str | Path,
        manifest: dict,
        cfg: DataConfig,
        pad_multiple: int = 1,
        vocab_size: int | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.pad_multiple = pad_multiple
        self.seq_len, self.seed = cfg.seq_len, cfg.seed
        plan = self._plan(manifest)
        # Sorted labels: the order must not depend on dict order in a JSON file.
        self.labels = sorted(k for k, v in plan.items() if v["share"] > 0)
        if not self.labels:
            raise DataError(f"mixture plan in {self.data_dir} has no source with a positive share")
        self.shares = [float(plan[k]["share"]) for k in self.labels]
        self.packing = resolve_packing(cfg, manifest)
        stream_cls = DocumentStream if self.packing == "document" else SourceStream
        self.streams: list[SourceStream | DocumentStream] = []
        self.vocab_size = vocab_size
        for label in self.labels:
            recs = [s for s in manifest["shards"] if s["source"] == label and s["split"] == "train"]
            if not recs:
                raise DataError(f"source {label!r} is in the mixture plan but has no train shards")
            readers = [ShardReader(self.data_dir / r["path"], r["dtype"]) for r in recs]
            self.streams.append(stream_cls(label, readers, cfg.seq_len))
        self.schedule = SourceSchedule(self.shares, cfg.mixture_period, cfg.seed)
        self.set_skipped([])
        for label, count in zip(self.labels, self.schedule.counts):
            if count == 0:
                raise DataError(
                    f"source {label!r} gets no slot in a mixture period of {cfg.mixture_period}; "
                    "raise data.mixture_period"
                )

    def _plan(self, manifest: dict) -> dict[str, dict]:
        """The merged mixture plan; a directory without one (a synthetic task written by
        `python -m data_prep synthetic`) mixes its sources by their train tokens."""
        path = self.data_dir / manifest.get("mixture_plan", PLAN)
        if path.is_file():
            return read_json(path)["sources"]
        if "mixture_plan" in manifest:
            raise DataError(f"{path} is missing (the manifest names it); rerun the merge step")
        tokens: dict[str, int] = {}
        for rec in manifest["shards"]:
            if rec["split"] == "train":
                tokens[rec["source"]] = tokens.get(rec["source"], 0) + int(rec["tokens"])
        total = sum(tokens.values())
        if not total:
            raise DataError(f"{self.data_dir} has no train shards")
        return {label: {"share": n / total} for label, n in tokens.items()}

    @property
    def samples_per_pass(self) -> int:
        """Samples in one pass over the data (every window or document once)."""
        return sum(s.num_windows for s in self.streams)

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample i -> (source index, window index). Pure in (seed, i)."""
        s, k = self.schedule.locate(i)
        stream = self.streams[s]
        epoch, r = divmod(k, stream.num_windows)
        perm = FeistelPermutation(stream.num_windows, mix64(self.seed, 0xE9_0C, s, epoch))
        return s, perm(r)

    def sample(self, i: int) -> tuple[int, np.ndarray]:
        s, w = self.locate(i)
        window = self.streams[s].window(w)
        if self.vocab_size is not None and window.size and int(window.max()) >= self.vocab_size:
            # Shards written before records carried max_token_id are checked here (cheap: one
            # max per window) so a bad id is a clear error, not an IndexError in the embedding.
            raise DataError(
                f"source {self.labels[s]!r} of {self.data_dir} holds token id "
                f"{int(window.max())} >= model.vocab_size={self.vocab_size}"
            )
        return s, window

    # Skipped samples (spike rollback) ---------------------------------------------------------
    def set_skipped(self, ranges: list[tuple[int, int]]) -> None:
        """Global sample ranges [start, end) that no batch takes (the data of a loss spike,
        pretrain/spike.py); merged and sorted. Pure: the batches depend on (seed, position,
        ranges) only, so a restart or another dp that is given the same ranges sees the same."""
        merged: list[list[int]] = []
        for a, b in sorted((int(a), int(b)) for a, b in ranges if b > a):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.skipped = [(a, b) for a, b in merged]
        self._skip_starts = [a for a, _ in self.skipped]

    def batch_samples(self, first: int, global_batch: int) -> list[int]:
        """The global sample indices of the global batch that starts at position `first`: the
        next `global_batch` indices from `first` that no skipped range holds."""
        ids: list[int] = []
        i, k = first, bisect.bisect_right(self._skip_starts, first) - 1  # k: last range <= i
        if k >= 0 and i < self.skipped[k][1]:
            i = self.skipped[k][1]
        k += 1  # the first range that starts after i (ranges are merged: none touch)
        while len(ids) < global_batch:
            want = global_batch - len(ids)
            stop = self.skipped[k][0] if k < len(self.skipped) else i + want
            take = min(want, stop - i)
            ids.extend(range(i, i + take))
            i += take
            if len(ids) < global_batch:  # reached range k: jump over it
                i, k = self.skipped[k][1], k + 1
        return ids

    def batch_end(self, first: int, global_batch: int) -> int:
        """The position after the global batch that starts at `first` (the next batch's)."""
        return self.batch_samples(first, global_batch)[-1] + 1

    def rank_samples(self, first: int, global_batch: int, dp: int, rank: int) -> list[int]:
        """This rank's global sample indices of the global batch that starts at `first`: every
        dp-th, from the rank's own offset, so the union over ranks is the same for any dp."""
        return self.batch_samples(first, global_batch)[rank::dp]

    def micro_batches(
        self, first: int, global_batch: int, dp: int, rank: int, micro: int
    ) -> list[Batch]:
        ids = self.rank_samples(first, global_batch, dp, rank)
        return [self.collate(ids[a : a + micro]) for a in range(0, len(ids), micro)]

    def collate(self, ids: list[int]) -> Batch:
        sources, windows = zip(*(self.sample(i) for i in ids))
        arr = torch.from_numpy(np.stack(windows).astype(np.int64))
        if self.packing == "document":  # drop the columns that are padding in every row
            longest = int((arr != IGNORE_INDEX).sum(dim=1).max())
            width = -(-max(longest - 1, 1) // self.pad_multiple) * self.pad_multiple
            arr = arr[:, : min(width, self.seq_len) + 1]
        return Batch(
            # Padding (document packing) is IGNORE_INDEX: token 0 as input, skipped as target.
            input_ids=arr[:, :-1].clamp_min(0).contiguous(),
            targets=arr[:, 1:].contiguous(),
            source_ids=torch.tensor(sources, dtype=torch.int64),
            sample_ids=list(ids),
        )


class ValidationSet:
    """The fixed held-out sequences of the manifest (each document one sequence)."""

    def __init__(self, data_dir: str | Path, manifest: dict):
        rec = manifest.get("validation")
        if not rec or not rec.get("num_sequences"):
            raise DataError(f"no validation sequences in the manifest of {data_dir}")
        self.reader = ShardReader(Path(data_dir) / rec["path"], rec["dtype"])
        self.seq_len = int(rec["seq_len"])

    def __len__(self) -> int:
        return len(self.reader)

    def batches(self, dp: int, rank: int, batch_size: int, max_batches: int):
        """Yield (input_ids, targets) of this rank's share; the same sequences every time.

        Every rank yields the same number of batches: a forward can be a collective (expert
        parallel all-to-all), so a rank whose share ran out yields a one-row batch whose
        targets are all -100 (ignored) instead of stopping early.
        """
        cap = batch_size * max_batches
        ids = list(range(rank, len(self), dp))[:cap]
        most = min(-(-len(self) // dp), cap)  # the largest share any rank gets
        for a in range(0, most, batch_size):
            chunk = ids[a : a + batch_size]
            arr = np.stack([np.asarray(self.reader.document(i)) for i in (chunk or [0])])
            t = torch.from_numpy(arr.astype(np.int64))
            targets = t[:, 1:].contiguous()
            if not chunk:
                targets.fill_(-100)
            yield t[:, :-1].contiguous(), targets
