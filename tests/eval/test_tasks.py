"""The benchmark suites end to end through the real harness (lm_eval.simple_evaluate).

Every task reads tiny local files in its hub schema (demo/fixtures.py). Two scripted models
answer from the document the harness attaches to each request, using gold answers derived here
from the raw schema (independently of the task configs): an oracle must score exactly 1 and an
always-wrong model exactly 0 on every primary metric. All tasks run in one harness call per
model (task loading dominates the run time).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from demo.fixtures import FIXTURES, fixture_docs, write_fixtures
from eval.tasks import MATH_SUBJECTS, SUITES, TASKS, build_configs, run_suite, task_names
from mop.errors import DataError, UserError
from mop.results import category_means

Doc = dict[str, Any]

# ---------------------------------------------------------------- gold answers from the schemas

_LETTERS = "ABCDE"

# multiple choice: task -> (gold choice index, text that the gold request must contain)
MC_GOLD: dict[str, tuple[Callable[[Doc], int], Callable[[Doc], str]]] = {
    "arc_challenge": (
        lambda d: d["choices"]["label"].index(d["answerKey"]),
        lambda d: d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])],
    ),
    "commonsense_qa": (lambda d: _LETTERS.index(d["answerKey"]), lambda d: " " + d["answerKey"]),
    "hellaswag": (lambda d: int(d["label"]), lambda d: d["endings"][int(d["label"])]),
    "openbookqa": (
        lambda d: d["choices"]["label"].index(d["answerKey"].strip()),
        lambda d: d["choices"]["text"][d["choices"]["label"].index(d["answerKey"].strip())],
    ),
    "piqa": (lambda d: int(d["label"]), lambda d: [d["sol1"], d["sol2"]][int(d["label"])]),
    "sciq": (lambda d: 3, lambda d: d["correct_answer"]),
    "social_iqa": (
        lambda d: int(d["label"]) - 1,
        lambda d: d["answer" + "ABC"[int(d["label"]) - 1]],
    ),
    "winogrande": (
        lambda d: int(d["answer"]) - 1,
        lambda d: d["option" + d["answer"]],
    ),
}
MC_GOLD["arc_easy"] = MC_GOLD["arc_challenge"]


def _boxed(solution: str) -> str:
    return re.search(r"\\boxed\{(.*)\}\$", solution).group(1)


def _integer(x: Any) -> int:
    return int(float(x))


# generation: task -> the gold answer as the model should write it
GEN_GOLD: dict[str, Callable[[Doc], str]] = {
    "triviaqa": lambda d: d["answer"]["value"],
    "nq_open": lambda d: d["answer"][0],
    "hotpotqa": lambda d: d["answer"],
    "webqs": lambda d: d["answers"][0],
    "complex_web_questions": lambda d: d["answers"][0]["answer"],
    "gsm8k": lambda d: f"She adds them up. The answer is {d['answer'].split('####')[-1].strip()}.",
    "svamp": lambda d: f"{d['Body']} So the answer is {_integer(d['Answer'])}.",
    "gsm_hard": lambda d: f"Multiply. The answer is {_integer(d['target'])}.",
    "hendrycks_math": lambda d: _boxed(d["solution"]),
    "minerva_math": lambda d: (
        f"Final Answer: The final answer is ${_boxed(d['solution'])}$. I hope it is correct."
    ),
}
GEN_WRONG: dict[str, str] = {
    "knowledge": "zzz qqq",
    "gsm8k": "The answer is -987654.",
    "svamp": "The answer is -987654.",
    "gsm_hard": "The answer is -987654.",
    "hendrycks_math": "-987654",
    "minerva_math": "Final Answer: The final answer is $-987654$. I hope it is correct.",
}


def suite_task(harness_task: str) -> str:
    """mop_hendrycks_math_algebra -> hendrycks_math, mop_arc_easy -> arc_easy."""
    name = harness_task.removeprefix("mop_")
    for math_task in ("hendrycks_math", "minerva_math"):
        if name.startswith(math_task + "_"):
            return math_task
    return name


class ScriptedLM:
    """Builds `lm_eval.api.model.LM` subclasses lazily (lm_eval imports `datasets`, whose
    cache location must be read after the offline fixture set HF_HOME)."""

    @staticmethod
    def make(right: bool) -> Any:
        from lm_eval.api.model import LM

        class Scripted(LM):
            def __init__(self) -> None:
                super().__init__()
                self.requests: list[tuple[str, str, tuple]] = []  # (task, kind, args)

            def loglikelihood(self, requests):  # type: ignore[override]
                out = []
                for req in requests:
                    task = suite_task(req.task_name)
                    self.requests.append((task, "loglikelihood", req.args))
                    gold_idx, gold_text = MC_GOLD[task]
                    is_gold = req.idx == gold_idx(req.doc)
                    if is_gold and right:
                        # the gold request carries the gold choice text (a config mistake in
                        # doc_to_choice / doc_to_target would break this)
                        assert gold_text(req.doc) in "".join(req.args), (task, req.args)
                    out.append((-0.5, True) if is_gold == right else (-50.0, False))
                return out

            def loglikelihood_rolling(self, requests):  # type: ignore[override]
                raise AssertionError("no benchmark here scores rolling log-likelihoods")

            def generate_until(self, requests):  # type: ignore[override]
                out = []
                for req in requests:
                    task = suite_task(req.task_name)
                    self.requests.append((task, "generate_until", req.args))
                    if right:
                        out.append(GEN_GOLD[task](req.doc))
                    else:
                        out.append(GEN_WRONG.get(task, GEN_WRONG["knowledge"]))
                return out

        return Scripted()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def offline_datasets(tmp_path_factory, hf_offline):
    """Pin `datasets` to a private cache even if it was imported before HF_HOME was set."""
    import datasets

    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("hf_datasets")
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()
    yield cache
    mp.undo()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def oracle_run(data_root, offline_datasets) -> tuple[dict, Any]:
    lm = ScriptedLM.make(right=True)
    return run_suite(lm, "all", str(data_root), limit=None), lm


@pytest.fixture(scope="module")
def wrong_run(data_root, offline_datasets) -> dict:
    return run_suite(ScriptedLM.make(right=False), "all", str(data_root), limit=None)


def expected_n(task: str) -> int:
    spec = TASKS[task]
    cfg = build_configs([task], None)[task][0] if not spec.needs_local_data else None
    split = "validation" if cfg is None else (cfg.get("test_split") or cfg["validation_split"])
    if spec.subjects:
        return sum(
            len(fixture_docs(f"{spec.data_folder}/{s}", split)) for s in spec.subjects.values()
        )
    return len(fixture_docs(spec.data_folder, split))


DEFAULT_SHOTS = {
    **dict.fromkeys(SUITES["knowledge"], 5),
    **dict.fromkeys(SUITES["commonsense"], 0),
    "svamp": 8,
    "gsm8k": 8,
    "gsm_hard": 8,
    "hendrycks_math": 4,
    "minerva_math": 4,
}


# ---------------------------------------------------------------- end to end


def test_oracle_scores_one_everywhere(oracle_run):
    results, _ = oracle_run
    assert list(results) == list(SUITES["all"])
    for task, entry in results.items():
        spec = TASKS[task]
        assert entry["category"] == spec.category
        assert entry["primary"] == spec.primary
        assert entry["score"] == 1.0, (task, entry)
        assert entry["metrics"][spec.primary] == 1.0
        assert entry["n"] == expected_n(task), (task, entry["n"])
        assert entry["num_fewshot"] == DEFAULT_SHOTS[task]
    for task in SUITES["knowledge"]:
        assert results[task]["metrics"] == {"f1": 1.0, "exact_match": 1.0}
    for task in ("arc_easy", "hellaswag", "piqa"):
        assert results[task]["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    assert category_means(results) == {"knowledge": 1.0, "commonsense": 1.0, "math": 1.0}


def test_wrong_model_scores_zero_everywhere(wrong_run):
    assert list(wrong_run) == list(SUITES["all"])
    for task, entry in wrong_run.items():
        assert entry["score"] == 0.0, (task, entry)
        assert all(v == 0.0 for v in entry["metrics"].values()), (task, entry["metrics"])
        assert entry["n"] == expected_n(task)


def test_prompts_carry_the_configured_shots(oracle_run):
    _, lm = oracle_run
    contexts: dict[str, list[str]] = {}
    for task, _kind, args in lm.requests:
        contexts.setdefault(task, []).append(args[0])
    # one question marker per shot plus the question asked
    markers = {
        "triviaqa": ("Question:", 6),
        "hotpotqa": ("Question:", 6),
        "webqs": ("Question:", 6),
        "complex_web_questions": ("Question:", 6),
        "nq_open": ("Q:", 6),
        "gsm8k": ("Q:", 9),
        "svamp": ("Q:", 9),
        "gsm_hard": ("Q:", 9),
        "hendrycks_math": ("Problem:", 5),
        "minerva_math": ("Problem:", 5),
        "arc_easy": ("Question:", 1),
    }
    for task, (marker, count) in markers.items():
        assert contexts[task], task
        assert all(c.count(marker) == count for c in contexts[task]), (task, contexts[task][0])
    # knowledge shots come from the local train split, never from the evaluation split
    assert all("train fixture" in c for c in contexts["triviaqa"])
    assert not any(c.count("validation fixture") > 1 for c in contexts["triviaqa"])
    # the MATH exemplars of Minerva are lm-eval's fixed four, not our train files
    assert all("(algebra, train)" not in c for c in contexts["minerva_math"])


def test_limit_comma_list_and_shot_override(data_root, offline_datasets):
    lm = ScriptedLM.make(right=True)
    res = run_suite(lm, "arc_easy, triviaqa", str(data_root), limit=2, num_fewshot=1)
    assert list(res) == ["arc_easy", "triviaqa"]
    for entry in res.values():
        assert entry["n"] == 2
        assert entry["num_fewshot"] == 1
        assert entry["score"] == 1.0
    arc = [args[0] for task, _, args in lm.requests if task == "arc_easy"]
    assert arc and all(c.count("Question:") == 2 for c in arc)


# ---------------------------------------------------------------- configs and errors


def test_unknown_suite_or_task_lists_valid_names():
    with pytest.raises(UserError, match="knowledge.*triviaqa"):
        task_names("reasoning")
    with pytest.raises(UserError, match="gsm9k"):
        task_names("gsm8k,gsm9k")
    with pytest.raises(UserError):
        run_suite(object(), "nope", None, None)  # type: ignore[arg-type]
    assert task_names("math") == list(SUITES["math"])
    assert task_names("piqa,sciq,piqa") == ["piqa", "sciq"]


def test_suites_cover_the_paper():
    assert set(SUITES["knowledge"]) == {
        "triviaqa", "nq_open", "hotpotqa", "webqs", "complex_web_questions",
    }  # fmt: skip
    assert len(SUITES["commonsense"]) == 9
    assert set(SUITES["math"]) == {"svamp", "gsm8k", "gsm_hard", "hendrycks_math", "minerva_math"}
    assert SUITES["all"] == SUITES["knowledge"] + SUITES["commonsense"] + SUITES["math"]


def test_hub_configs_keep_the_real_datasets():
    names = [n for n in SUITES["all"] if not TASKS[n].needs_local_data]
    cfgs = build_configs(names, None)
    paths = {n: (c[0]["dataset_path"], c[0].get("dataset_name")) for n, c in cfgs.items()}
    assert paths["triviaqa"] == ("mandarjoshi/trivia_qa", "rc.nocontext")
    assert paths["hotpotqa"] == ("hotpotqa/hotpot_qa", "distractor")
    assert paths["svamp"] == ("ChilleD/SVAMP", None)
    assert paths["gsm_hard"] == ("reasoning-machines/gsm-hard", None)
    assert paths["winogrande"] == ("allenai/winogrande", "winogrande_xl")
    assert len(cfgs["minerva_math"]) == len(MATH_SUBJECTS)
    assert {c["dataset_name"] for c in cfgs["hendrycks_math"]} == set(MATH_SUBJECTS.values())
    for task, cfgs_ in cfgs.items():
        for cfg in cfgs_:
            assert "dataset_kwargs" not in cfg or "data_files" not in (cfg["dataset_kwargs"] or {})
            assert cfg["task"].startswith("mop_"), task


def test_local_configs_use_absolute_paths(data_root):
    cfgs = build_configs(list(SUITES["all"]), data_root)
    for task, cfgs_ in cfgs.items():
        for cfg in cfgs_:
            assert cfg["dataset_path"] in ("json", "parquet")
            for path in cfg["dataset_kwargs"]["data_files"].values():
                assert Path(path).is_absolute() and Path(path).is_file(), (task, path)


def test_missing_local_files_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_configs(["piqa"], tmp_path / "absent")
    with pytest.raises(DataError, match="validation"):
        build_configs(["piqa"], tmp_path)
    # the 0-shot default needs no train file; asking for shots does
    write_fixtures(tmp_path, ["piqa"])
    (tmp_path / "piqa" / "train.jsonl").unlink()
    assert build_configs(["piqa"], tmp_path)["piqa"][0]["training_split"] is None
    with pytest.raises(DataError, match="train"):
        build_configs(["piqa"], tmp_path, num_fewshot=2)
    with pytest.raises(UserError, match="data dir"):
        build_configs(["complex_web_questions"], None)
    with pytest.raises(UserError, match="8 fixed few-shot exemplars"):
        build_configs(["gsm8k"], None, num_fewshot=9)
    assert build_configs(["gsm8k"], None, num_fewshot=2)["gsm8k"][0]["num_fewshot"] == 2


def test_fixtures_cover_every_task(tmp_path):
    write_fixtures(tmp_path)
    for task in SUITES["all"]:
        spec = TASKS[task]
        folders = (
            [f"{spec.data_folder}/{s}" for s in spec.subjects.values()]
            if spec.subjects
            else [spec.data_folder]
        )
        for folder in folders:
            assert folder in FIXTURES
            assert any((tmp_path / folder).glob("*.json*")), folder


def test_parquet_split_files(tmp_path, offline_datasets):
    import pandas as pd

    write_fixtures(tmp_path, ["piqa"])
    for jsonl in (tmp_path / "piqa").glob("*.jsonl"):
        pd.read_json(jsonl, lines=True).to_parquet(jsonl.with_suffix(".parquet"))
        jsonl.unlink()
    cfg = build_configs(["piqa"], tmp_path)["piqa"][0]
    assert cfg["dataset_path"] == "parquet"
    res = run_suite(ScriptedLM.make(right=True), "piqa", tmp_path, limit=None)
    assert res["piqa"]["score"] == 1.0 and res["piqa"]["n"] == len(
        fixture_docs("piqa", "validation")
    )
