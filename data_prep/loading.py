"""Open a configured source and stream its documents, unit by unit, through `datasets`.

A *unit* is one input shard: one local file, or one shard (file) of the hub dataset as
`IterableDataset.num_shards` counts them. Units are the grain of parallel work and of
resumption, so their order and content must be a pure function of the config:
local files are expanded in sorted order, hub shards keep the order `datasets` resolves.

Both paths run `datasets.load_dataset(..., streaming=True)` and share `_iter_rows`: the
local path is what tests exercise, the hub path differs only in how the dataset is built.
Bad rows never stop a job; they come out as `SkippedRow(reason, row)` for the caller to
count (and the manifest records the counts per reason). A damaged *file* stops the job with a
`DataError` naming the file and the reason: an empty file, a `.zst` whose frame never ends
(cut short anywhere, also exactly at a block boundary, where every block still decodes and
rows would silently be lost), a `.parquet` without its footer, invalid UTF-8 or a line that
is not JSON (pyarrow refuses the whole file). `datasets` gives no way to resume inside such a
file, and silently dropping the rest of a file would bias the mixture. Local files are
checked for completeness (`check_input_file`) before they are read.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from data_prep.config import SourceConfig
from data_prep.renderers import SkipRow
from data_prep.sources import SourceSpec, get_spec
from mop.errors import DataError

log = logging.getLogger(__name__)

# Extensions the packaged builders read; order matters (longest suffix first).
_EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".jsonl.zst", "json"),
    (".json.zst", "json"),
    (".jsonl.gz", "json"),
    (".json.gz", "json"),
    (".jsonl", "json"),
    (".json", "json"),
    (".parquet", "parquet"),
)
_GLOB_CHARS = set("*?[")


class Document(NamedTuple):
    text: str
    row: int  # index of the row within its unit (skipped rows count too)


class SkippedRow(NamedTuple):
    reason: str  # "missing field 'x'", "non-string field 'x'", "malformed field 'x'",
    #              "empty text", "undecodable text", "filtered"
    row: int


# ---------------------------------------------------------------- local file expansion


def builder_for(path: str | os.PathLike) -> str | None:
    """The packaged `datasets` builder for a file name, or None if we do not read it."""
    name = os.fspath(path).lower()
    for ext, builder in _EXTENSIONS:
        if name.endswith(ext):
            return builder
    return None


def _expand_one(item: str) -> list[Path]:
    if _GLOB_CHARS & set(item):
        matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"data_files pattern {item!r} matches no files")
        return matches
    path = Path(item)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and builder_for(p))
        if not files:
            kinds = ", ".join(ext for ext, _ in _EXTENSIONS)
            raise DataError(f"directory {path} holds no data files ({kinds})")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"data_files path not found: {path}")


def expand_data_files(data_files: str | list[str]) -> list[Path]:
    """Files named by a path, glob, directory, or a list of these; sorted within each item.

    Items keep the user's order (so a list is an explicit order); duplicates are dropped.
    """
    items = [data_files] if isinstance(data_files, str) else list(data_files)
    if not items:
        raise DataError("data_files is an empty list")
    seen: set[Path] = set()
    files: list[Path] = []
    for item in items:
        for path in _expand_one(os.path.expanduser(str(item))):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                files.append(resolved)
    return files


def infer_builder(files: list[Path]) -> str:
    """One builder for all files; a mix (parquet + jsonl) is refused rather than guessed."""
    by_builder: dict[str | None, list[Path]] = {}
    for f in files:
        by_builder.setdefault(builder_for(f), []).append(f)
    if None in by_builder:
        bad = by_builder[None][0]
        kinds = ", ".join(ext for ext, _ in _EXTENSIONS)
        raise DataError(f"cannot read {bad}: unknown extension (expected one of {kinds})")
    if len(by_builder) > 1:
        examples = "; ".join(f"{b}: {fs[0].name}" for b, fs in sorted(by_builder.items()))
        raise DataError(f"data_files mix formats ({examples}); give one format per source")
    builder = next(iter(by_builder))
    assert builder is not None
    if any(f.name.lower().endswith(".zst") for f in files):
        _require_zstandard(files[0])
    return builder


def check_input_file(path: Path) -> None:
    """Refuse a local input file that is empty or visibly cut short, before reading it.

    A compressed or columnar file carries its own end mark: the zstd frame's last-block
    flag (and checksum), the parquet footer. A file cut at a zstd block boundary decodes
    without any error up to the cut, so only this check sees the missing rows. (A file of
    several zstd frames cut exactly between two frames is a valid shorter file; no check
    can tell, and the usual one-frame files cannot be cut that way.)
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read input file {path}: {exc.strerror}") from None
    if size == 0:
        raise DataError(
            f"input file {path} is empty (0 bytes): an interrupted download or copy? "
            "fetch it again or remove it from data_files"
        )
    name = path.name.lower()
    if name.endswith(".parquet"):
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(max(0, size - 4))
            tail = fh.read(4)
        if head != b"PAR1" or tail != b"PAR1" or size < 12:
            raise DataError(
                f"input file {path} is not a complete parquet file (no PAR1 footer): "
                "cut short or not parquet; fetch it again"
            )
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # a footer that does not parse: damaged
            raise DataError(f"input file {path} has a damaged parquet footer ({exc})") from None
        if rows == 0:
            raise DataError(f"input file {path} holds no rows: remove it from data_files")
    elif name.endswith(".zst"):
        problem = zstd_problem(path)
        if problem:
            raise DataError(f"input file {path} is damaged: {problem}; fetch it again")


_ZSTD_MAGIC = 0xFD2FB528


def zstd_problem(path: Path) -> str | None:
    """Walk the frames and block headers of a .zst file (no decompression): None if every
    frame ends with its last block (and checksum), else what is wrong."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = 0
        frames = 0
        while pos < size:
            fh.seek(pos)
            magic_bytes = fh.read(4)
            if len(magic_bytes) < 4:
                return f"cut short at byte {pos} (incomplete frame header)"
            magic = int.from_bytes(magic_bytes, "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame: 4-byte size, then data
                skip = fh.read(4)
                if len(skip) < 4 or pos + 8 + int.from_bytes(skip, "little") > size:
                    return f"cut short inside a skippable frame at byte {pos}"
                pos += 8 + int.from_bytes(skip, "little")
                continue
            if magic != _ZSTD_MAGIC:
                what = "not zstd data" if frames == 0 else "garbage after the last frame"
                return f"{what} at byte {pos}"
            desc_b = fh.read(1)
            if not desc_b:
                return f"cut short at byte {pos} (incomplete frame header)"
            desc = desc_b[0]
            fcs_flag, single, checksum, dict_flag = (
                desc >> 6,
                desc >> 5 & 1,
                desc >> 2 & 1,
                desc & 3,
            )
            header = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
            header += (1 if single else 0, 2, 4, 8)[fcs_flag]
            pos += 4 + header
            while True:
                if pos + 3 > size:
                    return f"cut short at byte {size}: the frame's last block is missing"
                fh.seek(pos)
                block = int.from_bytes(fh.read(3), "little")
                last, kind, block_size = block & 1, block >> 1 & 3, block >> 3
                if kind == 3:
                    return f"corrupted block header at byte {pos}"
                pos += 3 + (1 if kind == 1 else block_size)
                if pos > size:
                    return f"cut short at byte {size} inside a block"
                if last:
                    break
            if checksum:
                pos += 4
                if pos > size:
                    return f"cut short at byte {size}: the frame checksum is missing"
            frames += 1
    return None if frames else "no zstd frame"


def _require_zstandard(example: object) -> None:
    if importlib.util.find_spec("zstandard") is None:
        raise DataError(f"{example} is zstd-compressed: install the `zstandard` package")


# ---------------------------------------------------------------- handle


class SourceHandle:
    """An opened source: how many units it has and an iterator over each.

    Build it with `open_source`. It holds no open files; each `iter_unit` call builds its
    own streaming dataset, so a handle can be shared by worker processes.
    """

    def __init__(
        self,
        spec: SourceSpec,
        cfg: SourceConfig,
        *,
        files: list[Path] | None = None,
        builder: str | None = None,
        hub_dataset: datasets.IterableDataset | None = None,
        hub_shards: int = 0,
    ) -> None:
        self.spec = spec
        self.cfg = cfg
        self.files = files  # local units, or None for the hub
        self.builder = builder
        self._hub_dataset = hub_dataset
        self._hub_shards = hub_shards
        total = len(files) if files is not None else hub_shards
        self.num_units = min(total, cfg.max_units) if cfg.max_units else total

    @property
    def is_local(self) -> bool:
        return self.files is not None

    def unit_name(self, index: int) -> str:
        """A human/manifest name for a unit: the file path, or hub id + shard index."""
        self._check_index(index)
        if self.files is not None:
            return str(self.files[index])
        return f"{self.spec.hub_id}#shard{index}/{self._hub_shards}"

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_units:
            raise IndexError(f"{self.cfg.label}: unit {index} out of range [0, {self.num_units})")

    def _unit_dataset(self, index: int) -> datasets.IterableDataset:
        if self.files is not None:
            check_input_file(self.files[index])
            return _load(self.builder, data_files=[str(self.files[index])], split="train")
        assert self._hub_dataset is not None
        # contiguous sharding into num_shards pieces = exactly one input shard each
        return self._hub_dataset.shard(num_shards=self._hub_shards, index=index, contiguous=True)

    def iter_unit(self, index: int) -> Iterator[Document | SkippedRow]:
        """Documents and skipped rows of one unit, in file order.

        Stops after `max_documents_per_unit` documents (skipped rows do not count, so a
        filtered source still yields its quota when the unit has enough good rows).
        """
        self._check_index(index)
        limit = self.cfg.max_documents_per_unit
        produced = 0
        where = f"source {self.cfg.label!r} unit {index} ({self.unit_name(index)})"
        try:
            dataset = self._unit_dataset(index)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{where}: cannot open: {type(exc).__name__}: {exc}") from exc
        rows = _guarded(_rows(dataset), where)
        warned: set[str] = set()
        row_index = -1
        for row_index, row in enumerate(rows):
            item = classify_row(self.spec, row, row_index)
            if isinstance(item, SkippedRow):
                self._warn_schema(row, where, warned)
            else:
                produced += 1
            yield item
            if limit is not None and produced >= limit:
                return
        if row_index < 0 and self.files is not None:  # e.g. a .jsonl of blank lines
            raise DataError(
                f"input file {self.files[index]} holds no rows: remove it from data_files"
            )

    def _warn_schema(self, row: dict[str, Any], where: str, warned: set[str]) -> None:
        """Warn once per unit per column the schema lacks entirely (likely a wrong source)."""
        for col in self.spec.columns:
            if col not in row and col not in warned:
                warned.add(col)
                log.warning("%s: rows have no column %r (source schema mismatch?)", where, col)


def classify_row(spec: SourceSpec, row: dict[str, Any], row_index: int) -> Document | SkippedRow:
    """Apply the spec's filter and renderer to one row; every failure becomes a SkippedRow."""
    try:
        if spec.keep is not None and not spec.keep(row):
            return SkippedRow("filtered", row_index)
        text = spec.render(row)
    except SkipRow as skip:
        return SkippedRow(skip.reason, row_index)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        return SkippedRow(f"malformed row ({type(exc).__name__})", row_index)
    if not isinstance(text, str):
        return SkippedRow("undecodable text", row_index)
    if not text or text.isspace():  # as `not text.strip()`, without copying the text
        return SkippedRow("empty text", row_index)
    if not text.isascii():  # ASCII (most rows) has no surrogates: skip the utf-8 copy
        try:
            text.encode("utf-8")  # lone surrogates cannot reach a tokenizer or a utf-8 file
        except UnicodeEncodeError:
            return SkippedRow("undecodable text", row_index)
    return Document(text, row_index)


def _rows(dataset: datasets.IterableDataset, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """Rows as dicts, read in column batches: per-row formatting inside `datasets` costs
    more than the tokenizer on short documents; the rows are the same either way.

    Where every column is a plain `Value` (FineWeb, Cosmopedia, Wikipedia parquet), the rows
    come straight from the Arrow batches: `datasets`' own batched iteration splits each batch
    into row dicts and joins them back into columns, about half the read. Other features need
    `datasets`' decoding (a JSON column of mixed types is stored as JSON text and decoded back
    into strings, numbers and lists; nested or media features), so they keep its path."""
    features = dataset.features
    if features and all(isinstance(f, datasets.Value) for f in features.values()):
        for table in dataset.with_format("arrow").iter(batch_size=batch_size):
            names = table.column_names
            columns = [table.column(name).to_pylist() for name in names]
            for values in zip(*columns):
                yield dict(zip(names, values))
        return
    for batch in dataset.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def _guarded(rows: Iterator[dict[str, Any]], where: str) -> Iterable[dict[str, Any]]:
    """Re-raise parser failures inside `datasets` as one DataError naming the unit."""
    count = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow/json/unicode errors surface with many types
            raise DataError(
                f"{where}: cannot read past row {count}: {type(exc).__name__}: {exc}"
            ) from exc
        count += 1
        yield row


# ---------------------------------------------------------------- opening


def _load(path: str | None, **kwargs: Any) -> datasets.IterableDataset:
    # Looked up on the module at call time so tests can monkeypatch datasets.load_dataset.
    ds = datasets.load_dataset(path, streaming=True, **kwargs)
    if not isinstance(ds, datasets.IterableDataset):
        raise DataError(f"expected one streaming split from {path!r}, got {type(ds).__name__}")
    return ds


def open_source(cfg: SourceConfig) -> SourceHandle:
    """Resolve a source config to a handle: local files if `data_files` is set, else the hub.

    `hub_config` and `split` override the registry's for hub sources and are ignored for
    local files (those are read whole, as split "train").
    """
    spec = get_spec(cfg.source)
    if cfg.data_files is not None:
        files = expand_data_files(cfg.data_files)
        return SourceHandle(spec, cfg, files=files, builder=infer_builder(files))
    return _open_hub(spec, cfg)


def _open_hub(spec: SourceSpec, cfg: SourceConfig) -> SourceHandle:
    split = cfg.split or spec.split
    where = f"source {cfg.label!r} ({spec.hub_id})"
    if spec.builder is None:
        config = cfg.hub_config or spec.hub_config
        load_args: tuple[str | None, dict[str, Any]] = (
            spec.hub_id,
            {"name": config, "split": split},
        )
    else:
        if cfg.hub_config is not None:
            raise DataError(f"{where} is read from fixed files; hub_config does not apply")
        files = _format_files(spec, split, where)
        if any(str(f).endswith(".zst") for f in files):
            _require_zstandard(files[0])
        load_args = (spec.builder, {"data_files": files, "split": "train"})
    try:
        ds = _load(load_args[0], **load_args[1])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{where}: cannot open hub dataset ({type(exc).__name__}: {exc}); "
            "offline machines need `data_files:` pointing at local copies"
        ) from exc
    shards = ds.num_shards
    if shards < 1:
        raise DataError(f"{where}: the hub dataset has no shards")
    return SourceHandle(spec, cfg, hub_dataset=ds, hub_shards=shards)


def _format_files(spec: SourceSpec, split: str, where: str) -> list[str]:
    raw = spec.hub_data_files
    patterns = [raw] if isinstance(raw, str) else list(raw or [])
    if not patterns:
        raise DataError(f"{where}: registry entry has a builder but no hub_data_files")
    if split != spec.split and not any("{split}" in p for p in patterns):
        raise DataError(f"{where} has one fixed file set; split {split!r} does not apply")
    return [p.replace("{split}", split) for p in patterns]
