"""Completeness checks of input files (zstd frame walk, parquet footer) and `verify` on the
directories the synthetic generators write: intact ones pass, damaged ones are refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.__main__ import main as data_prep_main
from data_prep.loading import check_input_file, zstd_problem
from mop.errors import DataError

LINES = b"".join(json.dumps({"text": f"row {i} " * 20}).encode() + b"\n" for i in range(300))


def _frames(checksum: bool) -> tuple[bytes, int]:
    """Two concatenated frames of several blocks each, and where the first one ends."""
    out = io.BytesIO()
    first_end = 0
    for part in (LINES[:5000], LINES[5000:]):
        cctx = zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=False)
        w = cctx.stream_writer(out, closefd=False)
        w.write(part[:1000])
        w.flush(zstandard.FLUSH_BLOCK)
        w.write(part[1000:])
        w.flush(zstandard.FLUSH_FRAME)
        first_end = first_end or out.tell()
    return out.getvalue(), first_end


@pytest.mark.parametrize("checksum", [False, True])
def test_complete_zstd_files_pass_and_every_cut_is_found(tmp_path: Path, checksum: bool) -> None:
    data, first_end = _frames(checksum)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(data)  # a real zstd stream
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(data)
    assert zstd_problem(path) is None
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    path.write_bytes(skippable + data)
    assert zstd_problem(path) is None
    for cut in range(1, len(data)):  # every prefix, block boundaries included, is refused
        if cut == first_end:  # a complete first frame alone is a valid, shorter file
            continue
        path.write_bytes(data[:cut])
        assert zstd_problem(path) is not None, cut
    path.write_bytes(data + b"trailing junk")
    assert "garbage after the last frame" in zstd_problem(path)


def test_parquet_footer_and_empty_files(tmp_path: Path) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), buf)
    good = tmp_path / "x.parquet"
    good.write_bytes(buf.getvalue())
    check_input_file(good)
    good.write_bytes(buf.getvalue()[:-10])
    with pytest.raises(DataError, match="x.parquet is not a complete parquet file"):
        check_input_file(good)
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="e.jsonl is empty"):
        check_input_file(empty)


def test_verify_accepts_intact_synthetic_dirs_and_refuses_a_changed_tokenizer(
    tmp_path: Path, capsys
) -> None:
    pb, mem = tmp_path / "pb", tmp_path / "mem"
    assert data_prep_main(["synthetic", "phonebook", "--out", str(pb), "--size", "30"]) == 0
    assert data_prep_main(["synthetic", "memorization", "--out", str(mem), "--size", "4"]) == 0
    capsys.readouterr()
    assert data_prep_main(["verify", "--data-dir", str(pb)]) == 0
    assert "3 file(s) OK" in capsys.readouterr().out  # train + test shard, tokenizer
    assert data_prep_main(["verify", "--data-dir", str(mem)]) == 0
    tok = pb / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"a":', '"A":', 1))
    assert data_prep_main(["verify", "--data-dir", str(pb)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer file ") and "tokenizer.json" in err
