"""Python hooks referenced from the task YAMLs of this folder (`!function utils.<name>`).

lm-eval imports this file by path, so it only uses absolute imports of the `eval` package.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.metrics import extract_final_number, format_number, numbers_match, qa_scores

# ---------------------------------------------------------------- world knowledge (F1 + EM)


def _first_line(generation: str) -> str:
    # The harness leaves cutting at `until` to the model; a model that ignores "\n" would
    # otherwise be scored on a whole paragraph.
    return generation.strip().split("\n", 1)[0].strip()


def _qa_results(golds: Callable[[dict], list[str]]) -> Callable[[dict, list[str]], dict]:
    def process_results(doc: dict, results: list[str]) -> dict[str, float]:
        return qa_scores(_first_line(results[0]), golds(doc))

    return process_results


def triviaqa_golds(doc: dict) -> list[str]:
    # `aliases` already contains `value`; normalized_aliases adds nothing after normalisation.
    answer = doc["answer"]
    return [answer["value"], *answer["aliases"]]


def nq_open_golds(doc: dict) -> list[str]:
    return list(doc["answer"])


def hotpotqa_golds(doc: dict) -> list[str]:
    return [doc["answer"]]


def webqs_golds(doc: dict) -> list[str]:
    return list(doc["answers"])


def cwq_golds(doc: dict) -> list[str]:
    # Raw ComplexWebQuestions json: answers = [{"answer": str, "answer_id": str, "aliases": [..]}]
    golds: list[str] = []
    for ans in doc["answers"]:
        golds.append(ans["answer"])
        golds.extend(ans.get("aliases") or [])
    return golds


triviaqa_results = _qa_results(triviaqa_golds)
nq_open_results = _qa_results(nq_open_golds)
hotpotqa_results = _qa_results(hotpotqa_golds)
webqs_results = _qa_results(webqs_golds)
cwq_results = _qa_results(cwq_golds)


def cwq_first_answer(doc: dict) -> str:
    """Few-shot target of ComplexWebQuestions: its first gold answer."""
    return doc["answers"][0]["answer"]


# ---------------------------------------------------------------- math word problems

# SVAMP and GSM-Hard reuse lm-eval's gsm8k-cot config (prompt `Q: {{question}}\nA:`, its 8
# chain-of-thought exemplars, target `{{... else target}}`), so their docs are mapped onto the
# fields that config reads: `question` and `target` (the gold number as text).


def svamp_docs(dataset: Any) -> Any:
    def _map(doc: dict) -> dict:
        body = doc["Body"].strip()
        question = doc["Question"].strip()
        sep = "" if body.endswith((" ", "\n")) else " "
        return {"question": f"{body}{sep}{question}", "target": format_number(doc["Answer"])}

    return dataset.map(_map)


def gsm_hard_docs(dataset: Any) -> Any:
    def _map(doc: dict) -> dict:
        return {"question": doc["input"], "target": format_number(doc["target"])}

    # Drop the float column first, or `datasets` casts the new text back to float ("12.0").
    return dataset.map(_map, remove_columns=["target"])


def _gold_number(doc: dict) -> float | None:
    if "answer" in doc and isinstance(doc["answer"], str) and "####" in doc["answer"]:
        return extract_final_number(doc["answer"])  # gsm8k: solution ending in "#### n"
    return extract_final_number(str(doc["target"]))


def math_word_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = extract_final_number(results[0])
    return {"exact_match": float(numbers_match(prediction, _gold_number(doc)))}


# ---------------------------------------------------------------- Minerva MATH

# lm-eval's minerva_math/utils.py refuses to import without sympy + math_verify + antlr4 4.11
# (`lm-eval[math]`). When they are installed we use it as is (sympy equivalence); otherwise we
# load only its pure-Python helpers (answer extraction, the Minerva normalisation, the 4
# exemplars) from its source and score exact match on the normalised strings.
_MINERVA_SRC = Path(__import__("lm_eval").__file__).parent / "tasks" / "minerva_math" / "utils.py"
_MINERVA_PURE = (
    "list_fewshot_samples",
    "last_boxed_only_string",
    "remove_boxed",
    "get_unnormalized_answer",
    "SUBSTITUTIONS",
    "REMOVED_EXPRESSIONS",
    "normalize_final_answer",
)


def _load_minerva() -> tuple[dict[str, Any], bool]:
    try:
        from lm_eval.tasks.minerva_math import utils as full  # type: ignore[import-not-found]

        return vars(full), True
    except (ImportError, AssertionError):
        pass
    tree = ast.parse(_MINERVA_SRC.read_text())

    def wanted(node: ast.stmt) -> bool:
        if isinstance(node, ast.FunctionDef):
            return node.name in _MINERVA_PURE
        if isinstance(node, ast.Assign):
            return any(isinstance(t, ast.Name) and t.id in _MINERVA_PURE for t in node.targets)
        return False

    keep = [node for node in tree.body if wanted(node)]
    namespace: dict[str, Any] = {"re": re, "__name__": "minerva_pure"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(_MINERVA_SRC), "exec"), namespace)
    missing = [name for name in _MINERVA_PURE if name not in namespace]
    if missing:
        raise ImportError(f"lm-eval's {_MINERVA_SRC} no longer defines {missing}")
    return namespace, False


_MINERVA, MINERVA_SYMPY = _load_minerva()


def minerva_doc_to_text(doc: dict) -> str:
    if MINERVA_SYMPY:
        return _MINERVA["doc_to_text"](doc)
    return "Problem:" + "\n" + doc["problem"] + "\n\n" + "Solution:"


def minerva_docs(dataset: Any) -> Any:
    if MINERVA_SYMPY:
        return _MINERVA["process_docs"](dataset)
    norm, last_boxed, remove_boxed = (
        _MINERVA["normalize_final_answer"],
        _MINERVA["last_boxed_only_string"],
        _MINERVA["remove_boxed"],
    )

    def _map(doc: dict) -> dict:
        return {
            "problem": doc["problem"],
            "solution": doc["solution"],
            "answer": norm(remove_boxed(last_boxed(doc["solution"]))),
        }

    return dataset.map(_map)


def minerva_fewshot_samples() -> list[dict]:
    return _MINERVA["list_fewshot_samples"]()


def minerva_results(doc: dict, results: list[str]) -> dict[str, float]:
    if MINERVA_SYMPY:
        return {"exact_match": float(_MINERVA["process_results"](doc, results)["exact_match"])}
    answer = _MINERVA["normalize_final_answer"](_MINERVA["get_unnormalized_answer"](results[0]))
    return {"exact_match": float(answer == doc["answer"])}
