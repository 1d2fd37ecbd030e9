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


def test_each_python_environment_gets_its_own_extension_cache(monkeypatch):
    """DeepSpeed's CPU comm op is JIT-built with the environment's path in its flags: two
    environments sharing torch's cache would rebuild it in turn (a minute each start)."""
    import sys

    from pretrain.launch import extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert extensions_dir() != here
    assert os.path.dirname(extensions_dir()) == os.path.dirname(here)
