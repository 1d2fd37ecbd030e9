"""SQuAD-style answer F1 / exact match and the final-number extraction of the math tasks."""

from __future__ import annotations

import pytest

from eval.metrics import (
    exact_match_score,
    extract_final_number,
    f1_score,
    format_number,
    max_over_golds,
    normalize_answer,
    numbers_match,
    parse_number,
    qa_scores,
)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   Tale of  Two Cities. ", "tale of two cities"),
        ("An apple, an orange!", "apple orange"),
        ("U.S.A.", "usa"),
        ("theatre", "theatre"),  # articles only as whole words
        ("", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_ignores_case_punctuation_articles():
    assert exact_match_score("the Beatles.", "Beatles") == 1.0
    assert exact_match_score("Beatles band", "Beatles") == 0.0


def test_f1_token_overlap():
    assert f1_score("Barack Obama", "Barack Obama") == 1.0
    assert f1_score("zzz", "Barack Obama") == 0.0
    # 1 common token: precision 1/1, recall 1/2 -> F1 2/3
    assert f1_score("Obama", "Barack Obama") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence in both (Counter intersection)
    assert f1_score("obama obama", "obama") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("the", "a") == 1.0  # both empty after normalisation
    assert f1_score("", "Obama") == 0.0


def test_max_over_golds_and_qa_scores():
    golds = ["John F. Kennedy", "JFK", "Kennedy"]
    assert max_over_golds(f1_score, "kennedy", golds) == 1.0
    assert max_over_golds(f1_score, "x", []) == 0.0
    scores = qa_scores("President Kennedy", golds)
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(2 / 3)  # vs "Kennedy": p=1/2, r=1
    assert qa_scores("JFK", golds) == {"f1": 1.0, "exact_match": 1.0}


@pytest.mark.parametrize(
    ("generation", "number"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72.0),
        ("So 5 + 4 = 9. The answer is 9.", 9.0),
        ("The answer is: 1,234", 1234.0),
        ("The answer is $18.50.", 18.5),
        ("She has 3 apples and then 7 pears, 10 fruits", 10.0),
        ("The answer is -3. Then 8 more words 5", -3.0),
        ("#### 5\nQ: 6 apples", 5.0),
        ("no number here", None),
    ],
)
def test_extract_final_number(generation, number):
    assert extract_final_number(generation) == number


def test_numbers_match_and_format():
    assert numbers_match(27.0, 27.0)
    assert numbers_match(3.0000000001, 3.0)
    assert not numbers_match(27.0, 28.0)
    assert not numbers_match(None, 1.0)
    assert parse_number("1,000.") == 1000.0
    assert parse_number("abc") is None
    assert format_number(27.0) == "27"
    assert format_number(2.5) == "2.5"
    assert format_number("8.0") == "8"
    assert format_number(-4) == "-4"
