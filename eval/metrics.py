"""Answer-level metrics for the generation benchmarks.

- World knowledge (TriviaQA, NQ, HotpotQA, WebQuestions, ComplexWebQuestions): token-level F1
  and exact match after the SQuAD answer normalisation (lowercase, drop punctuation, drop the
  articles a/an/the, collapse whitespace), maximised over the gold aliases. The paper reports F1.
- Math word problems (SVAMP, GSM8k, GSM-Hard): the final number of the generation is compared
  numerically with the gold number.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower, remove punctuation, remove articles, fix whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between the normalised prediction and gold (SQuAD definition).

    Two empty answers match (F1 1); one empty answer against a non-empty one scores 0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_golds(
    metric: Callable[[str, str], float], prediction: str, golds: Iterable[str]
) -> float:
    """Best score of `prediction` against any gold alias (0 when there is no gold)."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def qa_scores(prediction: str, golds: Iterable[str]) -> dict[str, float]:
    """{"f1", "exact_match"} of one generated answer against its gold aliases."""
    golds = [g for g in golds if g is not None]
    return {
        "f1": max_over_golds(f1_score, prediction, golds),
        "exact_match": max_over_golds(exact_match_score, prediction, golds),
    }


# ---------------------------------------------------------------- numbers (math word problems)

_NUM = r"-?[$]?\s*-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_HASH_ANSWER = re.compile(r"####\s*(" + _NUM + ")")
# "The answer is 42." (gsm8k-cot exemplars), "The answer is: 42" (MetaMathQA style).
_THE_ANSWER = re.compile(r"[Tt]he (?:final )?answer is:?\s*\$?\s*(" + _NUM + ")")
_ANY_NUMBER = re.compile(_NUM)


def parse_number(text: str) -> float | None:
    """'1,234' -> 1234.0, '$5' -> 5.0, '-3.50' -> -3.5; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_final_number(generation: str) -> float | None:
    """The model's final numeric answer.

    Preference order: GSM8k's `#### n`, then `The answer is n`, then the last number in the
    text (a model that answers with a bare number, or with working but no answer phrase).
    """
    for pattern in (_HASH_ANSWER, _THE_ANSWER):
        matches = pattern.findall(generation)
        if matches:
            return parse_number(matches[-1])
    numbers = _ANY_NUMBER.findall(generation)
    for candidate in reversed(numbers):
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def numbers_match(prediction: float | None, gold: float | None) -> bool:
    """Numeric equality up to float round-off (GSM-Hard golds are floats like 3.0000000001)."""
    if prediction is None or gold is None:
        return False
    return math.isclose(prediction, gold, rel_tol=1e-6, abs_tol=1e-6)


def format_number(value: float | int | str) -> str:
    """Gold numbers as a model would write them: 27.0 -> '27', 2.5 -> '2.5'."""
    number = parse_number(str(value)) if not isinstance(value, int | float) else float(value)
    if number is None:
        return str(value).strip()
    if number == int(number) and abs(number) < 1e15:
        return str(int(number))
    return repr(number)
