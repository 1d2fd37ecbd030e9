"""Start-up helpers of pretrain/launch.py."""

from __future__ import annotations

import os
import time

from pretrain.launch import clear_stale_jit_lock


def test_a_stale_jit_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    # torch puts extension builds under TORCH_EXTENSIONS_DIR/<name>/ (with `lock` during one)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert clear_stale_jit_lock("ext") is False  # no lock: nothing to do
    lock = tmp_path / "ext" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    assert clear_stale_jit_lock("ext") is False and lock.exists()  # a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))  # what a builder killed an hour ago leaves behind
    assert clear_stale_jit_lock("ext") is True and not lock.exists()
    assert "stale JIT build lock (60 min old)" in capsys.readouterr().out
