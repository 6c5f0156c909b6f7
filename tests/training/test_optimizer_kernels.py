"""The optimizer fast path: fused AdamW and megatron's multi-tensor hooks filled with foreach kernels,
computing what megatron-core's fallbacks compute, and switched back by enabled=False."""

from types import SimpleNamespace

import pytest
import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads

from megatron_lpa.training.optimizer_kernels import use_fast_optimizer_kernels


def _megatron_like(params):
    """What the switch touches of a megatron optimizer: the torch optimizer inside."""
    return SimpleNamespace(optimizer=torch.optim.AdamW(params, lr=1e-2))


@pytest.fixture(autouse=True)
def restore_megatron_fallbacks():
    yield
    use_fast_optimizer_kernels(_megatron_like([torch.nn.Parameter(torch.zeros(1))]), enabled=False)


def test_foreach_grad_norm_and_scale_match_megatrons_fallbacks():
    use_fast_optimizer_kernels(_megatron_like([torch.nn.Parameter(torch.zeros(1))]))
    grads = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    norm, _ = clip_grads.l2_norm_impl(2048, None, [grads], False)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(norm, expected.reshape(1))
    scaled = [g.clone() for g in grads]
    clip_grads.multi_tensor_scale_impl(2048, None, [scaled, scaled], 0.5)
    for g, s in zip(grads, scaled):
        torch.testing.assert_close(s, g * 0.5)
    # megatron copies fp32 main parameters to the fp16 model's with scale 1 (and scales copies too).
    for scale in (1.0, 0.25):
        copies = [torch.full_like(g, float("nan"), dtype=torch.float16) for g in grads]
        clip_grads.multi_tensor_scale_impl(2048, None, [grads, copies], scale)
        for g, c in zip(grads, copies):
            torch.testing.assert_close(c, (g * scale).half())
    use_fast_optimizer_kernels(_megatron_like([torch.nn.Parameter(torch.zeros(1))]), enabled=False)
    assert clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm


def test_fused_adamw_takes_the_same_steps_as_the_default():
    torch.manual_seed(0)
    start = torch.randn(4, 6)
    runs = []
    for enabled in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = _megatron_like([param])
        use_fast_optimizer_kernels(optimizer, enabled=enabled)
        assert optimizer.optimizer.param_groups[0]["fused"] is (True if enabled else None)
        torch.manual_seed(1)
        for _ in range(5):
            param.grad = torch.randn_like(param)
            optimizer.optimizer.step()
        runs.append(param.detach())
    torch.testing.assert_close(runs[0], runs[1])
