"""Issue 23 item 1 on a GPU: after the resharded resume writes Adam's state itself, the fused
AdamW kernel (what a CUDA run uses, pretrain/deepspeed_config.py) steps with it; a `step` left
on the host is an illegal memory access there. (tests/pretrain/test_reshard_units.py checks
the device on CPU with the meta device standing in; tests/gpu/test_train_bf16.py resumes a
whole bf16 run, which goes through the same code.)

Run: `python -m pytest tests/gpu/test_checkpoint_gpu.py` (skips without CUDA).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pretrain import deepspeed_compat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_fused_adamw_steps_with_the_state_a_resharded_resume_writes():
    flat = torch.nn.Parameter(torch.randn(1024, device="cuda"))
    opt = torch.optim.AdamW([flat], lr=1e-3, fused=True)
    zero = SimpleNamespace(
        optimizer=opt,
        _hp_optimizer_states_linked=True,
        _lazy_init_hp_params_optimizer_state=lambda: None,
    )
    saved_step = torch.tensor(7.0)  # as loaded from a file, on the host
    deepspeed_compat.init_zero_adam_state(SimpleNamespace(optimizer=zero), [saved_step], None)
    assert opt.state[flat]["step"].device == flat.device
    flat.grad = torch.randn_like(flat)
    opt.step()
    torch.cuda.synchronize()
    assert float(opt.state[flat]["step"]) == 8.0
