import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from mop.config import StrictModel, apply_overrides, load_config, save_resolved
from mop.errors import ConfigError


class Inner(StrictModel):
    lr: float = Field(3e-4, gt=0)
    kind: Literal["a", "b"] = "a"


class Outer(StrictModel):
    name: str = "x"
    inner: Inner = Inner()
    items: list[int] = [1, 2]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  lr: 1.0e-3\n")
    cfg = load_config(Outer, path, ["inner.kind=b", "items.1=5", "name=other"])
    assert cfg.name == "other"
    assert cfg.inner.lr == pytest.approx(1e-3)
    assert cfg.inner.kind == "b"
    assert cfg.items == [1, 5]


def test_bad_value_names_field_value_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, ["inner.kind=c"])
    msg = str(err.value)
    assert "inner.kind" in msg and "'c'" in msg and "'a'" in msg and "\n" not in msg


def test_out_of_range_and_unknown_field():
    with pytest.raises(ConfigError, match=r"inner\.lr.*greater than 0"):
        load_config(Outer, None, ["inner.lr=-1"])
    with pytest.raises(ConfigError, match="unknown config field 'inner.typo'"):
        load_config(Outer, None, ["inner.typo=1"])


def test_override_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="out of range"):
        apply_overrides({"items": [1]}, ["items.3=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_save_resolved_roundtrip(tmp_path):
    cfg = load_config(Outer, None, ["inner.lr=0.5"])
    save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(Outer, tmp_path / "resolved.yaml")
    assert again == cfg


def test_a_relative_config_path_is_looked_up_in_the_repository_after_the_working_dir(
    tmp_path, monkeypatch
):
    """`configs/...` as the README writes it works from any directory; a file of the same
    name in the working directory wins; a missing one names both places."""
    from mop.config import REPO_ROOT, find_config, read_yaml

    monkeypatch.chdir(tmp_path)
    rel = "configs/train/tiny_cpu.yaml"
    assert find_config(rel) == REPO_ROOT / rel
    assert read_yaml(rel)["max_steps"] == 40
    local = tmp_path / rel
    local.parent.mkdir(parents=True)
    local.write_text("max_steps: 3\n")
    assert find_config(rel) == Path(rel) and read_yaml(rel) == {"max_steps": 3}
    missing = f"config file not found: configs/x.yaml (nor under {REPO_ROOT})"
    with pytest.raises(ConfigError, match=re.escape(missing)):
        read_yaml("configs/x.yaml")
    with pytest.raises(ConfigError, match="config file not found: /nope/x.yaml$"):
        read_yaml("/nope/x.yaml")


def test_a_glob_the_shell_left_unmatched_is_matched_in_the_repository(tmp_path, monkeypatch):
    """`python -m pretrain.model_info configs/model/*.yaml` from another directory: bash passes
    the pattern as it is; it is matched in the working directory first, then the repository."""
    from mop.config import REPO_ROOT, find_configs

    monkeypatch.chdir(tmp_path)
    tiny = find_configs(["configs/model/tiny_*.yaml", "a.yaml"])
    assert tiny == [str(REPO_ROOT / "configs/model/tiny_dense.yaml")] + [
        str(REPO_ROOT / "configs/model/tiny_moe.yaml"),
        "a.yaml",
    ]
    (tmp_path / "configs/model").mkdir(parents=True)
    (tmp_path / "configs/model/tiny_mine.yaml").write_text("d_model: 8\n")
    assert find_configs(["configs/model/tiny_*.yaml"]) == ["configs/model/tiny_mine.yaml"]
    assert find_configs(["configs/model/none_*.yaml"]) == ["configs/model/none_*.yaml"]
