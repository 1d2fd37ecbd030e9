import pytest

from mop.errors import DataError
from mop.results import SCHEMA, load_results, update_results


def test_sections_accumulate_and_categories_average(tmp_path):
    header = {"checkpoint": str(tmp_path), "step": 3, "model": {"name": "m"}}
    update_results(tmp_path, header, "ppl", {"loss": 1.0, "perplexity": 2.718})
    update_results(
        tmp_path,
        header,
        "tasks",
        {
            "arc_easy": {"category": "commonsense", "primary": "acc", "score": 0.5, "metrics": {}},
            "piqa": {"category": "commonsense", "primary": "acc", "score": 0.7, "metrics": {}},
        },
    )
    doc = update_results(
        tmp_path,
        header,
        "tasks",
        {
            "triviaqa": {"category": "knowledge", "primary": "f1", "score": 0.2, "metrics": {}},
        },
        meta={"limit": 5},
    )
    assert doc["schema"] == SCHEMA and doc["ppl"]["loss"] == 1.0
    assert set(doc["tasks"]) == {"arc_easy", "piqa", "triviaqa"}
    assert doc["categories"] == pytest.approx({"commonsense": 0.6, "knowledge": 0.2})
    assert doc["meta"]["tasks"] == {"limit": 5}
    assert load_results(tmp_path) == doc


def test_foreign_file_refused(tmp_path):
    (tmp_path / "results.json").write_text('{"schema": "other"}')
    with pytest.raises(DataError, match="schema"):
        load_results(tmp_path)
    with pytest.raises(DataError, match="schema"):
        update_results(tmp_path, {}, "ppl", {})
