"""The fused ops' PyTorch path (what CPUs and builds without the CUDA extension run) against the
formulas it replaces, in float64."""


import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_lpa.ops import reference
from megatron_lpa.ops.cross_entropy import vocab_parallel_cross_entropy
from megatron_lpa.ops.rope import fused_apply_rotary_pos_emb
from megatron_lpa.ops.swiglu import swiglu


def test_cross_entropy_matches_torch_loss_and_gradient():
    logits = torch.randn(9, 4, 37, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (9, 4))
    loss = vocab_parallel_cross_entropy(logits, labels, tp_group=None)
    expected = F.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, expected.view(9, 4).float())
    weights = torch.randn(9, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected.view(9, 4) * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_cross_entropy_stats_of_vocabulary_slices_combine_to_the_full_loss():
    """What the TP ranks compute: each slice's (max, sum exp, label logit), merged."""
    logits = torch.randn(11, 30, dtype=torch.float64)
    labels = torch.randint(0, 30, (11,))
    slices = [reference.cross_entropy_stats(part, labels, start)
              for part, start in zip(logits.split(10, dim=1), (0, 10, 20))]
    global_max = torch.stack([s[0] for s in slices]).max(0).values
    sum_exp = sum(s[1] * torch.exp(s[0] - global_max) for s in slices)
    label_logit = sum(s[2] for s in slices)
    loss = global_max + torch.log(sum_exp) - label_logit
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="none").float())


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [16, 8])
def test_rope_matches_megatron_unfused_forward_and_backward(interleaved, rot):
    # A strided view of a fused [q, k, v] buffer, as megatron's attention hands it over.
    qkv = torch.randn(6, 3, 4, 3 * 16, dtype=torch.float64)
    x_fused = qkv[..., :16].requires_grad_()
    x_megatron = qkv[..., :16].detach().clone().requires_grad_()
    # Angles come in fp32 (megatron's RotaryEmbedding), so cos/sin are fp32-accurate.
    angles = (torch.randn(6, 1, 1, rot // 2) * 10).double()
    if interleaved:
        freqs = torch.stack((angles, angles), dim=-1).flatten(-2)
    else:
        freqs = torch.cat((angles, angles), dim=-1)
    out = fused_apply_rotary_pos_emb(x_fused, freqs, interleaved=interleaved)
    expected = _apply_rotary_pos_emb_bshd(x_megatron, freqs, rotary_interleaved=interleaved)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_fused.grad, x_megatron.grad, rtol=1e-6, atol=1e-6)


def test_rope_rejects_angles_it_cannot_broadcast():
    with pytest.raises(ValueError, match="--no-fused-kernels"):
        fused_apply_rotary_pos_emb(torch.randn(4, 2, 3, 8), torch.randn(4, 2, 1, 8))


def test_swiglu_matches_silu_gate_times_up():
    x = torch.randn(5, 3, 2 * 7, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = swiglu(x)
    gate, up = x_ref.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)

