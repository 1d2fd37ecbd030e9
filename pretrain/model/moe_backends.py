"""Expert computation backends of the dropless MoE layer, over ONE set of parameters.

Weights use megablocks' GLU layout (`megablocks/layers/glu.py`, `SparseGLU`/`GroupedGLU`):
  w1 [E*f, d]  gate, expert e = rows e*f:(e+1)*f, applied as x @ w1[e].T
  v1 [E*f, d]  up,   applied as x @ v1[e].T
  w2 [E*f, d]  down, applied as h @ w2[e]   (no transpose: the transpose of nn.Linear's layout)
so a checkpoint loads into either backend and the megablocks module can be handed our Parameters.

- `torch` (reference, dropless, runs everywhere): sort the N*k assignments by expert, run each
  expert on its contiguous slice, scatter-add the weighted outputs back. The experts run as one
  `torch._grouped_mm` per matrix on CPU (its CPU kernel is the same per-expert `mm` in C++:
  bit-identical to the loop, no host list of sizes, traceable by torch.compile) and on CUDA with
  bf16 (the grouped kernel); else, or where torch refuses, a per-expert loop.
- `megablocks`: megablocks' `ParallelDroplessMLP` (mlp_type='glu', mlp_impl='grouped') fed with
  OUR routing, so routing and aux losses are identical between backends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mop.errors import ConfigError
from pretrain.model.router import Routing

MEGABLOCKS_INSTALL_HINT = (
    "install the GPU kernels with `pip install --no-deps --no-build-isolation -r "
    "requirements-gpu.txt` (on CUDA 13 see docker/build_gpu_deps.sh for the megablocks patch), "
    "or set model.moe.backend=torch"
)

# None = not tried yet; False = torch._grouped_mm refused once on this process (a torch or a
# device without it): the loop is used from then on, and the fallback said so once.
_GROUPED_MM_OK: bool | None = None
# What torch says when _grouped_mm cannot run these inputs here (a missing kernel, an old GPU,
# a layout or dtype it does not take). Anything else (out of memory, a CUDA fault, a shape bug)
# is a real failure and is raised, not hidden behind the slow loop.
GROUPED_MM_REFUSALS = (
    "not supported",  # e.g. "grouped gemm is not supported" / "only supported on sm90"
    "only supported",
    "not implemented",
    "expected mat_",  # a dtype it does not take
    "strides should be multiple",  # a width whose rows are not 16-byte aligned
    "aligned to 16 bytes",
)
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # _grouped_mm's dtypes
log = logging.getLogger(__name__)


def _sorted_assignments(routing: Routing) -> tuple[Tensor, Tensor]:
    """Order of the N*k assignments grouped by expert (stable), and each one's token index."""
    k = routing.experts.shape[1]
    order = torch.argsort(routing.experts.flatten(), stable=True)
    return order, order // k


def _expert_loop(xs: Tensor, counts: list[int], w1: Tensor, v1: Tensor, w2: Tensor) -> Tensor:
    # Empty experts run too (on zero rows): the output then always depends on every local
    # expert, so under expert parallelism a rank that received no token still enters the
    # backward all_to_alls the other ranks wait in (skipping them would deadlock).
    # unbind, not w1[e]: the backward of E index selects adds E zero-filled copies of the
    # whole [E, f, d] weight (quadratic in E); unbind's backward stacks the E gradients once.
    outs = []
    for chunk, g, u, d in zip(torch.split(xs, counts), w1.unbind(0), v1.unbind(0), w2.unbind(0)):
        h = F.silu(chunk @ g.t()) * (chunk @ u.t())
        outs.append(h @ d)
    return torch.cat(outs)


def is_grouped_mm_refusal(exc: BaseException) -> bool:
    """Whether `exc` from torch._grouped_mm means "cannot run here" (use the loop) rather than
    a failure to raise."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, (NotImplementedError, TypeError)):  # no kernel; an older signature
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(p in msg for p in GROUPED_MM_REFUSALS)


def _expert_grouped_mm(
    xs: Tensor, tokens_per_expert: Tensor, w1: Tensor, v1: Tensor, w2: Tensor
) -> Tensor | None:
    """One grouped GEMM per matrix; None when torch._grouped_mm is missing or refuses (logged
    once per process). Any other error is raised."""
    global _GROUPED_MM_OK
    if _GROUPED_MM_OK is False or not hasattr(torch, "_grouped_mm"):
        return None
    try:
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        h1 = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
        h3 = torch._grouped_mm(xs, v1.transpose(-2, -1), offs=offs)
        out = torch._grouped_mm(F.silu(h1) * h3, w2, offs=offs)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        if not is_grouped_mm_refusal(exc):
            raise
        _GROUPED_MM_OK = False
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning(
            "torch._grouped_mm refused the MoE experts on %s %s (%s: %s); the per-expert loop "
            "runs them from now on in this process (same results, slower)",
            xs.device.type,
            str(xs.dtype).removeprefix("torch."),
            type(exc).__name__,
            first_line,
        )
        return None
    _GROUPED_MM_OK = True
    return out


def grouped_mm_applies(xs: Tensor, weight: Tensor) -> bool:
    """Where the experts go through torch._grouped_mm: on CPU (the loop's own mm, in C++) for
    its dtypes, and on CUDA in bf16 (its grouped kernel; on CUDA in fp32 torch would only run
    the same loop after reading the sizes to the host). Not when autocast would change the
    matmul dtype on CPU (autocast does not cover _grouped_mm; the loop's matmuls follow it),
    and under torch.compile only in bf16 (the op's meta kernel, which compile traces with,
    refuses other dtypes in torch 2.13; the loop then breaks the graph at its host sizes)."""
    if xs.is_cuda:
        return compute_dtype(xs) == torch.bfloat16
    if torch.compiler.is_compiling() and xs.dtype != torch.bfloat16:
        return False
    return (
        xs.device.type == "cpu"
        and xs.dtype in GROUPED_MM_DTYPES
        and weight.dtype == xs.dtype
        and compute_dtype(xs) == xs.dtype
    )


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for x's device."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def run_local_experts(
    xs: Tensor,
    tokens_per_expert: Tensor,
    w1: Tensor,
    v1: Tensor,
    w2: Tensor,
    use_grouped_mm: bool = True,
    host_counts: list[int] | None = None,
) -> Tensor:
    """Rows `xs` grouped by expert (tokens_per_expert[e] rows for expert e, weights [E, f, d])
    -> their SwiGLU outputs: one grouped GEMM per matrix where `grouped_mm_applies` (and
    `use_grouped_mm`), else a per-expert loop. `host_counts`: the same counts already on the
    host (expert parallelism reads them with its split sizes), so the loop reads nothing."""
    if use_grouped_mm and grouped_mm_applies(xs, w1):
        ys = None
        if xs.is_cuda:  # explicit casts: autocast does not cover torch._grouped_mm
            bf16 = torch.bfloat16
            ys = _expert_grouped_mm(
                xs.to(bf16), tokens_per_expert, w1.to(bf16), v1.to(bf16), w2.to(bf16)
            )
        else:
            ys = _expert_grouped_mm(xs, tokens_per_expert, w1, v1, w2)
        if ys is not None:
            return ys
    if host_counts is None:
        host_counts = tokens_per_expert.tolist()  # a host sync on CUDA (the fallback only)
    return _expert_loop(xs, host_counts, w1, v1, w2)


def dispatch_combine(x: Tensor, routing: Routing, experts: Callable[[Tensor], Tensor]) -> Tensor:
    """The dropless token-choice pattern around any way of running the experts: gather the N*k
    assignments' rows grouped by expert (token order inside each expert), `experts(rows)` ->
    outputs in the same order, weight them and scatter-add them back into token order."""
    order, token_idx = _sorted_assignments(routing)
    ys = experts(x[token_idx])
    ys = ys * routing.weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_idx, ys.to(x.dtype))


def torch_dropless_experts(
    x: Tensor,
    routing: Routing,
    w1: Tensor,
    v1: Tensor,
    w2: Tensor,
    use_grouped_mm: bool = True,
) -> Tensor:
    """x: [N, d] -> [N, d] = sum over the k chosen experts of weight * expert(x)."""
    num_experts = routing.tokens_per_expert.numel()
    w1e, v1e, w2e = (w.view(num_experts, -1, x.shape[1]) for w in (w1, v1, w2))
    return dispatch_combine(
        x,
        routing,
        lambda xs: run_local_experts(xs, routing.tokens_per_expert, w1e, v1e, w2e, use_grouped_mm),
    )


def import_megablocks():
    """Import megablocks' dMoE pieces, or raise a ConfigError that names the install step."""
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import ParallelDroplessMLP
    except Exception as exc:  # ImportError, or a broken CUDA extension raising on import
        raise ConfigError(
            f"moe.backend=megablocks but megablocks cannot be imported ({exc.__class__.__name__}: "
            f"{exc}); {MEGABLOCKS_INSTALL_HINT}"
        ) from None
    return Arguments, ParallelDroplessMLP


class MegablocksExperts:
    """megablocks' ParallelDroplessMLP with its weights replaced by ours at every call.

    Deliberately not an nn.Module attribute of the MoE layer (kept out of the module tree):
    its own w1/v1/w2 are built on the meta device (no memory) and, during a forward, its
    parameter slots hold our Parameters (cast to the activation dtype when they differ, which
    autograd differentiates back to our fp32 master weights). So state_dict, optimizers,
    .to(device) and parallel wrappers only ever see our Parameters.
    """

    def __init__(self, d_model: int, ffn_hidden: int, num_experts: int, top_k: int) -> None:
        arguments_cls, dropless_cls = import_megablocks()
        try:
            args = arguments_cls(
                hidden_size=d_model,
                ffn_hidden_size=ffn_hidden,
                num_layers=1,
                bias=False,
                return_bias=False,
                activation_fn=F.silu,
                moe_num_experts=num_experts,
                moe_top_k=top_k,
                # Our router computes the aux losses; 0 turns off megablocks' global
                # load-balancing-loss bookkeeping (ParallelMLP.forward checks > 0).
                moe_loss_weight=0.0,
                mlp_type="glu",
                mlp_impl="grouped",
                memory_optimized_mlp=False,
                fp16=False,
                bf16=False,
                device="meta",
            )
        except (ImportError, ValueError) as exc:  # grouped_gemm missing -> assert in Arguments
            raise ConfigError(
                f"moe.backend=megablocks: megablocks refused its arguments ({exc}); "
                f"{MEGABLOCKS_INSTALL_HINT}"
            ) from None
        self.num_experts = num_experts
        self.top_k = top_k
        self.module = dropless_cls(args)
        # ParallelMLP.__init__ builds a (meta) capacity-factor MLP before the dropless one
        # replaces `self.mlp`; nothing of it is used.

    def __call__(self, x: Tensor, routing: Routing, w1: Tensor, v1: Tensor, w2: Tensor) -> Tensor:
        if not x.is_cuda:
            raise ConfigError(
                "moe.backend=megablocks needs CUDA tensors; use moe.backend=torch on CPU"
            )
        glu = self.module.mlp
        in_dtype = x.dtype
        # megablocks' own MoE.forward casts to the autocast dtype before permuting; we call its
        # expert module directly, so do the same (grouped_gemm runs in bf16/fp16 only).
        dtype = compute_dtype(x)
        x = x.to(dtype)
        glu._parameters["w1"] = w1.to(dtype)
        glu._parameters["v1"] = v1.to(dtype)
        glu._parameters["w2"] = w2.to(dtype)
        self.module.train(torch.is_grad_enabled())
        try:
            out = self.module(
                x,
                routing.probs,  # megablocks only stores it for its own lb loss (disabled)
                routing.weights.to(dtype),  # its scatter kernel weights rows in x's dtype
                routing.experts,
            )
        finally:
            # Do not keep references to this step's (cast) tensors between calls.
            for name in ("w1", "v1", "w2"):
                glu._parameters[name] = None
        return out.to(in_dtype)
