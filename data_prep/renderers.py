"""Row -> text functions, one per hub schema.

A renderer turns one row (a dict as `datasets` yields it) into the text a model trains on.
Rows that cannot be rendered raise `SkipRow` with a short, low-cardinality reason, so the
loader can count skips per reason instead of crashing a long job on one bad row.

Downstream training sets are rendered in the same "Question: ...\\nAnswer: ..." shape that
lm-evaluation-harness prompts use, with the correct answer's text (not its letter), so the
model sees the evaluation format during pretraining (as the paper mixes those sets in).
The paper's own rendering is not published; these are documented choices.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]
Renderer = Callable[[Row], str]


class SkipRow(Exception):
    """This row cannot become a document; `reason` is counted by the loader."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- field access


def field(row: Row, name: str) -> Any:
    """A field that must be present and not null (datasets fills absent columns with None)."""
    value = row.get(name)
    if value is None:
        raise SkipRow(f"missing field {name!r}")
    return value


def text_field(row: Row, name: str) -> str:
    """A string field; utf-8 bytes are decoded, anything else is skipped.

    Whitespace-only values are rejected here too so that a template like
    "Question: {q}\\nAnswer: {a}" never yields a document with an empty half.
    """
    value = field(row, name)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise SkipRow("undecodable text") from None
    if not isinstance(value, str):
        raise SkipRow(f"non-string field {name!r}")
    if not value or value.isspace():  # as `not value.strip()`, without the copy
        raise SkipRow("empty text")
    return value


def _index(value: Any, name: str, n: int, base: int = 0) -> int:
    """A label given as int or numeric string ("1"), shifted by `base`, within [0, n)."""
    if value is None or value == "":
        raise SkipRow(f"missing field {name!r}")
    try:
        idx = int(value) - base
    except (TypeError, ValueError):
        raise SkipRow(f"malformed field {name!r}") from None
    if not 0 <= idx < n:  # e.g. -1 in unlabeled test splits
        raise SkipRow(f"malformed field {name!r}")
    return idx


def _choice_text(choices: Any, answer_key: Any) -> str:
    """Text of the choice whose label equals `answer_key` ({"label": [...], "text": [...]})."""
    if not isinstance(choices, Mapping):
        raise SkipRow("malformed field 'choices'")
    labels: Sequence[Any] = choices.get("label") or []
    texts: Sequence[Any] = choices.get("text") or []
    if len(labels) != len(texts) or not labels:
        raise SkipRow("malformed field 'choices'")
    key = str(answer_key).strip()
    for label, text in zip(labels, texts):
        if str(label).strip() == key:
            return text_field({"choice": text}, "choice")
    raise SkipRow("malformed field 'answerKey'")


def _qa(question: str, answer: str, sep: str = "\n") -> str:
    return f"Question: {question.strip()}{sep}Answer: {answer.strip()}"


# ---------------------------------------------------------------- pretraining corpora


def render_text(row: Row) -> str:
    """FineWeb-edu, Cosmopedia, Proof-Pile 2: the `text` column as is."""
    return text_field(row, "text")


def render_wikipedia(row: Row) -> str:
    """wikimedia/wikipedia: the article text does not repeat its title, so prepend it."""
    return f"{text_field(row, 'title').strip()}\n\n{text_field(row, 'text')}"


@dataclass(frozen=True)
class QARenderer:
    """Math instruction sets: "Question: {q}\\n\\nAnswer: {a}" (a common choice; see REFERENCE).

    A class rather than a closure so registry entries pickle into worker processes.
    """

    question: str
    answer: str

    def __call__(self, row: Row) -> str:
        return _qa(text_field(row, self.question), text_field(row, self.answer), sep="\n\n")


def qa_renderer(question: str, answer: str) -> Renderer:
    return QARenderer(question, answer)


def keep_correct(row: Row) -> bool:
    """OpenMathInstruct-1: keep a row unless it says is_correct=False (column may be absent)."""
    return row.get("is_correct") is not False


# ---------------------------------------------------------------- downstream training sets


def render_triviaqa(row: Row) -> str:
    answer = field(row, "answer")
    if not isinstance(answer, Mapping):
        raise SkipRow("malformed field 'answer'")
    return _qa(text_field(row, "question"), text_field(answer, "value"))


def render_nq_open(row: Row) -> str:
    answers = field(row, "answer")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, Sequence) or not answers:
        raise SkipRow("missing field 'answer'")
    return _qa(text_field(row, "question"), text_field({"answer": answers[0]}, "answer"))


def render_arc(row: Row) -> str:
    """ai2_arc (labels are A-D, sometimes 1-4), commonsense_qa (A-E): same layout."""
    answer = _choice_text(field(row, "choices"), field(row, "answerKey"))
    return _qa(text_field(row, "question"), answer)


def render_openbookqa(row: Row) -> str:
    answer = _choice_text(field(row, "choices"), field(row, "answerKey"))
    return _qa(text_field(row, "question_stem"), answer)


_HELLASWAG_BRACKETS = re.compile(r"\[.*?\]")


def _hellaswag_clean(text: str) -> str:
    """WikiHow artifacts removed as lm-eval's hellaswag preprocess does."""
    text = text.strip().replace(" [title]", ". ")
    text = _HELLASWAG_BRACKETS.sub("", text)
    return text.replace("  ", " ")


def render_hellaswag(row: Row) -> str:
    """ "{activity_label}: {ctx} {correct ending}" (label is a string "0".."3")."""
    endings = field(row, "endings")
    if not isinstance(endings, Sequence) or isinstance(endings, str) or not endings:
        raise SkipRow("malformed field 'endings'")
    ending = text_field(
        {"ending": endings[_index(row.get("label"), "label", len(endings))]}, "ending"
    )
    ctx = _hellaswag_clean(text_field(row, "ctx"))
    label = row.get("activity_label")
    prefix = f"{label.strip()}: " if isinstance(label, str) and label.strip() else ""
    return f"{prefix}{ctx} {_hellaswag_clean(ending)}"


def render_piqa(row: Row) -> str:
    """label 0 -> sol1, 1 -> sol2 (test split has -1: skipped)."""
    sols = (text_field(row, "sol1"), text_field(row, "sol2"))
    return _qa(text_field(row, "goal"), sols[_index(row.get("label"), "label", 2)])


def render_siqa(row: Row) -> str:
    """social_i_qa: label "1"/"2"/"3" picks answerA/B/C."""
    answers = (text_field(row, "answerA"), text_field(row, "answerB"), text_field(row, "answerC"))
    idx = _index(row.get("label"), "label", 3, base=1)
    question = f"{text_field(row, 'context').strip()} {text_field(row, 'question').strip()}"
    return _qa(question, answers[idx])


def render_winogrande(row: Row) -> str:
    """The sentence with its blank ("_") filled by the correct option ("1"/"2")."""
    sentence = text_field(row, "sentence")
    options = (text_field(row, "option1"), text_field(row, "option2"))
    if "_" not in sentence:
        raise SkipRow("malformed field 'sentence'")
    return sentence.replace("_", options[_index(row.get("answer"), "answer", 2, base=1)], 1)


def render_commonsense_qa(row: Row) -> str:
    return render_arc(row)


def render_sciq(row: Row) -> str:
    """lm-eval's sciq layout: the supporting paragraph (often empty), then Q/A."""
    support = row.get("support")
    qa = _qa(text_field(row, "question"), text_field(row, "correct_answer"))
    if isinstance(support, str) and support.strip():
        return f"{support.strip()}\n{qa}"
    return qa


def render_gsm8k(row: Row) -> str:
    """The answer keeps its worked solution and the final "#### n" line."""
    return _qa(text_field(row, "question"), text_field(row, "answer"))
