"""Model FLOPs of one training token, counting LPA's real (factored) matrix multiplies.

Convention (as in the MFU tables of the notes): ``6 * N_matmul`` per token for the forward and
backward passes of every weight matrix that multiplies activations (attention, FFN, output head;
embedding lookups are free), plus attention's score and context products, ``4 * s * d_attn`` per
layer forward, halved for causal masking, times 3 for training.
"""

from megatron_lpa.models.lpa_config import LPAConfig


def _projection_params(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features) if rank else in_features * out_features


def matmul_params(config: LPAConfig) -> int:
    """Weights that multiply activations: all linear layers of all layers plus the output head."""
    d, heads = config.hidden_size, config.num_attention_heads
    groups = config.num_query_groups or heads
    q_width, kv_width = heads * config.kv_channels, groups * config.kv_channels
    attn_rank, ffn_rank = config.lpa_attn_rank, config.lpa_ffn_rank
    attention = (
        _projection_params(d, q_width, attn_rank)
        + 2 * _projection_params(d, kv_width, attn_rank)
        + _projection_params(q_width, d, attn_rank)
    )
    fc1_count = 2 if config.gated_linear_unit else 1
    ffn = fc1_count * _projection_params(d, config.ffn_hidden_size, ffn_rank) + _projection_params(
        config.ffn_hidden_size, d, ffn_rank
    )
    return config.num_layers * (attention + ffn) + d * config.vocab_size


def training_flops_per_token(config: LPAConfig, seq_length: int) -> float:
    """FLOPs of forward + backward for one token of a ``seq_length``-token causal sample."""
    attention_width = config.num_attention_heads * config.kv_channels
    causal_attention = 3 * 4 * seq_length * attention_width / 2
    return 6 * matmul_params(config) + config.num_layers * causal_attention
