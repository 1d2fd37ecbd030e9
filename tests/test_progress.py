"""mop.progress: plain lines in a log, a bar on a terminal; the formatters."""

from __future__ import annotations

import re

from mop.progress import eta, fmt_bytes, fmt_duration, progress


def test_progress_in_a_log_writes_plain_lines(capsys):
    for _ in progress(range(3), total=3, desc="verify", unit="shard", mininterval=0):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.match(r"verify: 3(\.00)?/3(\.00)? shard \[", err.splitlines()[-1]), err


def test_formatters():
    assert fmt_duration(5) == "5s"
    assert fmt_duration(185) == "3m05s"
    assert fmt_duration(7620) == "2h07m"
    assert fmt_duration(None) == "?"
    assert fmt_bytes(800_600) == "800.6 KB"
    assert fmt_bytes(3.2e9) == "3.2 GB"


def test_eta():
    assert eta(0, 10, 5.0) is None
    assert eta(2, 10, 4.0) == 16.0
