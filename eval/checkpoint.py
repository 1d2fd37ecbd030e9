"""Find, check and load a trained model for evaluation.

`--checkpoint` may name

- a run directory (`<run>/config.yaml` + `<run>/checkpoints/`): the save the
  `latest_complete` pointer names;
- a checkpoint directory (the one holding `latest_complete`): the same;
- one save, `<checkpoints>/step_XXXXXXXX`: accepted only if the pointer covers it (a save newer
  than the pointer was killed midway, see pretrain/checkpoint.py);
- an HF export (config.json + *.safetensors, pretrain/model/hf_export.py), with its tokenizer
  files written by `export_tokenizer` (or a `--data-dir`).

Every save is checked as training checks it before a resume (pretrain.checkpoint.check_save:
each recorded file present with its size; the files eval reads also by checksum, not the
optimizer partitions of an older ZeRO 1/2 save, which it never opens): a damaged save is refused
in one line (exit 66). A save from before records existed is loaded as before, with a note.

Any layout loads in one process: a layout-free save (ZeRO 1/2, pretrain/checkpoint_dcp.py)
holds the fp32 masters of the plain model, read box by box whatever the tp / ep / dp sizes
were (rounded through bf16 for a bf16 run: the weights its forward used); an older save's
tensor-parallel files are merged and its expert shards concatenated, one replica read once.

The model config is the one the save itself carries (client state `mop.config_yaml`), so a run
resumed later with other overrides still evaluates each save with its own config. The tokenizer
comes from the data directory the config records (or `data_dir=`) and must hash to the sha256
recorded at training time: another tokenizer would turn every score into noise silently.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from data_prep.tokenizer import META_FILE, TextTokenizer, load_tokenizer_dir
from mop.config import validate
from mop.errors import DamagedStateError, DataError
from mop.fileio import read_json
from pretrain.checkpoint import (
    POINTER,
    check_save,
    is_tag,
    optim_partition_files,
    read_pointer,
    saved_layout,
    step_of,
)
from pretrain.checkpoint_dcp import DCP_DIR, STATE_FILE
from pretrain.config import REPO_ROOT, TrainConfig
from pretrain.model.accounting import model_size
from pretrain.model.config import ModelConfig
from pretrain.model.transformer import Transformer, build_model

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 1/2: full weights under "module"
ZERO3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO 3: weights are partitioned
SOURCE_FILE = "mop_source.json"  # written by eval/export.py: the step an HF export came from


@dataclass
class CheckpointRef:
    """Where a checkpoint is, before anything heavy is loaded."""

    kind: str  # "deepspeed" | "hf"
    path: Path  # the step directory or the HF directory: results.json goes here
    run_dir: Path | None = None
    step: int | None = None


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: TextTokenizer
    ref: CheckpointRef
    train_cfg: TrainConfig | None = None
    data_dir: Path | None = None  # training data: tokenizer, validation set, synthetic tests

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def header(self, name: str | None = None) -> dict[str, Any]:
        """The results.json header (mop/results.py): where the weights came from and the model."""
        cfg = self.cfg
        size = model_size(cfg, seq_len=cfg.max_seq_len)
        run = self.ref.run_dir
        model = {
            "name": name or (run.name if run else self.ref.path.name),
            "ffn": cfg.ffn,
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "num_experts": cfg.moe.num_experts if cfg.moe is not None else None,
            "top_k": cfg.moe.top_k if cfg.moe is not None else None,
            "total_params": size.total_params,
            "active_params": size.active_params,
        }
        return {
            "checkpoint": str(self.ref.path),
            "run_dir": str(run) if run else None,
            "step": self.ref.step,
            "model": model,
        }


# Resolution -----------------------------------------------------------------------------


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _checkpoint_dir_of_run(run_dir: Path) -> Path:
    """A run's checkpoint directory: checkpoint.dir of its config, else <run>/checkpoints."""
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        try:
            data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
            custom = (data.get("checkpoint") or {}).get("dir")
        except (yaml.YAMLError, AttributeError):
            custom = None
        if custom:
            return Path(custom)
    return run_dir / "checkpoints"


def _run_dir_of(ckpt_dir: Path) -> Path | None:
    parent = ckpt_dir.parent
    return parent if (parent / "config.yaml").is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointRef:
    """Which save `path` means; refuses missing, unpointed (half-written) or incomplete ones."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise DataError(f"checkpoint path does not exist: {p}")
    if p.is_file():
        raise DataError(f"--checkpoint must be a directory (run, checkpoints or step_*), got {p}")
    if _is_hf_dir(p):
        src = read_json(p / SOURCE_FILE) if (p / SOURCE_FILE).is_file() else {}
        run = src.get("run_dir")
        return CheckpointRef(
            kind="hf", path=p, run_dir=Path(run) if run else None, step=src.get("step")
        )
    if is_tag(p.name):
        ckpt_dir, tag = p.parent, p.name
        pointed = _pointed(ckpt_dir)
        if pointed is None or step_of(tag) > step_of(pointed):
            raise DataError(
                f"checkpoint {p} is not complete: the {POINTER} pointer of {ckpt_dir} names "
                f"{pointed or 'nothing'} (a save newer than the pointer was interrupted)"
            )
    else:
        ckpt_dir = p if (p / POINTER).exists() else _checkpoint_dir_of_run(p)
        tag = _pointed(ckpt_dir)
        if tag is None:
            raise DataError(
                f"no complete checkpoint under {p}: {ckpt_dir / POINTER} is missing or empty "
                "(training saved nothing yet, or the path is not a run/checkpoint directory)"
            )
    step_dir = ckpt_dir / tag
    _check_files(step_dir)
    return CheckpointRef(
        kind="deepspeed", path=step_dir, run_dir=_run_dir_of(ckpt_dir), step=step_of(tag)
    )


def _pointed(ckpt_dir: Path) -> str | None:
    """The pointer's tag; a pointer holding anything else is damage, reported as such."""
    tag = read_pointer(ckpt_dir)
    if tag is not None and not is_tag(tag):
        raise DamagedStateError(
            f"checkpoint pointer {ckpt_dir / POINTER} is damaged: it holds {tag[:40]!r}, not a "
            "step tag (a resume of the run moves it aside)"
        )
    return tag


def _read_by_eval(name: str) -> bool:
    # ZeRO 1/2 optimizer partitions are only read for ZeRO 3 weights (no MODEL_STATES).
    return not name.endswith("optim_states.pt")


def _layout_free(step_dir: Path) -> bool:
    """A format-2 save (pretrain/checkpoint_dcp.py): the masters of any layout, via DCP."""
    return (step_dir / DCP_DIR).is_dir()


def _note_unrecorded(step_dir: Path) -> None:
    print(
        f"note: checkpoint {step_dir} has no integrity record (saved before saves were "
        "recorded): loading it unchecked",
        file=sys.stderr,
    )


def _check_files(step_dir: Path) -> None:
    if not step_dir.is_dir():
        raise DamagedStateError(f"checkpoint {step_dir} does not exist (the pointer names it)")
    if _layout_free(step_dir):
        # the masters share their files with the moments: all checked
        if not check_save(step_dir):
            _note_unrecorded(step_dir)
            missing = [
                n for n in (f"{DCP_DIR}/.metadata", STATE_FILE) if not (step_dir / n).is_file()
            ]
            if missing:
                raise DataError(f"checkpoint {step_dir} is incomplete: no {', '.join(missing)}")
        return
    zero3 = not (step_dir / MODEL_STATES).is_file()
    if not check_save(step_dir, checksum=None if zero3 else _read_by_eval):
        _note_unrecorded(step_dir)
    if zero3 and not (step_dir / ZERO3_STATES).is_file():
        raise DataError(
            f"checkpoint {step_dir} is incomplete: neither {MODEL_STATES} nor {ZERO3_STATES}"
        )


# Weights --------------------------------------------------------------------------------


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Wrappers that may sit around the model when it is saved: DDP-style and torch.compile.
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def _read_states(step_dir: Path) -> tuple[dict[str, Any], bool]:
    """The save's client state (with `mop`: config, tokenizer hash) and whether it is ZeRO 3."""
    if _layout_free(step_dir):
        f = step_dir / STATE_FILE
        try:
            return torch.load(f, map_location="cpu", weights_only=False)["client"], False
        except Exception as exc:  # a truncated file raises zipfile/pickle errors of many kinds
            raise DataError(f"cannot read {f} (half-written or corrupted?): {exc}") from None
    zero3 = not (step_dir / MODEL_STATES).is_file()
    f = step_dir / (ZERO3_STATES if zero3 else MODEL_STATES)
    try:
        # Our own files; they hold DeepSpeed objects besides tensors, so not weights_only.
        return torch.load(f, map_location="cpu", weights_only=False), zero3
    except Exception as exc:  # a truncated file raises zipfile/pickle errors of many kinds
        raise DataError(f"cannot read {f} (half-written or corrupted?): {exc}") from None


def _zero3_state_dict(step_dir: Path, dp_world: int) -> dict[str, torch.Tensor]:
    found = len(optim_partition_files(step_dir, tp_rank=0))
    if found != dp_world:
        raise DataError(
            f"ZeRO-3 checkpoint {step_dir} is incomplete: {found} of {dp_world} partition files"
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


def _train_config(states: dict[str, Any], run_dir: Path | None, where: Path) -> TrainConfig:
    client = states.get("mop") or {}
    text = client.get("config_yaml")
    if text:
        return validate(TrainConfig, yaml.safe_load(text))
    if run_dir is not None:  # older saves without the config in their client state
        return validate(TrainConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    raise DataError(f"{where} carries no training config and has no run directory config.yaml")


def _load_weights(model: Transformer, state: dict[str, torch.Tensor], where: Path) -> None:
    state = {k: v.float() for k, v in _strip(state).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = "lm_head.weight" if model.cfg.tie_embeddings else None
    missing = [m for m in missing if m != tied]
    if missing or unexpected:
        raise DataError(
            f"weights of {where} do not fit the model of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


# Tokenizer ------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike) -> Path:
    """As training resolves it: relative to the working directory, else to the repository."""
    p = Path(data_dir).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def load_checked_tokenizer(data_dir: Path, expected_sha256: str | None) -> TextTokenizer:
    if not (data_dir / META_FILE).is_file():
        raise DataError(
            f"no tokenizer in {data_dir} (missing {META_FILE}); pass --data-dir with the "
            "training data directory"
        )
    tok = load_tokenizer_dir(data_dir)
    if expected_sha256 and tok.hash != expected_sha256:
        raise DataError(
            f"tokenizer of {data_dir} has sha256 {tok.hash[:12]}..., but the model was trained "
            f"with {expected_sha256[:12]}...; pass --data-dir with the training tokenizer"
        )
    return tok


# Entry point ----------------------------------------------------------------------------


def load_for_eval(
    path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Resolve, check and load a checkpoint: fp32 weights in eval mode on `device`."""
    ref = resolve_checkpoint(path)
    if ref.kind == "hf":
        loaded = _load_hf(ref, data_dir)
    else:
        loaded = _load_deepspeed(ref, data_dir)
    loaded.model.to(device).eval()
    return loaded


def deepspeed_state_dict(
    step_dir: Path, states: dict[str, Any], cfg: TrainConfig, model: Transformer
) -> dict[str, torch.Tensor]:
    """The full single-process state dict of one save of any layout: ZeRO-3 partitions
    gathered, tensor-parallel shards merged, expert-parallel shards concatenated. `states` is
    the save's model-states file (`_read_states`), `model` a plain model of its config.
    A format-2 save holds the masters of the plain model whatever the layout: read directly."""
    if _layout_free(step_dir):
        from pretrain.checkpoint_dcp import read_plain_weights

        return read_plain_weights(step_dir, model, saved_layout(step_dir).get("precision", "fp32"))
    if not (step_dir / MODEL_STATES).is_file():
        state = _zero3_state_dict(step_dir, int(states.get("dp_world_size", 1)))
    elif (step_dir / "mp_rank_01_model_states.pt").is_file():
        from pretrain.parallel.tensor import load_consolidated

        state = load_consolidated(step_dir, model)  # merge the tensor-parallel shards
    else:
        state = states.get("module")
        if not state:
            raise DataError(f"{step_dir / MODEL_STATES} has no model weights ('module')")
    if cfg.parallel.expert_parallel > 1:
        from pretrain.parallel.expert import merge_expert_shards

        # DeepSpeed's module files hold rank 0's experts only (concatenated over tp by the
        # merge above, as if sharded): every expert tensor is replaced by the shard files'.
        state = {
            **_strip(state),
            **merge_expert_shards(
                step_dir, {"ep": cfg.parallel.expert_parallel, **saved_layout(step_dir)}
            ),
        }
    return state


def _load_deepspeed(ref: CheckpointRef, data_dir: str | os.PathLike | None) -> LoadedModel:
    states, _ = _read_states(ref.path)
    cfg = _train_config(states, ref.run_dir, ref.path)
    model = build_model(cfg.model)
    state = deepspeed_state_dict(ref.path, states, cfg, model)
    _load_weights(model, state, ref.path)
    recorded = (states.get("mop") or {}).get("tokenizer_sha256") or cfg.data.tokenizer_sha256
    ddir = resolve_data_dir(data_dir or cfg.data.data_dir)
    tok = load_checked_tokenizer(ddir, recorded)
    _check_vocab(tok, model.cfg, ref.path)
    return LoadedModel(model=model, tokenizer=tok, ref=ref, train_cfg=cfg, data_dir=ddir)


def _load_hf(ref: CheckpointRef, data_dir: str | os.PathLike | None) -> LoadedModel:
    from pretrain.model.hf_export import import_hf

    model = import_hf(ref.path)
    # The export's own tokenizer (export_tokenizer) is the recorded one; a --data-dir must match.
    recorded = None
    if (ref.path / META_FILE).is_file():
        recorded = load_tokenizer_dir(ref.path).hash
    if data_dir is None and recorded is None:
        raise DataError(
            f"{ref.path} has no tokenizer ({META_FILE}); pass --data-dir with the training data"
        )
    ddir = resolve_data_dir(data_dir) if data_dir is not None else ref.path
    tok = load_checked_tokenizer(ddir, recorded)
    _check_vocab(tok, model.cfg, ref.path)
    return LoadedModel(model=model, tokenizer=tok, ref=ref, data_dir=ddir)


def _check_vocab(tok: TextTokenizer, cfg: ModelConfig, where: Path) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise DataError(
            f"tokenizer has {tok.vocab_size} tokens but the model of {where} only "
            f"{cfg.vocab_size}: wrong tokenizer"
        )
