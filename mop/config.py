"""Typed configs: YAML files plus dotted overrides, validated in one place.

Every component declares its config as a `StrictModel` (pydantic, unknown keys
refused). `load_config` reads a YAML file, applies `a.b.c=value` overrides (values
parsed as YAML, so `lr=3e-4`, `flag=true`, `items=[1,2]` work), validates, and turns any
problem into one `ConfigError` line naming the field, the value and what is allowed.
`save_resolved` writes the final config beside an output so a run can be reproduced.
"""

from __future__ import annotations

import copy
import glob
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mop.errors import ConfigError
from mop.fileio import atomic_write_text

T = TypeVar("T", bound=BaseModel)
# The checkout the project runs from (installed editable): relative config paths that are not
# in the working directory are looked up here, so `configs/...` works from any directory.
REPO_ROOT = Path(__file__).resolve().parents[1]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def find_config(path: str | os.PathLike) -> Path:
    """A config file path: as given (relative to the working directory), else, for a relative
    path not there, the same path in the repository (`configs/train/x.yaml` from anywhere)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def find_configs(paths: list[str]) -> list[str]:
    """Config paths from a command line, with the glob patterns the shell left as they were
    (`configs/model/*.yaml` typed in another directory matches nothing there) matched in the
    working directory, else in the repository; a pattern matching nothing stays as it is,
    for the caller's "not found" error."""
    out: list[str] = []
    for path in paths:
        if Path(path).exists() or not glob.has_magic(path) or Path(path).is_absolute():
            out.append(path)
            continue
        here = sorted(glob.glob(path))
        there = sorted(str(p) for p in REPO_ROOT.glob(path))
        out += here or there or [path]
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    given, path = path, find_config(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        where = "" if Path(given).is_absolute() else f" (nor under {REPO_ROOT})"
        raise ConfigError(f"config file not found: {given}{where}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_line(path, exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping (key: value lines) at the top level, "
            f"not a {type(data).__name__}"
        )
    return data


def yaml_error_line(path: str | os.PathLike, exc: yaml.YAMLError) -> str:
    """`file:line:column: what` (1-based, as editors count) for a YAML parser error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    start = getattr(exc, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        context += f" that started at line {start.line + 1}, column {start.column + 1}"
    what = f"{problem} ({context})" if context else problem
    return f"{where}: invalid YAML: {' '.join(str(what).split())}"


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `data` with each `dotted.key=value` applied.

    Integer path parts index into lists (`sources.0.weight=0.5`).
    """
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _step_into(node, part, ".".join(parts[: depth + 1]))
        _assign(node, parts[-1], _parse_value(raw), key)
    return data


def _step_into(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        idx = _list_index(node, part, where)
        return node[idx]
    if not isinstance(node, dict):
        raise ConfigError(f"override path {where!r} goes through a non-mapping value")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _assign(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, part, key)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"override {key!r} goes through a non-mapping value")


def _list_index(node: list, part: str, where: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise ConfigError(f"override path {where!r}: {part!r} must be a list index") from None
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"override path {where!r}: index {idx} out of range (len {len(node)})")
    return idx


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field 'a.b' = value: what is allowed`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        value = err.get("input")
        msg = err.get("msg", "invalid")
        kind = err.get("type", "")
        if msg.startswith("Value error, "):  # our own validators' messages speak for themselves
            msg = msg[len("Value error, ") :]
        if not loc:  # a check across fields: the message names them, the input is everything
            lines.append(f"config: {msg}")
        elif kind == "extra_forbidden":
            lines.append(f"unknown config field '{loc}'")
        elif kind == "missing":
            lines.append(f"config field '{loc}' is required")
        else:
            shown = repr(value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            lines.append(f"config field '{loc}' = {shown}: {msg}")
    return "; ".join(lines)


def validate(cls: type[T], data: dict[str, Any]) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> T:
    """Read YAML (optional), apply dotted overrides, validate into `cls`."""
    data = read_yaml(path) if path else {}
    if overrides:
        # Expand defaults first so an override can index into a default list or
        # sub-config that the YAML file does not mention.
        data = _expanded(cls, data)
        for item in overrides:
            try:
                data = apply_overrides(data, [item])
            except ConfigError:
                # An earlier override may have set a sub-config to a file path
                # (`model=configs/model/x.yaml model.vocab_size=64`): load it and retry; a
                # second failure is the user's error and is raised as it is.
                head = item.split("=", 1)[0].split(".")[0]
                load_sub = getattr(cls, "load_subconfig", None)
                if load_sub is not None and isinstance(data.get(head), str):
                    data = {**data, head: load_sub(head, data[head])}
                else:
                    data = _expanded(cls, data)
                data = apply_overrides(data, [item])
    return validate(cls, data)


def _expanded(cls: type[T], data: dict[str, Any]) -> dict[str, Any]:
    """`data` with defaults filled in and path-valued sub-configs loaded, when it validates."""
    try:
        return cls.model_validate(data).model_dump(mode="json")
    except ValidationError:
        return data  # e.g. a required field that an override supplies; validated later


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_resolved(cfg: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config (atomic) so the output it sits beside can be reproduced."""
    atomic_write_text(path, to_yaml(cfg))


def parse_args_with_overrides(parser, argv: list[str] | None = None):
    """argparse with `key=value` overrides allowed anywhere on the command line.

    argparse cannot mix a `nargs="*"` positional with options that follow it (and not at
    all under subcommands), so overrides left over by `parse_known_args` are appended to
    `args.overrides`; anything else left over is the usual argparse error.
    """
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if "=" not in r or r.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args
