"""The evaluation suites and how `--suite` is read: one registry for `python -m eval` and for
`slurm.submit` (which checks a suite before queueing anything). Imports nothing heavy."""

from __future__ import annotations

from mop.errors import ConfigError

SUITES = ("ppl", "knowledge", "commonsense", "math", "synthetic")
# `all`: synthetic tasks only make sense for models trained on them, so they are asked by name.
ALL = ("ppl", "knowledge", "commonsense", "math")
BENCHMARKS = ("knowledge", "commonsense", "math")


def parse_suites(text: str) -> list[str]:
    """Suites and single benchmark tasks (e.g. `ppl,gsm8k`), in order, without repeats."""
    from eval.tasks import TASKS

    out: list[str] = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        if name == "all":
            out += [s for s in ALL if s not in out]
        elif name in SUITES or name in TASKS:
            out += [name] if name not in out else []
        else:
            raise ConfigError(
                f"unknown suite {name!r}; choose from {', '.join(SUITES)}, all, or a task: "
                f"{', '.join(TASKS)}"
            )
    if not out:
        raise ConfigError("--suite is empty")
    return out
