import os
import stat

import pytest

from mop.fileio import atomic_path, atomic_write_json, read_json, sha256_file


def test_atomic_write_publishes_complete_file_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert read_json(target) == {"a": [1, 2], "b": 1}
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600: others on a cluster must read data
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "y.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.bin"]
    assert len(sha256_file(target)) == 64
