"""Typed config of a data-preparation job (one YAML file per mixture)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mop.config import StrictModel


class SourceConfig(StrictModel):
    """One input source of a mixture.

    `source` names an entry of the registry (data_prep/sources.py) that knows the hub id,
    the schema and how a row becomes text. `data_files` reads the same schema from local
    files instead of the hub (a path, a glob, a directory, or a list of these).
    """

    source: str
    name: str | None = None  # label in manifests; defaults to `source`
    weight: float = Field(1.0, ge=0)
    data_files: str | list[str] | None = None
    hub_config: str | None = None  # overrides the registry's config name
    split: str | None = None  # overrides the registry's split
    max_units: int | None = Field(None, gt=0)  # take only the first k input shards (files)
    max_documents_per_unit: int | None = Field(None, gt=0)

    @property
    def label(self) -> str:
        return self.name or self.source

    @field_validator("source")
    @classmethod
    def _known_source(cls, key: str) -> str:
        from data_prep.sources import get_spec  # registry imports nothing heavy

        try:
            get_spec(key)
        except Exception as exc:  # DataError -> pydantic error naming the field
            raise ValueError(str(exc)) from None
        return key


class TokenizerConfig(StrictModel):
    """Train a tokenizer on a sample of the mixture, or load an existing one."""

    kind: Literal["bpe", "sentencepiece", "pretrained"] = "bpe"
    path: str | None = None  # tokenizer.json or SentencePiece .model when kind=pretrained
    vocab_size: int = Field(32000, ge=260, le=1_000_000)
    sample_documents: int = Field(100_000, gt=0)  # documents drawn from the mixture to train on
    min_frequency: int = Field(2, ge=1)
    eos_token: str = "<|endoftext|>"

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> TokenizerConfig:
        if self.kind == "pretrained" and not self.path:
            raise ValueError(
                "tokenizer.kind=pretrained needs tokenizer.path (tokenizer.json or .model)"
            )
        return self


class ShardConfig(StrictModel):
    max_tokens: int = Field(50_000_000, gt=0)  # a shard is closed once it holds this many tokens
    encode_batch_documents: int = Field(512, gt=0)  # documents per encode_batch call


class MixtureConfig(StrictModel):
    """Token budget of the training mixture; per-source shares come from source weights."""

    total_tokens: float = Field(65e9, gt=0)  # the paper: about 65B tokens per mixture
    seed: int = 0


class ValidationConfig(StrictModel):
    """Held-out documents (disjoint from training) and the fixed validation sequences."""

    fraction: float = Field(0.001, ge=0, lt=0.5)  # share of documents held out per source
    num_sequences: int = Field(5000, ge=0)
    seq_len: int = Field(2048, gt=1)
    seed: int = 1234


class DecontamConfig(StrictModel):
    """Drop training documents sharing a long n-gram with local evaluation sets."""

    enabled: bool = False
    ngram: int = Field(13, ge=4)
    eval_files: list[str] = []  # jsonl/json/parquet files of evaluation sets
    eval_fields: list[str] = []  # fields holding text; empty = every string field

    @model_validator(mode="after")
    def _files_when_enabled(self) -> DecontamConfig:
        if self.enabled and not self.eval_files:
            raise ValueError(
                "decontamination.enabled=true needs decontamination.eval_files=[...] "
                "(the evaluation sets whose n-grams are removed)"
            )
        return self


class DataPrepConfig(StrictModel):
    output_dir: str
    sources: list[SourceConfig] = Field(min_length=1)
    tokenizer: TokenizerConfig = TokenizerConfig()
    shards: ShardConfig = ShardConfig()
    mixture: MixtureConfig = MixtureConfig()
    validation: ValidationConfig = ValidationConfig()
    decontamination: DecontamConfig = DecontamConfig()
    workers: int = Field(1, ge=1)  # processes within a node (each uses the tokenizer's threads)

    @model_validator(mode="after")
    def _unique_labels(self) -> DataPrepConfig:
        labels = [s.label for s in self.sources]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"source labels must be unique; repeated: {dupes} (set `name:`)")
        return self
