"""Keep `datasets` offline and its caches inside each test's temporary directory.

Offline: the machines have no hub access, and a test that silently tried the network
would hang or pass for the wrong reason. An isolated HF_HOME keeps tests from reading or
polluting a user's cache. `datasets` reads these variables at import time into
`datasets.config`, so the module attributes are patched as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def hf_offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    env = {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        import datasets.config as dconfig
    except ImportError:  # pragma: no cover - datasets is a pinned dependency
        return home
    monkeypatch.setattr(dconfig, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(dconfig, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(dconfig, "HF_DATASETS_CACHE", home / "datasets", raising=False)
    monkeypatch.setattr(dconfig, "HF_CACHE_HOME", str(home), raising=False)
    monkeypatch.setattr(dconfig, "HF_MODULES_CACHE", home / "modules", raising=False)
    try:
        import huggingface_hub.constants as hconst
    except ImportError:  # pragma: no cover
        return home
    monkeypatch.setattr(hconst, "HF_HUB_OFFLINE", True, raising=False)
    return home
