"""Tiny local copies of every benchmark, in each hub dataset's own schema.

`write_fixtures(root)` writes `<root>/<folder>/<split>.jsonl` (ComplexWebQuestions: `.json`,
a JSON array like its raw release) for every task of eval/tasks, with the splits the task
evaluates on and the split its few-shot examples come from. The layout is the one
`run_suite(..., data_dir=root)` reads, so the same files serve the tests and a demo run, and
show where real data must go. Field names and types follow the hub datasets
(fields a task does not read may be omitted; extra fields are ignored).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.tasks import MATH_SUBJECTS, TASKS

Doc = dict[str, Any]
# Enough few-shot candidates for the default 5-shot knowledge tasks (the harness samples
# without replacement and fails on a smaller pool).
N_FEWSHOT_DOCS = 6

_THINGS = ["Paris", "Jupiter", "copper", "Mozart", "Nile", "oxygen", "Everest", "Tokyo"]
_PEOPLE = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]


def _thing(i: int) -> str:
    return f"{_THINGS[i % len(_THINGS)]} {i}"


# ---------------------------------------------------------------- world knowledge


def _triviaqa(i: int, split: str) -> Doc:
    value = f"Answer {_thing(i)}"
    return {
        "question": f"Which {split} fixture item number {i} is asked about",
        "question_id": f"tqa_{split}_{i}",
        "question_source": "http://www.quiz-zone.co.uk/",
        "answer": {
            "aliases": [value, f"{value} alias"],
            "normalized_aliases": [value.lower(), f"{value.lower()} alias"],
            "matched_wiki_entity_name": "",
            "normalized_matched_wiki_entity_name": "",
            "normalized_value": value.lower(),
            "type": "WikipediaEntity",
            "value": value,
        },
    }


def _nq_open(i: int, split: str) -> Doc:
    return {"question": f"who owns {split} fixture thing {i}", "answer": [_thing(i), f"Mr {i}"]}


def _hotpotqa(i: int, split: str) -> Doc:
    return {
        "id": f"hp_{split}_{i}",
        "question": f"Which {split} fixture bridge entity number {i} links both articles?",
        "answer": _thing(i),
        "type": "bridge" if i % 2 else "comparison",
        "level": "medium",
        "supporting_facts": {"title": [f"Title {i}"], "sent_id": [0]},
        "context": {"title": [f"Title {i}"], "sentences": [[f"{_thing(i)} is a thing."]]},
    }


def _webqs(i: int, split: str) -> Doc:
    return {
        "url": f"http://www.freebase.com/view/en/fixture_{i}",
        "question": f"what is the {split} fixture capital number {i}?",
        "answers": [_thing(i), f"City {i}"],
    }


def _cwq(i: int, split: str) -> Doc:
    return {
        "ID": f"WebQ_{split}_{i}_cwq",
        "webqsp_ID": f"WebQTest-{i}",
        "webqsp_question": f"what is fixture place {i}",
        "machine_question": f"what is fixture place {i} that has thing {i}",
        "question": f"What {split} fixture place {i} has the thing number {i}?",
        "sparql": "SELECT DISTINCT ?x WHERE { ?x ns:fixture ?y . }",
        "compositionality_type": "conjunction",
        "answers": [{"answer": _thing(i), "answer_id": f"m.0{i}", "aliases": [f"Place {i}"]}],
        "created": "2018-02-13T22:47:56",
    }


# ---------------------------------------------------------------- commonsense


def _arc(i: int, split: str) -> Doc:
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"arc_{split}_{i}",
        "question": f"Which {split} fixture material number {i} conducts heat best?",
        "choices": {"text": [f"wood {i}", f"metal {i}", f"glass {i}", f"air {i}"], "label": labels},
        "answerKey": labels[i % 4],
    }


def _commonsense_qa(i: int, split: str) -> Doc:
    labels = ["A", "B", "C", "D", "E"]
    return {
        "id": f"csqa_{split}_{i}",
        "question": f"Where would you put {split} fixture object {i}?",
        "question_concept": "object",
        "choices": {"label": labels, "text": [f"place {c} {i}" for c in "vwxyz"]},
        "answerKey": labels[i % 5],
    }


def _hellaswag(i: int, split: str) -> Doc:
    ctx_a = f"A person {i} is standing in a {split} kitchen."
    ctx_b = "then"
    return {
        "ind": i,
        "activity_label": "Cooking",
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}",
        "endings": [f"they cook dish {i}.", "they fly away.", "they sing loudly.", "they sleep."],
        "source_id": f"activitynet~v_{i}",
        "split": "val" if split == "validation" else split,
        "split_type": "indomain",
        "label": str(i % 4),
    }


def _openbookqa(i: int, split: str) -> Doc:
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"obqa_{split}_{i}",
        "question_stem": f"The {split} fixture sun number {i} is responsible for",
        "choices": {
            "text": [f"plants {i}", f"rocks {i}", f"tides {i}", f"wind {i}"],
            "label": labels,
        },
        "answerKey": labels[(i + 1) % 4],
    }


def _piqa(i: int, split: str) -> Doc:
    return {
        "goal": f"How do I open {split} fixture jar {i}?",
        "sol1": f"Twist the lid of jar {i}.",
        "sol2": f"Throw jar {i} at a wall.",
        "label": i % 2,
    }


def _sciq(i: int, split: str) -> Doc:
    return {
        "question": f"What gas do {split} fixture plants number {i} absorb?",
        "distractor3": f"helium {i}",
        "distractor1": f"neon {i}",
        "distractor2": f"argon {i}",
        "correct_answer": f"carbon dioxide {i}",
        "support": f"Plants number {i} absorb carbon dioxide.",
    }


def _social_iqa(i: int, split: str) -> Doc:
    return {
        "context": f"{_PEOPLE[i % 8]} helped a friend move {split} house {i}.",
        "question": "How would the friend feel?",
        "answerA": f"grateful {i}",
        "answerB": f"angry {i}",
        "answerC": f"bored {i}",
        "label": str(i % 3 + 1),
    }


def _winogrande(i: int, split: str) -> Doc:
    a, b = _PEOPLE[i % 8], _PEOPLE[(i + 3) % 8]
    return {
        "sentence": f"{a} lent {b} a {split} book {i} because _ had finished reading it.",
        "option1": a,
        "option2": b,
        "answer": str(i % 2 + 1),
    }


# ---------------------------------------------------------------- math


def _gsm8k(i: int, split: str) -> Doc:
    return {
        "question": f"A {split} farmer has {i + 3} cows and buys {2 * i + 1} more. How many cows?",
        "answer": f"{i + 3} + {2 * i + 1} = <<{i + 3}+{2 * i + 1}={3 * i + 4}>>{3 * i + 4}\n"
        f"#### {3 * i + 4}",
    }


def _svamp(i: int, split: str) -> Doc:
    return {
        "ID": f"chal-{split}-{i}",
        "Body": f"Jack had {i + 10} {split} apples. He gave {i + 2} apples to Jill.",
        "Question": "How many apples does Jack have now?",
        "Equation": f"( {i + 10}.0 - {i + 2}.0 )",
        "Answer": 8.0,
        "Type": "Subtraction",
        "question_concat": f"Jack had {i + 10} apples. ... How many apples does Jack have now?",
    }


def _gsm_hard(i: int, split: str) -> Doc:
    big = 1_000_003 * (i + 1)
    return {
        "input": f"A {split} shop sells {big} pens a day for {i + 2} days. How many pens?",
        "code": f"def solution():\n    return {big} * {i + 2}\n",
        "target": float(big * (i + 2)),
    }


def _math(subject: str) -> Callable[[int, str], Doc]:
    def make(i: int, split: str) -> Doc:
        answer = f"\\frac{{{i + 1}}}{{{i + 2}}}" if i % 2 else str(7 * i + 3)
        return {
            "problem": f"({subject}, {split}) Compute the fixture quantity number {i}.",
            "level": f"Level {i % 5 + 1}",
            "type": subject.replace("_", " ").title(),
            "solution": f"Working it out, the quantity is $\\boxed{{{answer}}}$.",
        }

    return make


# folder -> (maker, {split: number of docs}); MATH subjects are added below.
_N_EVAL = 4
FIXTURES: dict[str, tuple[Callable[[int, str], Doc], dict[str, int]]] = {
    "triviaqa": (_triviaqa, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "nq_open": (_nq_open, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "hotpotqa": (_hotpotqa, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "webqs": (_webqs, {"train": N_FEWSHOT_DOCS, "test": _N_EVAL}),
    "complex_web_questions": (_cwq, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "arc_challenge": (_arc, {"train": N_FEWSHOT_DOCS, "validation": 3, "test": _N_EVAL}),
    "arc_easy": (_arc, {"train": N_FEWSHOT_DOCS, "validation": 3, "test": _N_EVAL}),
    "commonsense_qa": (_commonsense_qa, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "hellaswag": (_hellaswag, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "openbookqa": (_openbookqa, {"train": N_FEWSHOT_DOCS, "validation": 3, "test": _N_EVAL}),
    "piqa": (_piqa, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "sciq": (_sciq, {"train": N_FEWSHOT_DOCS, "validation": 3, "test": _N_EVAL}),
    "social_iqa": (_social_iqa, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "winogrande": (_winogrande, {"train": N_FEWSHOT_DOCS, "validation": _N_EVAL}),
    "svamp": (_svamp, {"train": N_FEWSHOT_DOCS, "test": _N_EVAL}),
    "gsm8k": (_gsm8k, {"train": N_FEWSHOT_DOCS, "test": _N_EVAL}),
    "gsm_hard": (_gsm_hard, {"train": _N_EVAL}),  # its only split is the evaluation set
}
for _subject in MATH_SUBJECTS.values():
    FIXTURES[f"hendrycks_math/{_subject}"] = (_math(_subject), {"train": N_FEWSHOT_DOCS, "test": 3})

_JSON_ARRAY = {"complex_web_questions"}  # raw release: one JSON array per split


def fixture_docs(folder: str, split: str) -> list[Doc]:
    maker, splits = FIXTURES[folder]
    return [maker(i, split) for i in range(splits[split])]


def _folders(tasks: list[str] | None) -> list[str]:
    if tasks is None:
        return list(FIXTURES)
    folders: list[str] = []
    for name in tasks:
        spec = TASKS[name]
        if spec.subjects:
            folders += [f"{spec.data_folder}/{s}" for s in spec.subjects.values()]
        else:
            folders.append(spec.data_folder)
    return list(dict.fromkeys(folders))


def write_fixtures(root: str | os.PathLike, tasks: list[str] | None = None) -> Path:
    """Write the tiny data of `tasks` (default all) under `root`; returns `root`."""
    root = Path(root)
    for folder in _folders(tasks):
        _, splits = FIXTURES[folder]
        out = root / folder
        out.mkdir(parents=True, exist_ok=True)
        for split in splits:
            docs = fixture_docs(folder, split)
            if folder in _JSON_ARRAY:
                (out / f"{split}.json").write_text(json.dumps(docs, indent=1))
            else:
                lines = "".join(json.dumps(d) + "\n" for d in docs)
                (out / f"{split}.jsonl").write_text(lines)
    return root
