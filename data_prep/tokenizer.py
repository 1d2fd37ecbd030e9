"""Tokenizers: train a byte-level BPE (HF `tokenizers`) or a SentencePiece model, or load one.

Every document ends with the EOS token when it is packed into shards (the caller appends
`eos_id`). The tokenizer file and its sha256 are written into the output directory; the
hash is stamped into every shard manifest so training can refuse shards of another
tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mop.errors import DataError
from mop.fileio import atomic_write_json, read_json, sha256_file

META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"


class TextTokenizer:
    """A loaded tokenizer of either kind behind one small interface."""

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        self.path = path
        self.hash = sha256_file(path)
        if path.suffix == ".model":
            import sentencepiece as spm

            self.kind = "sentencepiece"
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            self.vocab_size = int(self._sp.get_piece_size())
            if eos_token is not None and self._sp.piece_to_id(eos_token) != self._sp.unk_id():
                self.eos_id = int(self._sp.piece_to_id(eos_token))
                self.eos_token = eos_token
            elif self._sp.eos_id() >= 0:
                self.eos_id = int(self._sp.eos_id())
                self.eos_token = self._sp.id_to_piece(self.eos_id)
            else:
                raise DataError(f"SentencePiece model {path} has no EOS piece")
        else:
            from tokenizers import Tokenizer

            self.kind = "hf"
            try:
                self._hf = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
                raise DataError(f"cannot read tokenizer {path}: {exc}") from None
            self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))
            candidates = [eos_token] if eos_token else []
            candidates += ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
            for tok in candidates:
                tid = self._hf.token_to_id(tok) if tok else None
                if tid is not None:
                    self.eos_id, self.eos_token = int(tid), tok
                    break
            else:
                raise DataError(f"tokenizer {path} has no EOS token (tried {candidates})")

    # -- encoding ---------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without EOS (the packer appends it)."""
        if self.kind == "hf":
            return [
                e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
            ]
        return self._sp.encode(list(texts), out_type=int)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    @property
    def token_dtype(self) -> np.dtype:
        return dtype_for_vocab(self.vocab_size)

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            "file": self.path.name,
            "sha256": self.hash,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "dtype": np.dtype(self.token_dtype).name,
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Copy the tokenizer file into `out_dir` and write its meta (hash, EOS, vocab)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / (SP_FILE if self.kind == "sentencepiece" else HF_FILE)
        if target.resolve() != self.path.resolve():
            tmp = target.with_suffix(target.suffix + ".tmp")
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, target)
        atomic_write_json(out_dir / META_FILE, {**self.meta(), "file": target.name})
        return target


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the bytes), else int32: the two token dtypes of
    Megatron's indexed-dataset format (it has no uint32; the .bin bytes are the same)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def load_tokenizer_dir(out_dir: str | os.PathLike) -> TextTokenizer:
    """Load the tokenizer saved in a data directory and check it against its recorded hash."""
    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"no tokenizer in {out_dir} (missing {META_FILE}); run `python -m data_prep tokenizer` first"
        )
    meta = read_json(meta_path)
    tok = TextTokenizer(out_dir / meta["file"], eos_token=meta.get("eos_token"))
    if tok.hash != meta["sha256"]:
        raise DataError(
            f"tokenizer file {tok.path} does not match its recorded sha256 "
            f"({tok.hash[:12]} != {meta['sha256'][:12]}): it was modified or is corrupted"
        )
    return tok


def train_bpe(
    texts: Iterable[str], vocab_size: int, eos_token: str = "<|endoftext|>", min_frequency: int = 2
) -> TextTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, so any UTF-8 text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _materialise(lambda p: tok.save(str(p)), HF_FILE, eos_token)


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, eos_token: str = "<|endoftext|>"
) -> TextTokenizer:
    """SentencePiece BPE with byte fallback; identity normalisation keeps text byte-exact."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "sp"
        # SentencePiece trains on "sentences": feed lines, which also bounds their length.
        lines = (line for text in texts for line in text.split("\n") if line.strip())
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=1 << 16,
            unk_id=0,
            bos_id=-1,
            pad_id=-1,
            eos_id=1,
            eos_piece=eos_token,
            user_defined_symbols=["\n"],
            hard_vocab_limit=False,
            minloglevel=2,
        )
        return _materialise(lambda p: shutil.copyfile(f"{prefix}.model", p), SP_FILE, eos_token)


def char_tokenizer(alphabet: str, eos_token: str = "<|endoftext|>") -> TextTokenizer:
    """One token per character of `alphabet` (synthetic tasks need no subword merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(alphabet))
    vocab = {eos_token: 0, "<unk>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([eos_token])
    return _materialise(lambda p: tok.save(str(p)), HF_FILE, eos_token)


# Trained tokenizers are written to a private temp dir first, then loaded from there so the
# object always has a file (and a hash); `save(out_dir)` copies it to the data directory.
_KEEP: list[tempfile.TemporaryDirectory] = []


def _materialise(write, filename: str, eos_token: str) -> TextTokenizer:
    tmp = tempfile.TemporaryDirectory(prefix="tok-")
    _KEEP.append(tmp)
    path = Path(tmp.name) / filename
    write(path)
    return TextTokenizer(path, eos_token=eos_token)
