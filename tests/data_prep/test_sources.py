"""Registry, renderers and loading of sources, on tiny local files in the hub schemas."""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from pathlib import Path

import datasets
import pytest

from data_prep.config import SourceConfig
from data_prep.loading import (
    Document,
    SkippedRow,
    classify_row,
    expand_data_files,
    open_source,
)
from data_prep.renderers import SkipRow, text_field
from data_prep.sources import REGISTRY, get_spec
from demo import samples as fx
from mop.errors import DataError


def _all(handle) -> list[Document | SkippedRow]:
    return [item for i in range(handle.num_units) for item in handle.iter_unit(i)]


def _docs(handle) -> list[str]:
    return [item.text for item in _all(handle) if isinstance(item, Document)]


# ---------------------------------------------------------------- registry + renderers


def test_every_registry_entry_renders_its_schema():
    rows = fx.sample_rows()
    assert set(rows) == set(REGISTRY), "fixtures.sample_rows must cover the registry"
    for key, spec in REGISTRY.items():
        item = classify_row(spec, rows[key], 0)
        assert isinstance(item, Document), (key, item)
        assert item.text.strip()
        for col in spec.columns:
            assert col in rows[key], (key, col)


def test_registry_entries_are_consistent():
    for key, spec in REGISTRY.items():
        assert spec.key == key
        assert spec.description
        if spec.builder is None:
            assert spec.hub_data_files is None
        else:
            assert spec.builder in ("json", "parquet")
            assert str(spec.hub_data_files).startswith("hf://datasets/")
    assert get_spec("proof_pile_2_arxiv").builder == "json"
    assert get_spec("fineweb_edu").hub_config == "sample-10BT"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "winogrande",
            "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.",
        ),
        ("piqa", "Question: How do I open a jar?\nAnswer: Twist the lid."),
        (
            "siqa",
            "Question: Tracy didn't go home that evening and resisted Riley's attacks. "
            "What does Tracy need to do before this?\nAnswer: Find somewhere to go",
        ),
        ("nq_open", "Question: where is the river thames\nAnswer: London"),
        (
            "hellaswag",
            "Removing ice from car: Then, the man writes over the snow covering the window of a car. "
            "then the man removes the snow.",
        ),
    ],
)
def test_downstream_renderings(key, expected):
    assert get_spec(key).render(fx.sample_rows()[key]) == expected


def test_multiple_choice_uses_correct_answer_text():
    row = fx.sample_rows()["arc_challenge"]  # numeric labels "1".."4", answerKey "3"
    text = get_spec("arc_challenge").render(row)
    assert text.endswith("Answer: " + row["choices"]["text"][2])
    wiki = fx.sample_rows()["wikipedia"]
    assert get_spec("wikipedia").render(wiki).startswith(wiki["title"] + "\n\n")


def test_unlabeled_rows_are_skipped_not_crashing():
    row = {**fx.sample_rows()["piqa"], "label": -1}
    assert classify_row(get_spec("piqa"), row, 3) == SkippedRow("malformed field 'label'", 3)
    row = {**fx.sample_rows()["winogrande"], "answer": ""}
    assert classify_row(get_spec("winogrande"), row, 0) == SkippedRow("missing field 'answer'", 0)


def test_lone_surrogate_and_bytes_are_undecodable():
    spec = get_spec("fineweb_edu")
    assert classify_row(spec, {"text": "bad \ud800 text"}, 0) == SkippedRow("undecodable text", 0)
    assert classify_row(spec, {"text": b"\xff"}, 1) == SkippedRow("undecodable text", 1)
    assert classify_row(spec, {"text": b"ok"}, 2) == Document("ok", 2)
    with pytest.raises(SkipRow, match="non-string"):
        text_field({"x": 3.5}, "x")


def test_specs_and_handles_pickle_for_worker_processes(tmp_path):
    for spec in REGISTRY.values():
        assert pickle.loads(pickle.dumps(spec)).key == spec.key
    path = fx.write_gsm8k_parquet(tmp_path, n_docs=3)
    handle = open_source(SourceConfig(source="gsm8k", data_files=str(path)))
    assert _docs(pickle.loads(pickle.dumps(handle))) == _docs(handle)


def test_unknown_source_names_close_match():
    with pytest.raises(DataError, match="did you mean fineweb_edu") as err:
        get_spec("fineweb-edu")
    assert "known sources" in str(err.value)
    # the config rejects an unknown source before any loading starts, naming the field
    from mop.config import validate
    from mop.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'source' = 'no_such_thing_at_all'.*unknown source"):
        validate(SourceConfig, {"source": "no_such_thing_at_all", "data_files": "x"})


# ---------------------------------------------------------------- local formats


@pytest.mark.parametrize(
    ("source", "writer"),
    [
        ("fineweb_edu", fx.write_fineweb_parquet),
        ("wikipedia", fx.write_wikipedia_parquet),
        ("proof_pile_2_arxiv", fx.write_proof_pile_jsonl_zst),
        ("metamathqa", fx.write_metamathqa_json_array),
        ("openmathinstruct_2", fx.write_openmathinstruct2_parquet),
        ("gsm8k", fx.write_gsm8k_parquet),
    ],
)
def test_local_formats_load(tmp_path, source, writer):
    path = writer(tmp_path, n_docs=7)
    handle = open_source(SourceConfig(source=source, data_files=str(path)))
    assert handle.is_local and handle.num_units == 1
    items = _all(handle)
    assert [type(i) for i in items] == [Document] * 7
    assert [i.row for i in items] == list(range(7))
    assert all(len(i.text.split()) >= 5 for i in items)


def test_directory_units_order_and_limits(tmp_path):
    for k in (2, 0, 1):  # written out of order; units follow sorted names
        fx.write_fineweb_parquet(tmp_path / "fw", n_docs=5, seed=k, name=f"part_{k}.parquet")
    (tmp_path / "fw" / "README.md").write_text("not data")
    cfg = SourceConfig(source="fineweb_edu", data_files=str(tmp_path / "fw"))
    handle = open_source(cfg)
    assert handle.num_units == 3
    assert [Path(handle.unit_name(i)).name for i in range(3)] == [
        f"part_{k}.parquet" for k in range(3)
    ]
    first = _docs(handle)
    assert len(first) == 15
    assert _docs(open_source(cfg)) == first  # deterministic across opens
    unit1 = [d.text for d in handle.iter_unit(1)]
    assert unit1 == first[5:10]

    limited = open_source(cfg.model_copy(update={"max_units": 2, "max_documents_per_unit": 3}))
    assert limited.num_units == 2
    assert _docs(limited) == first[0:3] + first[5:8]
    with pytest.raises(IndexError):
        list(limited.iter_unit(2))


def test_glob_and_list_data_files(tmp_path):
    a = fx.write_fineweb_parquet(tmp_path, n_docs=2, seed=1, name="a.parquet")
    b = fx.write_fineweb_parquet(tmp_path, n_docs=2, seed=2, name="b.parquet")
    assert expand_data_files(str(tmp_path / "*.parquet")) == [a.resolve(), b.resolve()]
    assert expand_data_files([str(b), str(a), str(b)]) == [b.resolve(), a.resolve()]


def test_openmathinstruct1_filters_incorrect(tmp_path):
    path = fx.write_openmathinstruct1_jsonl(tmp_path, n_docs=9)
    items = _all(open_source(SourceConfig(source="openmathinstruct_1", data_files=str(path))))
    assert [i.row for i in items if isinstance(i, SkippedRow)] == [2, 5, 8]
    assert all(i.reason == "filtered" for i in items if isinstance(i, SkippedRow))
    docs = [i.text for i in items if isinstance(i, Document)]
    assert len(docs) == 6
    assert all(d.startswith("Question: ") and "\n\nAnswer: " in d for d in docs)


def test_max_documents_counts_documents_not_skips(tmp_path):
    path = fx.write_openmathinstruct1_jsonl(tmp_path, n_docs=9)
    cfg = SourceConfig(source="openmathinstruct_1", data_files=str(path), max_documents_per_unit=3)
    items = list(open_source(cfg).iter_unit(0))
    assert [i.row for i in items if isinstance(i, Document)] == [0, 1, 3]
    assert items[-1].row == 3


def test_bad_rows_are_counted_not_fatal(tmp_path):
    path = fx.write_bad_rows_jsonl(tmp_path)
    items = _all(open_source(SourceConfig(source="fineweb_edu", data_files=str(path))))
    assert [i.row for i in items] == list(range(len(fx.BAD_ROWS)))
    got = [i.reason if isinstance(i, SkippedRow) else None for i in items]
    assert got == [reason for _, reason in fx.BAD_ROWS]


def test_undecodable_bytes_are_skipped(tmp_path):
    path = fx.write_bad_bytes_parquet(tmp_path)
    items = _all(open_source(SourceConfig(source="fineweb_edu", data_files=str(path))))
    got = [i.reason if isinstance(i, SkippedRow) else None for i in items]
    assert got == [reason for _, reason in fx.BAD_BYTES_ROWS]
    assert items[0] == Document("Good bytes décodés", 0)


def test_schema_mismatch_skips_every_row_and_warns_once(tmp_path, caplog):
    path = fx.write_gsm8k_parquet(tmp_path, n_docs=4)  # no `text` column
    handle = open_source(SourceConfig(source="fineweb_edu", data_files=str(path)))
    with caplog.at_level(logging.WARNING, logger="data_prep.loading"):
        items = _all(handle)
    assert Counter(i.reason for i in items) == {"missing field 'text'": 4}
    assert sum("no column 'text'" in r.message for r in caplog.records) == 1


def test_unparseable_file_is_a_data_error_naming_it(tmp_path):
    path = fx.write_unparseable_jsonl(tmp_path)
    handle = open_source(SourceConfig(source="fineweb_edu", data_files=str(path)))
    with pytest.raises(DataError, match="unparseable.jsonl"):
        _all(handle)


def test_path_errors(tmp_path):
    with pytest.raises(DataError, match="not found: .*missing.parquet"):
        open_source(
            SourceConfig(source="fineweb_edu", data_files=str(tmp_path / "missing.parquet"))
        )
    with pytest.raises(DataError, match="matches no files"):
        open_source(SourceConfig(source="fineweb_edu", data_files=str(tmp_path / "*.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        open_source(SourceConfig(source="fineweb_edu", data_files=str(tmp_path / "empty")))
    fx.write_fineweb_parquet(tmp_path / "mixed", n_docs=2)
    fx.write_bad_rows_jsonl(tmp_path / "mixed")
    with pytest.raises(DataError, match="mix formats"):
        open_source(SourceConfig(source="fineweb_edu", data_files=str(tmp_path / "mixed")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unknown extension"):
        open_source(SourceConfig(source="fineweb_edu", data_files=str(tmp_path / "notes.txt")))


def test_tiny_mixture_loads_every_source(tmp_path):
    paths = fx.write_tiny_mixture(tmp_path, n_docs=4)
    for key, path in paths.items():
        handle = open_source(SourceConfig(source=key, data_files=str(path)))
        docs = _docs(handle)
        assert docs, key
        assert handle.num_units == (2 if key == "fineweb_edu" else 1)


# ---------------------------------------------------------------- hub branch


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """datasets.load_dataset returning a local 3-shard streaming dataset; records calls."""
    files = [
        str(fx.write_fineweb_parquet(tmp_path / "hub", n_docs=4, seed=k, name=f"{k:03d}.parquet"))
        for k in range(3)
    ]
    real = datasets.load_dataset
    calls: list[tuple[tuple, dict]] = []

    def fake(path, *args, **kwargs):
        data_files = kwargs.get("data_files") or []
        if data_files and all(Path(f).is_file() for f in data_files):
            return real(path, *args, **kwargs)  # local units read through the real loader
        calls.append(((path, *args), dict(kwargs)))
        assert kwargs.get("streaming") is True
        return real("parquet", data_files=files, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return files, calls


def test_hub_branch_shards_and_matches_local(fake_hub):
    files, calls = fake_hub
    hub = open_source(SourceConfig(source="fineweb_edu"))
    assert calls == [
        (
            ("HuggingFaceFW/fineweb-edu",),
            {"name": "sample-10BT", "split": "train", "streaming": True},
        )
    ]
    assert not hub.is_local and hub.num_units == 3
    per_unit = [[d.text for d in hub.iter_unit(i)] for i in range(3)]
    assert [len(u) for u in per_unit] == [4, 4, 4]
    local = open_source(SourceConfig(source="fineweb_edu", data_files=files))
    assert [t for u in per_unit for t in u] == _docs(local)
    assert per_unit[1] == [d.text for d in local.iter_unit(1)]

    limited = open_source(SourceConfig(source="fineweb_edu", max_units=2, max_documents_per_unit=1))
    assert limited.num_units == 2
    assert _docs(limited) == [per_unit[0][0], per_unit[1][0]]


def test_hub_branch_overrides_and_file_entries(fake_hub):
    _, calls = fake_hub
    open_source(SourceConfig(source="fineweb_edu", hub_config="sample-100BT", split="train"))
    assert calls[-1][1]["name"] == "sample-100BT"
    open_source(SourceConfig(source="proof_pile_2_open_web_math", split="validation"))
    assert calls[-1] == (
        ("json",),
        {
            "data_files": [
                "hf://datasets/EleutherAI/proof-pile-2/open-web-math/validation/*.jsonl.zst"
            ],
            "split": "train",
            "streaming": True,
        },
    )
    with pytest.raises(DataError, match="split 'test' does not apply"):
        open_source(SourceConfig(source="metamathqa", split="test"))
    with pytest.raises(DataError, match="hub_config does not apply"):
        open_source(SourceConfig(source="metamathqa", hub_config="x"))


def test_hub_failure_is_a_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="fineweb-edu.*data_files"):
        open_source(SourceConfig(source="fineweb_edu"))


# The eval task that each downstream training source is the train split of.
EVAL_TASK_OF_SOURCE = {"siqa": "social_iqa"}
DOWNSTREAM = [
    "triviaqa",
    "nq_open",
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "siqa",
    "winogrande",
    "commonsense_qa",
    "openbookqa",
    "sciq",
    "gsm8k",
]


@pytest.mark.parametrize("key", DOWNSTREAM)
def test_downstream_training_sets_come_from_the_repos_lm_eval_scores(key):
    """Train on the train split of exactly the hub dataset the benchmark is scored on (lm-eval's
    own task config): the same schema, and no second copy with other ids or splits."""
    from eval.tasks import TASKS, harness_config

    spec = get_spec(key)
    cfg = harness_config(TASKS[EVAL_TASK_OF_SOURCE.get(key, key)])
    assert (spec.hub_id, spec.hub_config) == (cfg["dataset_path"], cfg.get("dataset_name"))
    assert spec.builder is None and spec.split == "train"
    assert cfg.get("training_split") in ("train", None)


def _rows_as_datasets_gives_them(dataset: datasets.IterableDataset) -> list[dict]:
    """Reference: `datasets`' own per-example iteration (features decoded)."""
    return [dict(row) for row in dataset]


@pytest.mark.parametrize(
    "write,builder",
    [
        (lambda d: fx.write_fineweb_parquet(d, 40, seed=3), "parquet"),  # plain Value columns
        (fx.write_bad_bytes_parquet, "parquet"),  # binary text, undecodable bytes
        (fx.write_bad_rows_jsonl, "json"),  # a mixed-type column: stored as JSON, decoded
    ],
)
def test_rows_are_datasets_own_rows(tmp_path, write, builder):
    """The Arrow fast path of plain columns and `datasets`' path for the rest give the rows
    `datasets` itself gives: same values, same types, same order (a JSON column of mixed
    types would come out of Arrow as JSON text: '"text"', '12345')."""
    from data_prep.loading import _rows

    path = write(tmp_path)
    ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
    ours = list(_rows(ds, batch_size=7))  # several batches, the last one short
    ref = _rows_as_datasets_gives_them(ds)
    assert ours == ref
    assert [[type(v) for v in r.values()] for r in ours] == [
        [type(v) for v in r.values()] for r in ref
    ]
