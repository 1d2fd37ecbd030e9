"""Downstream benchmarks of the paper through lm-evaluation-harness (0.4.13).

`run_suite(lm, "knowledge" | "commonsense" | "math" | "all" | "task,task,...", data_dir, limit)`
evaluates an `lm_eval.api.model.LM` and returns one entry per task in the `tasks` section format
of mop/results.py. Shots, prompts, splits and metrics per task: eval/tasks/README.md.

Each task is a YAML of this folder. Most derive from an lm-eval built-in (`base:`, a path
under lm_eval/tasks/, merged key by key the way lm-eval's own `include:` merges; `base` is ours
because `include:` cannot name a file of the installed package portably). The merged configs
are handed to the harness as inline dicts, so the built-in prompt text is never copied.

With `data_dir`, every task reads `<data_dir>/<folder>/<split>.{jsonl,json,parquet}` (files in
the hub dataset's own schema, see demo/fixtures.py) instead of the hub.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mop.errors import DataError, UserError

if TYPE_CHECKING:
    from lm_eval.api.model import LM

YAML_DIR = Path(__file__).resolve().parent
DATA_EXTENSIONS = (("jsonl", "json"), ("json", "json"), ("parquet", "parquet"))

# Hendrycks / Minerva MATH: lm-eval task suffix -> hub config (= local sub-folder).
MATH_SUBJECTS: dict[str, str] = {
    "algebra": "algebra",
    "counting_and_prob": "counting_and_probability",
    "geometry": "geometry",
    "intermediate_algebra": "intermediate_algebra",
    "num_theory": "number_theory",
    "prealgebra": "prealgebra",
    "precalc": "precalculus",
}


@dataclass(frozen=True)
class TaskSpec:
    """What the suite needs beyond the harness config: category, headline metric, data folder."""

    name: str
    category: str
    primary: str
    # Local data folder under data_dir (default: the task name). Minerva MATH reads the same
    # files as Hendrycks MATH: both are EleutherAI/hendrycks_math.
    folder: str | None = None
    # MATH: one lm-eval task per subject, `{subject}` in the YAML filled from MATH_SUBJECTS.
    subjects: dict[str, str] = field(default_factory=dict)
    # ComplexWebQuestions has no hub copy `datasets` can load.
    needs_local_data: bool = False

    @property
    def data_folder(self) -> str:
        return self.folder or self.name


_SPECS = [
    TaskSpec("triviaqa", "knowledge", "f1"),
    TaskSpec("nq_open", "knowledge", "f1"),
    TaskSpec("hotpotqa", "knowledge", "f1"),
    TaskSpec("webqs", "knowledge", "f1"),
    TaskSpec("complex_web_questions", "knowledge", "f1", needs_local_data=True),
    # acc_norm (length-normalised log-likelihood) where lm-eval reports it; acc where it does
    # not (single-letter choices, partial scoring) -- the paper does not say which it used.
    TaskSpec("arc_challenge", "commonsense", "acc_norm"),
    TaskSpec("arc_easy", "commonsense", "acc_norm"),
    TaskSpec("commonsense_qa", "commonsense", "acc"),
    TaskSpec("hellaswag", "commonsense", "acc_norm"),
    TaskSpec("openbookqa", "commonsense", "acc_norm"),
    TaskSpec("piqa", "commonsense", "acc_norm"),
    TaskSpec("sciq", "commonsense", "acc_norm"),
    TaskSpec("social_iqa", "commonsense", "acc"),
    TaskSpec("winogrande", "commonsense", "acc"),
    TaskSpec("svamp", "math", "exact_match"),
    TaskSpec("gsm8k", "math", "exact_match"),
    TaskSpec("gsm_hard", "math", "exact_match"),
    TaskSpec("hendrycks_math", "math", "exact_match", subjects=MATH_SUBJECTS),
    TaskSpec(
        "minerva_math", "math", "exact_match", folder="hendrycks_math", subjects=MATH_SUBJECTS
    ),
]
TASKS: dict[str, TaskSpec] = {s.name: s for s in _SPECS}
SUITES: dict[str, tuple[str, ...]] = {
    cat: tuple(s.name for s in _SPECS if s.category == cat)
    for cat in ("knowledge", "commonsense", "math")
}
SUITES["all"] = tuple(TASKS)


def task_names(suite: str) -> list[str]:
    """Suite name or comma list of task names -> task names (in suite order, no duplicates)."""
    if suite in SUITES:
        return list(SUITES[suite])
    names = [s.strip() for s in suite.split(",") if s.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise UserError(
            f"unknown suite or task {', '.join(unknown) or repr(suite)}; "
            f"suites: {', '.join(SUITES)}; tasks: {', '.join(TASKS)}"
        )
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- configs


def _builtin_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _load_yaml(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=True)


def _load_base(rel: str) -> dict[str, Any]:
    """A built-in lm-eval task config with its includes and `!function`s resolved.

    Built-ins whose helper module cannot be imported here (minerva_math without lm-eval[math])
    are loaded with the function references left as path strings; the task YAML must then
    override every one of them (checked by `_check_resolved`).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    path = _builtin_dir() / rel
    if not path.is_file():
        raise UserError(f"lm-eval has no built-in task config {rel} (lm-eval 0.4.13 expected)")
    try:
        return load_yaml(path, resolve_func=True)
    except (ImportError, AssertionError):
        return load_yaml(path, resolve_func=False)


def _check_resolved(cfg: dict[str, Any], name: str) -> None:
    root = str(_builtin_dir())
    values = list(cfg.values()) + list((cfg.get("fewshot_config") or {}).values())
    left = [v for v in values if isinstance(v, str) and v.startswith(root)]
    if left:
        raise UserError(f"task {name}: built-in function(s) {left} could not be imported")


def _fill(value: Any, subject: str | None) -> Any:
    if subject is not None and isinstance(value, str):
        return value.replace("{subject}", subject)
    return value


def harness_config(spec: TaskSpec, subject: str | None = None) -> dict[str, Any]:
    """The full lm-eval task config (hub dataset) of one task or one MATH subject."""
    ours = _load_yaml(YAML_DIR / f"{spec.name}.yaml")
    base = _fill(ours.pop("base", None), subject)
    cfg = _load_base(base) if base else {}
    # lm-eval's `include:` semantics: the including file's keys replace the included ones.
    cfg.update({k: _fill(v, subject) for k, v in ours.items()})
    _check_resolved(cfg, spec.name)
    return cfg


def _find_split(folder: Path, split: str) -> tuple[Path, str] | None:
    for ext, builder in DATA_EXTENSIONS:
        path = folder / f"{split}.{ext}"
        if path.is_file():
            return path, builder
    return None


def _use_local_data(cfg: dict[str, Any], folder: Path, shots: int) -> None:
    """Point `cfg` at <folder>/<split>.* (absolute paths: the harness resolves relative ones
    against the working directory). Splits without a file are dropped from the config when
    nothing needs them, since the harness indexes every configured split at load time."""
    eval_key = "test_split" if cfg.get("test_split") else "validation_split"
    eval_split = cfg.get(eval_key)
    fewshot_cfg = cfg.get("fewshot_config") or {}
    fixed_shots = fewshot_cfg.get("samples") is not None and not cfg.get("fewshot_split")
    fewshot_split = None
    if shots > 0 and not fixed_shots:
        fewshot_split = cfg.get("fewshot_split") or cfg.get("training_split")

    data_files: dict[str, str] = {}
    builders: set[str] = set()
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        split = cfg.get(key)
        if not split:
            continue
        found = _find_split(folder, split)
        if found is None:
            if split in (eval_split, fewshot_split):
                why = "evaluation" if split == eval_split else f"{shots}-shot examples"
                raise DataError(
                    f"task {cfg['task']}: no {split}.jsonl/.json/.parquet in {folder} "
                    f"(needed for the {why})"
                )
            cfg[key] = None
            continue
        data_files[split] = str(found[0].resolve())
        builders.add(found[1])
    if len(builders) > 1:
        raise DataError(f"{folder}: mix of json and parquet split files; use one format")
    cfg["dataset_path"] = builders.pop()
    cfg["dataset_name"] = None
    cfg["dataset_kwargs"] = {"data_files": data_files}


def _check_fixed_shots(cfg: dict[str, Any]) -> None:
    """Tasks with fixed exemplars (gsm8k_cot, minerva) assert deep inside the harness when
    asked for more shots than they have; say it up front."""
    samples = (cfg.get("fewshot_config") or {}).get("samples")
    if samples is None or cfg.get("fewshot_split"):
        return
    available = len(samples() if callable(samples) else samples)
    if cfg["num_fewshot"] > available:
        raise UserError(
            f"task {cfg['task']} has {available} fixed few-shot exemplars; "
            f"num_fewshot={cfg['num_fewshot']} is too many"
        )


def build_configs(
    names: list[str], data_dir: str | os.PathLike | None, num_fewshot: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Suite task name -> the inline lm-eval configs it runs (several for MATH)."""
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"num_fewshot must be >= 0, got {num_fewshot}")
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"data dir {root} does not exist")
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        spec = TASKS[name]
        if root is None and spec.needs_local_data:
            raise UserError(
                f"task {name} has no hub copy loadable by `datasets`; pass a data dir holding "
                f"{name}/train.json and {name}/validation.json (see eval/tasks/README.md)"
            )
        configs = []
        for subject, hub_config in spec.subjects.items() or [(None, None)]:
            cfg = copy.copy(harness_config(spec, subject))
            if num_fewshot is not None:
                cfg["num_fewshot"] = num_fewshot
            cfg.setdefault("num_fewshot", 0)
            _check_fixed_shots(cfg)
            if root is not None:
                folder = root / spec.data_folder
                if hub_config is not None:
                    folder = folder / hub_config
                _use_local_data(cfg, folder, cfg["num_fewshot"])
            configs.append(cfg)
        out[name] = configs
    return out


# ---------------------------------------------------------------- running


def _metric_values(task_result: dict[str, Any]) -> dict[str, float]:
    """{"f1,none": .5, "f1_stderr,none": ..., "alias": ...} -> {"f1": .5}."""
    values: dict[str, float] = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr" in key or not isinstance(value, int | float):
            continue
        metric, filt = key.split(",", 1)
        values[metric if filt == "none" else key] = float(value)
    return values


def run_suite(
    lm: LM,
    suite: str,
    data_dir: str | os.PathLike | None,
    limit: int | None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate `lm` on a suite (or comma list of tasks) in one harness call.

    Returns {task: {"category", "primary", "score", "metrics", "n", "num_fewshot"}}; MATH
    entries pool their subjects (means weighted by the number of problems). `limit` caps the
    documents per harness task, so per MATH subject. Empty on non-zero ranks.
    """
    names = task_names(suite)
    configs = build_configs(names, data_dir, num_fewshot)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Inline dicts do not need an index: skip scanning lm-eval's ~10k built-in YAMLs.
    manager = TaskManager(include_defaults=False)
    out = simple_evaluate(
        model=lm,
        tasks=[cfg for cfgs in configs.values() for cfg in cfgs],
        task_manager=manager,
        limit=limit,
        cache_requests=False,  # the request cache is keyed on task name, not on the data
        bootstrap_iters=0,  # only means are reported; no stderr needed
        log_samples=False,
    )
    if out is None:  # not rank 0
        return {}

    results: dict[str, dict[str, Any]] = {}
    for name, cfgs in configs.items():
        spec = TASKS[name]
        totals: dict[str, float] = {}
        n_total = 0
        for cfg in cfgs:
            task = cfg["task"]
            if task not in out["results"]:
                raise DataError(f"the harness returned no result for {task}")
            n = int(out["n-samples"][task]["effective"])
            for metric, value in _metric_values(out["results"][task]).items():
                totals[metric] = totals.get(metric, 0.0) + value * n
            n_total += n
        metrics = {m: v / n_total for m, v in totals.items()} if n_total else {}
        if spec.primary not in metrics:
            raise DataError(f"task {name}: no {spec.primary!r} among metrics {sorted(metrics)}")
        results[name] = {
            "category": spec.category,
            "primary": spec.primary,
            "score": metrics[spec.primary],
            "metrics": metrics,
            "n": n_total,
            "num_fewshot": int(cfgs[0]["num_fewshot"]),
        }
    return results


__all__ = ["MATH_SUBJECTS", "SUITES", "TASKS", "TaskSpec", "build_configs", "run_suite"]
