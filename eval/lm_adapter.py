"""Our decoder as an lm-evaluation-harness model: `lm_eval --model mop --model_args pretrained=RUN`.

It mirrors the harness's own `hf` model so that scores are comparable with published ones:

- loglikelihood: context + continuation, left-truncated to max_seq_len + 1 tokens, right-padded,
  sorted longest first; (sum of continuation logprobs, continuation is the greedy choice).
  An empty context is conditioned on the EOS token (TemplateLM.prefix_token_id).
- loglikelihood_rolling: the harness's disjoint windows of max_seq_len tokens.
- generate_until: greedy only, contexts left-truncated to max_seq_len - max_gen_toks, stopping at
  EOS or any `until` string, the output cut before the first stop string (the harness leaves
  that to the model).

Data parallel under torchrun: the harness itself hands each rank its share of the documents
(it reads `rank`/`world_size`) and gathers metrics through `all_gather`/`gather_object`, so
the request methods here only ever see this rank's requests.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from data_prep.tokenizer import TextTokenizer
from eval.generate import cut_at_stop, greedy_generate, pad_right
from mop.errors import ConfigError
from mop.progress import progress
from pretrain.model.transformer import Transformer
from pretrain.parallel.mesh import collective_device

DEFAULT_MAX_GEN_TOKS = 256  # the harness's HF model default


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


@register_model("mop")
class MopLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | None = None,
        model: Transformer | None = None,
        tokenizer: TextTokenizer | None = None,
        data_dir: str | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        dtype: str = "float32",
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # Harness options we do not use (e.g. max_batch_size) arrive here; ignore them.
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise ConfigError(f"unknown mop model_args: {sorted(kwargs)}")
        self._device = torch.device(device or default_device())
        self.loaded = None  # the LoadedModel (checkpoint facts) when built from `pretrained`
        if model is None:
            if pretrained is None:
                raise ConfigError("the mop model needs pretrained=<checkpoint> or a model object")
            from eval.checkpoint import load_for_eval

            self.loaded = load_for_eval(pretrained, data_dir=data_dir, device=self.device)
            model, tokenizer = self.loaded.model, self.loaded.tokenizer
        elif tokenizer is None:
            raise ConfigError("a model object needs its tokenizer too")
        self.model = model.to(self.device).eval()
        self.tok = tokenizer
        self.batch_size = _parse_batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length or model.cfg.max_seq_len)
        if self._max_length > model.cfg.max_seq_len:
            raise ConfigError(
                f"max_length={self._max_length} > the model's max_seq_len={model.cfg.max_seq_len}"
            )
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16}.get(dtype, "bad")
        if self.autocast_dtype == "bad":
            raise ConfigError(f"dtype must be float32 or bfloat16, not {dtype!r}")
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # Basics the harness reads ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"mop-{self.tok.hash[:12]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tok.encode(string)  # no BOS: the model was trained on plain documents

    def tok_decode(self, tokens: list[int]) -> str:
        # Ids the tokenizer does not know (the model's vocab may be padded) decode to nothing.
        return self.tok.decode([t for t in tokens if t < self.tok.vocab_size])

    # Scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """fp32 log-softmax over the full model vocab (as the hf model does) [B, T, V]."""
        ids = pad_right(rows, self.eot_token_id).to(self.device)
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            logits = self.model(ids).logits
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids)."""
        order = sorted(
            range(len(requests)),
            key=lambda i: (-len(requests[i][1]) - len(requests[i][2]), i),
        )
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = progress(
            total=len(requests), desc="loglikelihood", disable=disable_tqdm or self.rank != 0
        )
        for a in range(0, len(order), self.batch_size):
            chunk = order[a : a + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not ctx or not cont:
                    raise ValueError("loglikelihood request with an empty context or continuation")
                # Left-truncate so the last max_length tokens (plus the final target) remain.
                rows.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            logprobs = self._logprobs(rows)
            for i, row, cont, lp in zip(chunk, rows, conts, logprobs):
                n = len(row)
                scored = lp[n - len(cont) : n]  # positions whose next token is a continuation
                target = torch.tensor(cont, device=scored.device)
                greedy = bool((scored.argmax(dim=-1) == target).all())
                logprob = float(scored.gather(1, target[:, None]).sum())
                results[i] = (logprob, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # Generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        # One batch holds requests with the same generation kwargs, longest contexts first.
        encoded = [self.tok_encode(ctx) for ctx, _ in args]
        groups: dict[str, list[int]] = {}
        for i, (_, kw) in enumerate(args):
            groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(args)
        bar = progress(
            total=len(args), desc="generate_until", disable=disable_tqdm or self.rank != 0
        )
        for idx in groups.values():
            until, max_gen = self._gen_settings(args[idx[0]][1])
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ConfigError(
                    f"max_gen_toks={max_gen} leaves no room for context in max_length="
                    f"{self.max_length}"
                )
            idx = sorted(idx, key=lambda i: (-len(encoded[i]), i))
            for a in range(0, len(idx), self.batch_size):
                chunk = idx[a : a + self.batch_size]
                # An empty context starts from EOS, the token every training document follows.
                prompts = [encoded[i][-max_ctx:] or [self.eot_token_id] for i in chunk]

                def stop(ids: list[int], until=until) -> bool:
                    text = self.tok_decode(ids)
                    return any(s in text for s in until)

                outs = greedy_generate(
                    self.model,
                    prompts,
                    max_gen,
                    eos_id=self.eot_token_id,
                    stop=stop,
                    pad_id=self.eot_token_id,
                    device=self.device,
                    autocast_dtype=self.autocast_dtype,
                )
                for i, ids in zip(chunk, outs):
                    results[i] = cut_at_stop(self.tok_decode(ids), until)
                    self.cache_hook.add_partial("generate_until", args[i], results[i])
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _gen_settings(self, kwargs: dict) -> tuple[list[str], int]:
        """(stop strings incl. EOS, max new tokens), read the way the harness's hf model does."""
        kw = normalize_gen_kwargs(dict(kwargs or {}), self.max_gen_toks)
        if kw.get("do_sample"):
            raise ConfigError("the mop model decodes greedily only (do_sample/temperature > 0)")
        until = handle_stop_sequences(kw.get("until"), eos=self.tok.decode([self.eot_token_id]))
        return until, int(kw["max_gen_toks"])

    # Data parallel hooks the harness calls ----------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        # The harness builds its tensors on any device; the backend takes only its own.
        mine = tensor.to(collective_device())
        parts = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        out = torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)
        return out.to(tensor.device)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)  # backend-agnostic (gather_object is not on nccl)
        return out if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _parse_batch_size(value: int | str) -> int:
    # "auto" (the harness's memory probe) is not implemented: a fixed default is used instead.
    if isinstance(value, str):
        value = value.split(":")[0]
        value = 16 if value == "auto" else int(value)
    if value < 1:
        raise ConfigError(f"batch_size must be >= 1, got {value}")
    return int(value)
