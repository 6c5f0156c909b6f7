"""Parameter counts of the paper's reference shapes match the seed code's (to within 0.1M)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lpa.models.builder import build_model
from megatron_lpa.models.lpa_config import LPAConfig

LLAMA_130M = dict(
    num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=2048,
    vocab_size=32000, max_sequence_length=256, normalization="RMSNorm", gated_linear_unit=True,
    activation_func=F.silu, add_bias_linear=False, position_embedding_type="rope",
)
GPT_370M = dict(
    num_layers=24, hidden_size=1024, num_attention_heads=8, kv_channels=128, ffn_hidden_size=4096,
    vocab_size=32000, max_sequence_length=1024, normalization="LayerNorm", activation_func=F.relu,
    add_bias_linear=True, position_embedding_type="learned_absolute",
)


def count_params(shape: dict, rank: int) -> float:
    config = LPAConfig(**shape, lpa_attn_rank=rank, use_cpu_initialization=True,
                       perform_initialization=False, params_dtype=torch.float32)
    return sum(p.numel() for p in build_model(config).parameters()) / 1e6


@pytest.mark.parametrize("shape,rank,expected", [
    (LLAMA_130M, 0, 134.1), (LLAMA_130M, 128, 115.3),
    (GPT_370M, 0, 368.9), (GPT_370M, 320, 331.1),
])
def test_reference_shapes(model_parallel, shape, rank, expected):
    assert count_params(shape, rank) == pytest.approx(expected, abs=0.1)
