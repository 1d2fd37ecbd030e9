"""Registry of pretraining sources: where each lives on the hub and how a row becomes text.

A mixture config names sources by key (`source: fineweb_edu`); everything schema-specific
lives here so the pipeline stays generic. Hub facts come from the dataset cards (see
/work/shared/REFERENCE.md); entries whose hub repo only ships a loading script (refused by
`datasets` >= 4) point at data files instead (`builder` + `hub_data_files`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from data_prep import renderers as r
from mop.errors import DataError


@dataclass(frozen=True)
class SourceSpec:
    """One registry entry.

    builder: None lets `datasets` resolve the hub repo (`load_dataset(hub_id, hub_config)`);
        "json"/"parquet" means we point at `hub_data_files` ourselves.
    hub_data_files: glob(s) of hf:// files for builder entries; "{split}" is replaced by the
        split so `split:` overrides work for them too.
    columns: fields the renderer needs (documentation and schema warnings).
    keep: row filter; rows it rejects are counted as "filtered".
    """

    key: str
    hub_id: str
    hub_config: str | None
    split: str
    builder: str | None
    hub_data_files: str | list[str] | None
    columns: tuple[str, ...]
    render: Callable[[dict], str]
    keep: Callable[[dict], bool] | None
    description: str


def _hub(
    key: str,
    hub_id: str,
    config: str | None,
    columns: tuple[str, ...],
    render: Callable[[dict], str],
    description: str,
    split: str = "train",
) -> SourceSpec:
    return SourceSpec(key, hub_id, config, split, None, None, columns, render, None, description)


def _files(
    key: str,
    hub_id: str,
    builder: str,
    files: str | list[str],
    columns: tuple[str, ...],
    render: Callable[[dict], str],
    description: str,
    keep: Callable[[dict], bool] | None = None,
    split: str = "train",
) -> SourceSpec:
    return SourceSpec(key, hub_id, None, split, builder, files, columns, render, keep, description)


COSMOPEDIA_CONFIGS = (
    "web_samples_v1",
    "web_samples_v2",
    "stanford",
    "stories",
    "wikihow",
    "openstax",
    "khanacademy",
    "auto_math_text",
)

_PROOF_PILE = {
    "arxiv": "arxiv",
    "open_web_math": "open-web-math",
    "algebraic_stack": "algebraic-stack",
}

_TEXT = ("text",)


def _build() -> dict[str, SourceSpec]:
    specs: list[SourceSpec] = [
        _hub(
            "fineweb_edu",
            "HuggingFaceFW/fineweb-edu",
            "sample-10BT",
            _TEXT,
            r.render_text,
            "FineWeb-edu web pages (parquet); set hub_config to default/sample-100BT/... for more",
        ),
        *(
            _hub(
                f"cosmopedia_{cfg}",
                "HuggingFaceTB/cosmopedia",
                cfg,
                _TEXT,
                r.render_text,
                f"Cosmopedia v0.1 synthetic textbooks, config {cfg} (parquet)",
            )
            for cfg in COSMOPEDIA_CONFIGS
        ),
        _hub(
            "cosmopedia_v2",
            "HuggingFaceTB/smollm-corpus",
            "cosmopedia-v2",
            _TEXT,
            r.render_text,
            "Cosmopedia v2 from the SmolLM corpus (parquet)",
        ),
        _hub(
            "wikipedia",
            "wikimedia/wikipedia",
            "20231101.en",
            ("title", "text"),
            r.render_wikipedia,
            "English Wikipedia dump 2023-11-01 (parquet), rendered 'title\\n\\ntext'",
        ),
        *(
            _files(
                f"proof_pile_2_{key}",
                "EleutherAI/proof-pile-2",
                "json",
                f"hf://datasets/EleutherAI/proof-pile-2/{subset}/{{split}}/*.jsonl.zst",
                _TEXT,
                r.render_text,
                f"Proof-Pile 2 {subset} (script-based repo: read as jsonl.zst, needs zstandard)",
            )
            for key, subset in _PROOF_PILE.items()
        ),
        _files(
            "openmathinstruct_1",
            "nvidia/OpenMathInstruct-1",
            "json",
            "hf://datasets/nvidia/OpenMathInstruct-1/correct_solutions/{split}.jsonl",
            ("question", "generated_solution"),
            r.qa_renderer("question", "generated_solution"),
            "OpenMathInstruct-1 correct solutions (jsonl); rows with is_correct=false are filtered",
            keep=r.keep_correct,
        ),
        _hub(
            "openmathinstruct_2",
            "nvidia/OpenMathInstruct-2",
            None,
            ("problem", "generated_solution"),
            r.qa_renderer("problem", "generated_solution"),
            "OpenMathInstruct-2 (parquet); splits train, train_1M, train_2M, train_5M",
        ),
        _files(
            "metamathqa",
            "meta-math/MetaMathQA",
            "json",
            "hf://datasets/meta-math/MetaMathQA/MetaMathQA-395K.json",
            ("query", "response"),
            r.qa_renderer("query", "response"),
            "MetaMathQA: one top-level JSON array file (a single unit)",
        ),
        # ---- downstream training sets (train splits only; evaluation uses the others). Each
        # comes from the hub repo the installed lm-eval evaluates on (tests/data_prep check it).
        _hub(
            "triviaqa",
            "mandarjoshi/trivia_qa",
            "rc.nocontext",
            ("question", "answer"),
            r.render_triviaqa,
            "TriviaQA rc.nocontext train, answer.value",
        ),
        _hub(
            "nq_open",
            "google-research-datasets/nq_open",
            None,
            ("question", "answer"),
            r.render_nq_open,
            "NQ-open train, first listed answer",
        ),
        _hub(
            "arc_easy",
            "allenai/ai2_arc",
            "ARC-Easy",
            ("question", "choices", "answerKey"),
            r.render_arc,
            "ARC-Easy train, correct choice text",
        ),
        _hub(
            "arc_challenge",
            "allenai/ai2_arc",
            "ARC-Challenge",
            ("question", "choices", "answerKey"),
            r.render_arc,
            "ARC-Challenge train, correct choice text",
        ),
        _hub(
            "hellaswag",
            "Rowan/hellaswag",
            None,
            ("ctx", "endings", "label"),
            r.render_hellaswag,
            "HellaSwag train, context then the correct ending",
        ),
        _hub(
            "piqa",
            "baber/piqa",
            None,
            ("goal", "sol1", "sol2", "label"),
            r.render_piqa,
            "PIQA train (parquet copy of the script-only ybisk/piqa, as lm-eval uses)",
        ),
        _hub(
            "siqa",
            "lighteval/siqa",
            None,
            ("context", "question", "answerA", "answerB", "answerC", "label"),
            r.render_siqa,
            "Social IQa train (parquet copy of the script-only allenai/social_i_qa, as lm-eval uses)",
        ),
        _hub(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            ("sentence", "option1", "option2", "answer"),
            r.render_winogrande,
            "WinoGrande XL train, blank filled with the correct option",
        ),
        _hub(
            "commonsense_qa",
            "tau/commonsense_qa",
            None,
            ("question", "choices", "answerKey"),
            r.render_commonsense_qa,
            "CommonsenseQA train, correct choice text",
        ),
        _hub(
            "openbookqa",
            "allenai/openbookqa",
            "main",
            ("question_stem", "choices", "answerKey"),
            r.render_openbookqa,
            "OpenBookQA main train, correct choice text",
        ),
        _hub(
            "sciq",
            "allenai/sciq",
            None,
            ("question", "correct_answer"),
            r.render_sciq,
            "SciQ train: support paragraph (if any) then Q/A",
        ),
        _hub(
            "gsm8k",
            "openai/gsm8k",
            "main",
            ("question", "answer"),
            r.render_gsm8k,
            "GSM8K main train, worked answer with '#### n'",
        ),
    ]
    registry = {s.key: s for s in specs}
    assert len(registry) == len(specs), "duplicate registry keys"
    return registry


REGISTRY: dict[str, SourceSpec] = _build()


def get_spec(key: str) -> SourceSpec:
    """The registry entry for `key`; an unknown key names the closest known ones."""
    try:
        return REGISTRY[key]
    except KeyError:
        close = difflib.get_close_matches(key, REGISTRY, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        known = ", ".join(sorted(REGISTRY))
        raise DataError(f"unknown source {key!r}{hint}; known sources: {known}") from None
