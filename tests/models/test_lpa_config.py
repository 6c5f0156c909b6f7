"""LPAConfig's defaults and the cases it refuses, each with what to change."""

import pytest
import torch

from megatron_lpa.models.builder import build_model
from megatron_lpa.models.lpa_config import LPAConfig

SMALL = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=8,
    ffn_hidden_size=128,
    vocab_size=128,
    max_sequence_length=16,
    use_cpu_initialization=True,
    params_dtype=torch.float32,
)


def test_lpa_factors_match_the_dense_variance_under_megatrons_init(model_parallel):
    """So that a megatron-initialised dense model is compared with LPA initialised alike."""
    config = LPAConfig(**SMALL, lpa_attn_rank=16)
    assert config.lpa_init == "variance"
    qkv = build_model(config).decoder.layers[0].self_attention.linear_qkv
    sigma, r = config.init_method_std, 16
    expected = (sigma**2 / r) ** 0.25
    for factor in (qkv.down_weight, qkv.up_weight_q):
        assert factor.std().item() == pytest.approx(expected, rel=0.1)
    assert LPAConfig(**SMALL, lpa_attn_rank=16, lpa_init="linear").lpa_init == "linear"


def test_pytorch_init_takes_linear_factors_and_refuses_variance():
    assert LPAConfig(**SMALL, lpa_attn_rank=16, init_style="pytorch").lpa_init == "linear"
    with pytest.raises(ValueError, match="Drop --lpa-init or use --init-style megatron"):
        LPAConfig(**SMALL, lpa_attn_rank=16, init_style="pytorch", lpa_init="variance")


@pytest.mark.parametrize("groups,tp", [(1, 4), (2, 4)])
def test_lpa_refuses_query_groups_split_over_tp_ranks(groups, tp):
    """megatron gathers a query group that spans TP ranks from its fused layout; LPA's per-rank
    Q, K and V cannot be laid out that way."""
    with pytest.raises(ValueError, match=f"use a TP size <= {groups}"):
        LPAConfig(**SMALL, num_query_groups=groups, tensor_model_parallel_size=tp, lpa_attn_rank=4)
    # Dense attention takes megatron's path for it.
    LPAConfig(**SMALL, num_query_groups=groups, tensor_model_parallel_size=tp)


def test_lpa_refuses_the_attention_output_gate():
    with pytest.raises(ValueError, match="attention output gate"):
        LPAConfig(**SMALL, lpa_attn_rank=16, attention_output_gate=True)


@pytest.mark.parametrize("field,value", [("sublayer_norm", "post"), ("init_style", "xavier")])
def test_unknown_choices_name_the_allowed_ones(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        LPAConfig(**SMALL, **{field: value})
