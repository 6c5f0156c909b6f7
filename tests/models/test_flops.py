"""The FLOP counter against hand counts of the 130M shapes (dense and LPA)."""

import torch.nn.functional as F

from megatron_lpa.models.flops import matmul_params, training_flops_per_token
from megatron_lpa.models.lpa_config import LPAConfig


def config(**overrides):
    shape = dict(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        ffn_hidden_size=2048,
        vocab_size=32000,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
    )
    return LPAConfig(**{**shape, **overrides})


def test_dense_130m_by_hand():
    # per layer: 4 * 768^2 (q, k, v, o) + 3 * 768 * 2048 (gate, up, down); head 768 * 32000
    per_layer = 4 * 768 * 768 + 3 * 768 * 2048
    assert matmul_params(config()) == 12 * per_layer + 768 * 32000
    # attention: 4 * s * d forward, half for causal, 3x for training = 6 * s * d per layer
    expected = 6 * (12 * per_layer + 768 * 32000) + 12 * 6 * 256 * 768
    assert training_flops_per_token(config(), 256) == expected


def test_lpa_counts_both_factors():
    per_layer = 4 * 128 * (768 + 768) + 3 * 768 * 2048
    assert matmul_params(config(lpa_attn_rank=128)) == 12 * per_layer + 768 * 32000


def test_grouped_query_and_low_rank_ffn():
    # 12 heads of 64 in 4 groups: k and v are 768 -> 256; FFN gate/up/down at rank 64.
    cfg = config(num_query_groups=4, lpa_ffn_rank=64)
    per_layer = (768 * 768 * 2 + 2 * 768 * 256) + 2 * 64 * (768 + 2048) + 64 * (2048 + 768)
    assert matmul_params(cfg) == 12 * per_layer + 768 * 32000
