"""Tiny local files in the real hub schemas of each registry source (tests, demo, bench).

The machines here cannot reach the hub, so every loader test (and the pipeline tests that
reuse these writers) reads files shaped like the real ones: same column names and types,
extra columns included, same container (parquet, jsonl, jsonl.zst, a top-level JSON
array). Text is deterministic pseudo-English with varied lengths so that a tokenizer
trained on it has something to learn.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_prep.sources import COSMOPEDIA_CONFIGS

_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her an which or be are "
    "this had not but they it were their have one all been has more when who there some "
    "time year people water energy system study student teacher learning history science "
    "number equation function value theory model data result method problem solution "
    "world city river mountain forest animal plant cell light heat sound force motion "
    "market price trade money work family child school book language word story music "
    "art culture government law war peace health body food earth space star planet moon "
    "sun ocean island country state region village road bridge house garden tree flower "
    "small large early late new old first last long short high low simple complex "
    "important different common natural social political economic physical chemical "
    "describe explain show find measure compare build grow change move follow begin "
    "often always never usually however therefore because although while during after "
    "before between under over through into about around against without within"
)
WORDS = tuple(_WORD_LIST.split())


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 18))]
    return " ".join(words).capitalize() + rng.choice(".....?!")


def random_text(rng: random.Random, min_words: int = 50, max_words: int = 400) -> str:
    """Paragraphs of pseudo-English totalling about min_words..max_words words."""
    target = rng.randint(min_words, max_words)
    paragraphs: list[str] = []
    count = 0
    while count < target:
        sentences = [_sentence(rng) for _ in range(rng.randint(2, 6))]
        paragraphs.append(" ".join(sentences))
        count += sum(len(s.split()) for s in sentences)
    return "\n\n".join(paragraphs)


def _short(rng: random.Random, lo: int = 4, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _question(rng: random.Random) -> str:
    return _short(rng, 6, 16).capitalize() + "?"


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    # small row groups so a file has several, as real shards do
    pq.write_table(table, path, row_group_size=max(1, len(rows) // 3))
    return path


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jsonl_bytes(rows))
    return path


# ---------------------------------------------------------------- pretraining corpora


def fineweb_edu_row(rng: random.Random, i: int) -> dict[str, Any]:
    text = random_text(rng)
    score = round(rng.uniform(2.5, 5.0), 6)
    return {
        "text": text,
        "id": f"<urn:uuid:{rng.getrandbits(128):032x}>",
        "dump": "CC-MAIN-2024-10",
        "url": f"https://example.org/page/{i}",
        "file_path": "s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/x.warc.gz",
        "language": "en",
        "language_score": round(rng.uniform(0.8, 1.0), 6),
        "token_count": len(text.split()) * 4 // 3,
        "score": score,
        "int_score": int(round(score)),
    }


def write_fineweb_parquet(
    directory: Path, n_docs: int = 20, seed: int = 0, name: str = "000_00000.parquet"
) -> Path:
    rng = random.Random(seed)
    return _write_parquet(Path(directory) / name, [fineweb_edu_row(rng, i) for i in range(n_docs)])


def wikipedia_row(rng: random.Random, i: int) -> dict[str, Any]:
    title = _short(rng, 1, 4).title()
    return {
        "id": str(1000 + i),
        "url": f"https://en.wikipedia.org/wiki/{title.replace(' ', '_')}",
        "title": title,
        "text": random_text(rng),
    }


def write_wikipedia_parquet(
    directory: Path, n_docs: int = 20, seed: int = 1, name: str = "train-00000-of-00041.parquet"
) -> Path:
    rng = random.Random(seed)
    return _write_parquet(Path(directory) / name, [wikipedia_row(rng, i) for i in range(n_docs)])


def cosmopedia_row(rng: random.Random, i: int, v2: bool = False) -> dict[str, Any]:
    text = random_text(rng)
    row = {
        "prompt": "Write an educational piece about " + _short(rng, 3, 8),
        "text": text,
        "token_length" if v2 else "text_token_length": len(text.split()) * 4 // 3,
        "audience": rng.choice(["college_students", "grade_school_students", "general"]),
        "format": rng.choice(["textbook", "blogpost", "story_children"]),
        "seed_data": rng.choice(["web_samples_v1", "stanford", "wikihow"]),
    }
    return row


def write_cosmopedia_parquet(
    directory: Path,
    n_docs: int = 20,
    seed: int = 2,
    v2: bool = False,
    name: str = "train-00000-of-00018.parquet",
) -> Path:
    rng = random.Random(seed)
    rows = [cosmopedia_row(rng, i, v2=v2) for i in range(n_docs)]
    return _write_parquet(Path(directory) / name, rows)


_PROOF_PILE_META: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "arxiv": lambda rng, i: {
        "timestamp": "2019-03-01T12:00:00",
        "yymm": "1903",
        "arxiv_id": f"1903.{i:05d}",
        "language": "en",
        "url": f"https://arxiv.org/abs/1903.{i:05d}",
    },
    "open-web-math": lambda rng, i: {"url": f"https://math.example.org/{i}", "date": "2023-01-01"},
    "algebraic-stack": lambda rng, i: {
        "max_stars_repo_path": f"src/lemma_{i}.lean",
        "max_stars_count": rng.randint(0, 500),
        "lang": "Lean",
    },
}


def proof_pile_row(rng: random.Random, i: int, subset: str = "arxiv") -> dict[str, Any]:
    math = f"$x_{{{i}}} = \\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 9)}}}$"
    return {"text": random_text(rng) + "\n\n" + math, "meta": _PROOF_PILE_META[subset](rng, i)}


def write_proof_pile_jsonl_zst(
    directory: Path,
    n_docs: int = 20,
    seed: int = 3,
    subset: str = "arxiv",
    name: str = "arXiv_000.jsonl.zst",
) -> Path:
    rng = random.Random(seed)
    rows = [proof_pile_row(rng, i, subset) for i in range(n_docs)]
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(_jsonl_bytes(rows)))
    return path


def openmathinstruct1_row(rng: random.Random, i: int, correct: bool = True) -> dict[str, Any]:
    expected = str(rng.randint(1, 100))
    predicted = expected if correct else str(int(expected) + 1)
    return {
        "question": _question(rng),
        "generated_solution": random_text(rng, 20, 80) + f"\n\\boxed{{{predicted}}}",
        "expected_answer": expected,
        "predicted_answer": predicted,
        "error_message": "",
        "is_correct": correct,
        "dataset": rng.choice(["gsm8k", "math"]),
        "generation_type": rng.choice(["without_reference_solution", "masked_reference_solution"]),
    }


def write_openmathinstruct1_jsonl(
    directory: Path, n_docs: int = 20, seed: int = 4, name: str = "train.jsonl"
) -> Path:
    """Every third row is incorrect (is_correct=false), as in the unfiltered release."""
    rng = random.Random(seed)
    rows = [openmathinstruct1_row(rng, i, correct=i % 3 != 2) for i in range(n_docs)]
    return _write_jsonl(Path(directory) / name, rows)


def openmathinstruct2_row(rng: random.Random, i: int) -> dict[str, Any]:
    answer = str(rng.randint(1, 100))
    return {
        "problem": _question(rng),
        "generated_solution": random_text(rng, 20, 80) + f"\n\\boxed{{{answer}}}",
        "expected_answer": answer,
        "problem_source": rng.choice(["augmented_math", "augmented_gsm8k", "math", "gsm8k"]),
    }


def write_openmathinstruct2_parquet(
    directory: Path, n_docs: int = 20, seed: int = 5, name: str = "train-00000-of-00010.parquet"
) -> Path:
    rng = random.Random(seed)
    return _write_parquet(
        Path(directory) / name, [openmathinstruct2_row(rng, i) for i in range(n_docs)]
    )


def metamathqa_row(rng: random.Random, i: int) -> dict[str, Any]:
    question = _question(rng)
    return {
        "query": question,
        "response": random_text(rng, 20, 80) + f"\nThe answer is: {rng.randint(1, 50)}",
        "type": rng.choice(["GSM_AnsAug", "GSM_Rephrased", "MATH_FOBAR", "MATH_SV"]),
        "original_question": question,
    }


def write_metamathqa_json_array(
    directory: Path, n_docs: int = 20, seed: int = 6, name: str = "MetaMathQA-395K.json"
) -> Path:
    """One top-level JSON array, indented like the released file."""
    rng = random.Random(seed)
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps([metamathqa_row(rng, i) for i in range(n_docs)], indent=4), encoding="utf-8"
    )
    return path


# ---------------------------------------------------------------- downstream training sets


def arc_row(rng: random.Random, i: int) -> dict[str, Any]:
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"Mercury_{7000000 + i}",
        "question": _question(rng),
        "choices": {"text": [_short(rng, 1, 5) for _ in labels], "label": labels},
        "answerKey": rng.choice(labels),
    }


def write_arc_parquet(
    directory: Path, n_docs: int = 20, seed: int = 7, name: str = "train-00000-of-00001.parquet"
) -> Path:
    rng = random.Random(seed)
    return _write_parquet(Path(directory) / name, [arc_row(rng, i) for i in range(n_docs)])


def gsm8k_row(rng: random.Random, i: int) -> dict[str, Any]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return {
        "question": _question(rng),
        "answer": f"{_short(rng, 8, 20)} {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}",
    }


def write_gsm8k_parquet(
    directory: Path, n_docs: int = 20, seed: int = 8, name: str = "train-00000-of-00001.parquet"
) -> Path:
    rng = random.Random(seed)
    return _write_parquet(Path(directory) / name, [gsm8k_row(rng, i) for i in range(n_docs)])


def triviaqa_row(rng: random.Random, i: int) -> dict[str, Any]:
    value = _short(rng, 1, 3).title()
    return {
        "question": _question(rng),
        "question_id": f"tc_{i}",
        "question_source": "http://www.triviacountry.com/",
        "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
        "search_results": {
            "description": [],
            "filename": [],
            "rank": [],
            "title": [],
            "url": [],
            "search_context": [],
        },
        "answer": {
            "aliases": [value, value.lower()],
            "normalized_aliases": [value.lower()],
            "matched_wiki_entity_name": "",
            "normalized_matched_wiki_entity_name": "",
            "normalized_value": value.lower(),
            "type": "WikipediaEntity",
            "value": value,
        },
    }


_STR_LIST = pa.list_(pa.string())
TRIVIAQA_SCHEMA = pa.schema(
    [
        ("question", pa.string()),
        ("question_id", pa.string()),
        ("question_source", pa.string()),
        (
            "entity_pages",
            pa.struct(
                [(k, _STR_LIST) for k in ("doc_source", "filename", "title", "wiki_context")]
            ),
        ),
        (
            "search_results",
            pa.struct(
                [
                    ("description", _STR_LIST),
                    ("filename", _STR_LIST),
                    ("rank", pa.list_(pa.int32())),
                    ("title", _STR_LIST),
                    ("url", _STR_LIST),
                    ("search_context", _STR_LIST),
                ]
            ),
        ),
        (
            "answer",
            pa.struct(
                [
                    ("aliases", _STR_LIST),
                    ("normalized_aliases", _STR_LIST),
                    ("matched_wiki_entity_name", pa.string()),
                    ("normalized_matched_wiki_entity_name", pa.string()),
                    ("normalized_value", pa.string()),
                    ("type", pa.string()),
                    ("value", pa.string()),
                ]
            ),
        ),
    ]
)


def write_triviaqa_parquet(
    directory: Path, n_docs: int = 20, seed: int = 9, name: str = "train-00000-of-00001.parquet"
) -> Path:
    rng = random.Random(seed)
    rows = [triviaqa_row(rng, i) for i in range(n_docs)]
    return _write_parquet(Path(directory) / name, rows, schema=TRIVIAQA_SCHEMA)


def _mc_choices(rng: random.Random, labels: list[str]) -> dict[str, list[str]]:
    return {"text": [_short(rng, 1, 5) for _ in labels], "label": labels}


# One realistic row per registry key, for renderer tests (downstream sets without a writer).
def sample_rows(seed: int = 0) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    rows: dict[str, dict[str, Any]] = {
        "fineweb_edu": fineweb_edu_row(rng, 0),
        "cosmopedia_v2": cosmopedia_row(rng, 0, v2=True),
        "wikipedia": wikipedia_row(rng, 0),
        "openmathinstruct_1": openmathinstruct1_row(rng, 0),
        "openmathinstruct_2": openmathinstruct2_row(rng, 0),
        "metamathqa": metamathqa_row(rng, 0),
        "triviaqa": triviaqa_row(rng, 0),
        "nq_open": {"question": "where is the river thames", "answer": ["London", "England"]},
        "arc_easy": arc_row(rng, 0),
        "arc_challenge": {
            **arc_row(rng, 1),
            "choices": _mc_choices(rng, ["1", "2", "3", "4"]),
            "answerKey": "3",
        },
        "hellaswag": {
            "ind": 4,
            "activity_label": "Removing ice from car",
            "ctx_a": "Then, the man writes over the snow covering the window of a car.",
            "ctx_b": "then",
            "ctx": "Then, the man writes over the snow covering the window of a car. then",
            "endings": ["a.", "b [title] c.", "the man removes the snow.", "d."],
            "source_id": "activitynet~v_-1IBHYS3L-Y",
            "split": "train",
            "split_type": "indomain",
            "label": "2",
        },
        "piqa": {
            "goal": "How do I open a jar?",
            "sol1": "Twist the lid.",
            "sol2": "Eat the lid.",
            "label": 0,
        },
        "siqa": {
            "context": "Tracy didn't go home that evening and resisted Riley's attacks.",
            "question": "What does Tracy need to do before this?",
            "answerA": "make a new plan",
            "answerB": "Go home and see Riley",
            "answerC": "Find somewhere to go",
            "label": "3",
        },
        "winogrande": {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "1",
        },
        "commonsense_qa": {
            "id": "075e483d21c29a511267ef62bedc0461",
            "question": "The sanctions against the school were a punishing blow?",
            "question_concept": "punishing",
            "choices": _mc_choices(rng, ["A", "B", "C", "D", "E"]),
            "answerKey": "A",
        },
        "openbookqa": {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": _mc_choices(rng, ["A", "B", "C", "D"]),
            "answerKey": "D",
        },
        "sciq": {
            "question": "What type of organism is commonly used in preparation of foods?",
            "distractor1": "viruses",
            "distractor2": "protozoa",
            "distractor3": "gymnosperms",
            "correct_answer": "mesophilic organisms",
            "support": "Mesophiles grow best in moderate temperature.",
        },
        "gsm8k": gsm8k_row(rng, 0),
    }
    for key in COSMOPEDIA_CONFIGS:
        rows[f"cosmopedia_{key}"] = cosmopedia_row(rng, 0)
    for key, subset in (
        ("arxiv", "arxiv"),
        ("open_web_math", "open-web-math"),
        ("algebraic_stack", "algebraic-stack"),
    ):
        rows[f"proof_pile_2_{key}"] = proof_pile_row(rng, 0, subset)
    return rows


# ---------------------------------------------------------------- bad rows


# (row, expected skip reason or None for a good document), in file order
BAD_ROWS: list[tuple[dict[str, Any], str | None]] = [
    ({"text": "A good first document about rivers.", "id": 0}, None),
    ({"id": 1}, "missing field 'text'"),
    ({"text": None, "id": 2}, "missing field 'text'"),
    ({"text": "", "id": 3}, "empty text"),
    ({"text": "   \n\t ", "id": 4}, "empty text"),
    ({"text": 12345, "id": 5}, "non-string field 'text'"),
    ({"text": ["a", "list"], "id": 6}, "non-string field 'text'"),
    ({"text": "A good last document about mountains.", "id": 7}, None),
]


def write_bad_rows_jsonl(directory: Path, name: str = "bad.jsonl") -> Path:
    """Rows with the `text` schema that must be skipped (see BAD_ROWS), between good ones."""
    return _write_jsonl(Path(directory) / name, [row for row, _ in BAD_ROWS])


# binary `text` column: utf-8 is decoded, anything else is "undecodable text"
BAD_BYTES_ROWS: list[tuple[bytes, str | None]] = [
    ("Good bytes décodés".encode(), None),
    (b"\xff\xfe not utf-8", "undecodable text"),
    (b"lone surrogate \xed\xa0\x80", "undecodable text"),  # utf-8 of U+D800
    (b"   ", "empty text"),
]


def write_bad_bytes_parquet(directory: Path, name: str = "bad_bytes.parquet") -> Path:
    rows = [{"text": value} for value, _ in BAD_BYTES_ROWS]
    return _write_parquet(Path(directory) / name, rows, schema=pa.schema([("text", pa.binary())]))


def write_unparseable_jsonl(directory: Path, name: str = "unparseable.jsonl") -> Path:
    """A lone-surrogate escape that pyarrow's JSON parser rejects for the whole file."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"text": "fine"}\n{"text": "broken \\ud800 escape"}\n', encoding="ascii")
    return path


# ---------------------------------------------------------------- mixtures


def write_tiny_mixture(directory: Path, n_docs: int = 12, seed: int = 0) -> dict[str, Path]:
    """One local copy per main source, keyed by registry key (= default label).

    Use as `SourceConfig(source=key, data_files=str(path))`. fineweb_edu has two files
    (two units); the rest one each.
    """
    root = Path(directory)
    out = {
        "fineweb_edu": root / "fineweb_edu",
        "wikipedia": root / "wikipedia",
        "cosmopedia_stories": root / "cosmopedia_stories",
        "proof_pile_2_arxiv": root / "proof_pile_2_arxiv",
        "openmathinstruct_1": root / "openmathinstruct_1",
        "openmathinstruct_2": root / "openmathinstruct_2",
        "metamathqa": root / "metamathqa",
        "arc_easy": root / "arc_easy",
        "gsm8k": root / "gsm8k",
        "triviaqa": root / "triviaqa",
    }
    write_fineweb_parquet(out["fineweb_edu"], n_docs, seed, name="000_00000.parquet")
    write_fineweb_parquet(out["fineweb_edu"], n_docs, seed + 100, name="000_00001.parquet")
    write_wikipedia_parquet(out["wikipedia"], n_docs, seed + 1)
    write_cosmopedia_parquet(out["cosmopedia_stories"], n_docs, seed + 2)
    write_proof_pile_jsonl_zst(out["proof_pile_2_arxiv"], n_docs, seed + 3)
    write_openmathinstruct1_jsonl(out["openmathinstruct_1"], n_docs, seed + 4)
    write_openmathinstruct2_parquet(out["openmathinstruct_2"], n_docs, seed + 5)
    write_metamathqa_json_array(out["metamathqa"], n_docs, seed + 6)
    write_arc_parquet(out["arc_easy"], n_docs, seed + 7)
    write_gsm8k_parquet(out["gsm8k"], n_docs, seed + 8)
    write_triviaqa_parquet(out["triviaqa"], n_docs, seed + 9)
    return out
