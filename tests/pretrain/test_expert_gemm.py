"""Which GEMM runs the local experts under expert parallelism (issue 14 item 6): grouped_gemm's
gmm with moe.backend=megablocks on CUDA bf16, the torch path otherwise (every CPU run). The gmm
wiring (transposes, host-side group sizes) is checked here against the per-expert loop with a
reference gmm; tests/gpu/test_expert_parallel_gmm.py runs the real kernel."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pretrain.model.config import MoEConfig
from pretrain.model.moe_backends import _expert_loop
from pretrain.parallel import expert


def reference_gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm's contract: rows of group e times b[e] (or b[e].T)."""
    assert batch_sizes.device.type == "cpu"  # gmm reads the sizes on the host
    outs = []
    for e, chunk in enumerate(torch.split(a, batch_sizes.tolist())):
        outs.append(chunk @ (b[e].t() if trans_b else b[e]))
    return torch.cat(outs)


def test_gmm_experts_equal_the_loop():
    torch.manual_seed(0)
    e, f, d = 4, 6, 5
    w1, v1, w2 = (torch.randn(e, f, d, dtype=torch.float64) for _ in range(3))
    sizes = torch.tensor([3, 0, 5, 2])
    xs = torch.randn(int(sizes.sum()), d, dtype=torch.float64)
    got = expert._gmm_experts(xs, sizes, w1, v1, w2, gmm=reference_gmm)
    assert torch.equal(
        expert._gmm_experts(xs, sizes, w1, v1, w2, host_counts=sizes.tolist(), gmm=reference_gmm),
        got,
    )
    want = _expert_loop(xs, sizes.tolist(), w1, v1, w2)
    torch.testing.assert_close(got, want)


def test_the_chooser_keeps_the_torch_path_off_cuda():
    mb = SimpleNamespace(_megablocks=object(), cfg=MoEConfig(backend="megablocks"))
    plain = SimpleNamespace(_megablocks=None, cfg=MoEConfig())
    loop = SimpleNamespace(_megablocks=None, cfg=MoEConfig(grouped_mm=False))
    xs = torch.randn(3, 4, dtype=torch.bfloat16)
    assert expert.local_expert_gemm(mb, xs) is expert._torch_experts
    assert expert.local_expert_gemm(plain, xs) is expert._torch_experts
    assert expert.local_expert_gemm(loop, xs) is expert._loop_experts
