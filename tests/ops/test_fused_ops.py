"""The fused ops' PyTorch path (what CPUs and builds without the CUDA extension run) against the
formulas it replaces, in float64; and the model with fused ops against megatron-core's unfused
one."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_lpa.ops import reference
from megatron_lpa.ops.cross_entropy import vocab_parallel_cross_entropy
from megatron_lpa.ops.rms_norm import FusedRMSNorm
from megatron_lpa.ops.rope import fused_apply_rotary_pos_emb
from megatron_lpa.ops.swiglu import swiglu
from megatron_lpa.ops.wgrad_accumulation import wgrad_gemm_accum_fp32
from tests.launch import pretrain_records


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
    slices = [
        reference.cross_entropy_stats(part, labels, start)
        for part, start in zip(logits.split(10, dim=1), (0, 10, 20))
    ]
    global_max = torch.stack([s[0] for s in slices]).max(0).values
    sum_exp = sum(s[1] * torch.exp(s[0] - global_max) for s in slices)
    label_logit = sum(s[2] for s in slices)
    loss = global_max + torch.log(sum_exp) - label_logit
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="none").float())


def test_rms_norm_matches_torch_forward_and_backward():
    x = torch.randn(5, 3, 24, dtype=torch.float64, requires_grad=True)
    ours = FusedRMSNorm(24, eps=1e-5, dtype=torch.float64)
    torch_norm = torch.nn.RMSNorm(24, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.normal_()
        torch_norm.weight.copy_(ours.weight)
    assert ours.state_dict().keys() == torch_norm.state_dict().keys()  # checkpoints interchange
    y = ours(x)
    expected = torch_norm(x)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, ours.weight), grad)
    expected_dx, expected_dw = torch.autograd.grad(expected, (x, torch_norm.weight), grad)
    torch.testing.assert_close(dx, expected_dx)
    torch.testing.assert_close(dw, expected_dw)


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


def _train_losses(*flags: str) -> list:
    """(loss, grad norm) of each of 6 steps of a tiny LPA model with SwiGLU, RMSNorm and RoPE."""
    model = (
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --swiglu "
        "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
        "--lpa-attn-rank 16 --untie-embeddings-and-output-weights"
    ).split()
    run = (
        "--mock-data --vocab-size 128 --micro-batch-size 4 --global-batch-size 8 --lr 3e-3 "
        "--train-iters 6 --log-interval 1 --eval-iters 0 --num-workers 0 --hidden-dropout 0 "
        "--attention-dropout 0"
    ).split()
    records = pretrain_records(1, *model, *run, *flags)
    return [(r["lm loss"], r["grad-norm"]) for r in records if r["split"] == "train"]


def test_wgrad_accumulation_adds_the_weight_gradient_into_main_grad_in_place():
    x = torch.randn(10, 6).to(torch.bfloat16)  # [tokens, in]
    dy = torch.randn(10, 4).to(torch.bfloat16)  # [tokens, out]
    main_grad = torch.randn(4, 6)
    expected = main_grad.double() + dy.double().t() @ x.double()
    before = main_grad
    wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert main_grad is before and main_grad.dtype == torch.float32
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-6, atol=1e-6)


def test_model_with_fused_ops_trains_like_megatrons_unfused_model():
    """Same loss and grad norm at every step: the ops are wired into the right slots and layouts
    (RoPE hook, SwiGLU activation slot, vocab-parallel loss), fused AdamW included."""
    fused = _train_losses()
    unfused = _train_losses("--no-fused-kernels")
    assert len(fused) == len(unfused) == 6
    for (loss, grad_norm), (loss_ref, grad_norm_ref) in zip(fused, unfused):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert grad_norm == pytest.approx(grad_norm_ref, rel=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_kernels_switch_chooses_the_ops_the_model_runs(model_parallel, monkeypatch, fused):
    """The equality test above cannot tell which path ran; this one checks the wiring itself."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_lpa.models.builder import build_model
    from megatron_lpa.models.lpa_config import LPAConfig
    from megatron_lpa.ops.swiglu import SwiGLU

    config = LPAConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        vocab_size=128,
        max_sequence_length=16,
        lpa_attn_rank=8,
        use_cpu_initialization=True,
        fused_kernels=fused,
    )
    model = build_model(config)
    assert config.apply_rope_fusion is fused
    assert isinstance(model.decoder.layers[0].mlp.activation_func, SwiGLU) is fused
    norms = [
        model.decoder.layers[0].input_layernorm,
        model.decoder.layers[0].pre_mlp_layernorm,
        model.decoder.final_layernorm,
    ]
    assert all(isinstance(norm, FusedRMSNorm if fused else torch.nn.RMSNorm) for norm in norms)
    if fused:
        assert rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb
    logits = torch.randn(4, 2, 128, requires_grad=True)
    labels = torch.randint(0, 128, (2, 4))
    calls = []
    original = reference.cross_entropy_stats
    monkeypatch.setattr(
        reference, "cross_entropy_stats", lambda *args: calls.append(1) or original(*args)
    )
    model.compute_language_model_loss(labels, logits)
    assert bool(calls) is fused
