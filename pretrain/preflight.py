"""Checks of a training run's inputs that need no torch: run before anything heavy is imported.

A wrong path, a damaged manifest or shard, shards of another tokenizer, token ids that the
model's embedding cannot hold: each is one `error:` line within a second of the start,
instead of a traceback after DeepSpeed's start-up (or an IndexError in the middle of
training). `pretrain.__main__` calls `check_run_inputs` before it imports torch.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import check_tokenizer, load_manifest
from data_prep.shards import ShardReader
from mop.errors import DataError, check_dir_target
from pretrain.config import DataConfig, TrainConfig


def open_manifest(cfg: DataConfig, vocab_size: int, pinned_sha256: str | None = None) -> dict:
    """Load and check a data directory's manifest against the tokenizer and the model.

    `pinned_sha256` (e.g. from a checkpoint) and `cfg.tokenizer_sha256` both pin the tokenizer.
    Shard records that carry their largest token id (written since this check exists) are
    checked against `vocab_size` here; older ones are checked as windows are read.
    """
    if not Path(cfg.data_dir).is_dir():
        raise DataError(f"data.data_dir not found: {cfg.data_dir}")
    manifest = load_manifest(cfg.data_dir)
    for pin in (cfg.tokenizer_sha256, pinned_sha256):
        if pin:
            check_tokenizer(manifest, pin, where=cfg.data_dir)
    try:
        tok_vocab = int(manifest["tokenizer"]["vocab_size"])
        shards = list(manifest["shards"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{Path(cfg.data_dir) / 'manifest.json'} is damaged: no tokenizer vocab_size or "
            "shard list"
        ) from None
    if tok_vocab > vocab_size:
        raise DataError(
            f"tokenizer of {cfg.data_dir} has {tok_vocab} tokens but model.vocab_size is "
            f"{vocab_size}; set model.vocab_size={tok_vocab} (or larger)"
        )
    for rec in shards:
        top = rec.get("max_token_id") if isinstance(rec, dict) else None
        if top is not None and int(top) >= vocab_size:
            raise DataError(
                f"shard {Path(cfg.data_dir) / rec['path']} holds token id {top} >= "
                f"model.vocab_size={vocab_size}; set model.vocab_size={int(top) + 1} (or "
                "larger), or use the data's own tokenizer"
            )
    return manifest


def check_run_inputs(cfg: TrainConfig) -> dict:
    """Output paths, the manifest and every train shard's files; returns the manifest."""
    check_dir_target(cfg.run_dir, "run_dir")
    check_dir_target(str(cfg.checkpoint_dir), "checkpoint.dir")
    manifest = open_manifest(cfg.data, cfg.model.vocab_size)
    for rec in manifest["shards"]:
        if rec.get("split") == "train":
            ShardReader(Path(cfg.data.data_dir) / rec["path"], rec["dtype"])  # opens, checks sizes
    return manifest
