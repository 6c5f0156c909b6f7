"""The roofline model's byte and FLOP counts, checked by hand at a small shape."""

import torch

from megatron_lpa.models.bytes_moved import CARDS, Kernel, layer_bound_s, layer_kernels
from megatron_lpa.models.lpa_config import LPAConfig

SHAPE = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=8,
    ffn_hidden_size=128,
    vocab_size=128,
    max_sequence_length=16,
    use_cpu_initialization=True,
    params_dtype=torch.float32,
    gated_linear_unit=True,
)


def _by_name(config, batch=2, seq=16):
    return {k.name: k for k in layer_kernels(config, batch, seq)}


def test_a_dense_projection_reads_its_input_and_weight_and_writes_its_output():
    kernels = _by_name(LPAConfig(**SHAPE))
    t, d = 32, 64
    assert kernels["q fwd"] == Kernel("q fwd", 2.0 * t * d * d, 2 * (t * d + d * d + t * d))
    # The weight gradient lands in fp32 main_grad, read and written.
    assert kernels["q wgrad"].bytes == 2 * (t * d + t * d) + 8 * d * d
    assert kernels["fc1 fwd"].flops == 2.0 * t * d * 256  # gate and up in one GEMM


def test_a_low_rank_slot_is_two_gemms_through_the_rank_wide_activation():
    kernels = _by_name(LPAConfig(**SHAPE, lpa_attn_rank=8))
    t, d, r = 32, 64, 8
    assert "q fwd" not in kernels and "fc1 fwd" in kernels
    assert kernels["q.A fwd"] == Kernel("q.A fwd", 2.0 * t * d * r, 2 * (t * d + d * r + t * r))
    assert kernels["o.B dgrad"] == Kernel("o.B dgrad", 2.0 * t * r * d, 2 * (t * d + r * d + t * r))


def test_the_bound_is_the_slower_of_compute_and_memory():
    peak, bandwidth = CARDS["h100"]
    memory_bound = Kernel("x", flops=1e9, bytes=1e8)  # 10 FLOP/byte, far under the ridge
    compute_bound = Kernel("y", flops=1e12, bytes=1e6)
    assert memory_bound.bound_s(peak, bandwidth) == 1e8 / bandwidth
    assert compute_bound.bound_s(peak, bandwidth) == 1e12 / peak


def test_rope_is_counted_only_for_rotary_models():
    learned = _by_name(LPAConfig(**SHAPE, position_embedding_type="learned_absolute"))
    assert "rope q,k fwd" in _by_name(LPAConfig(**SHAPE)) and "rope q,k fwd" not in learned


def test_unfused_low_rank_moves_more_bytes_than_dense_where_both_are_memory_bound():
    """Both read x and write y; the pair adds the [tokens, r] round trip: why fusion is the
    lever."""
    dense = _by_name(LPAConfig(**SHAPE), batch=64)  # 1024 tokens: activations outweigh weights
    lpa = _by_name(LPAConfig(**SHAPE, lpa_attn_rank=4), batch=64)
    assert lpa["q.A fwd"].bytes + lpa["q.B fwd"].bytes > dense["q fwd"].bytes
    peak, bandwidth = CARDS["h100"]
    assert lpa["q.A fwd"].bound_s(peak, bandwidth) + lpa["q.B fwd"].bound_s(
        peak, bandwidth
    ) > dense["q fwd"].bound_s(peak, bandwidth)
    for card in CARDS:
        assert layer_bound_s(LPAConfig(**SHAPE, lpa_attn_rank=4), 64, 16, card) > layer_bound_s(
            LPAConfig(**SHAPE), 64, 16, card
        )
