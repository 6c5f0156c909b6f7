"""megatron-core's self-attention taking Q, K and V straight from the LPA projection.

megatron's ``SelfAttention`` expects one fused QKV output, interleaved per query group, and splits
it into views. LPA computes Q, K and V with separate up-projections, so interleaving them only to
split them again costs a copy of the QKV activations each way (forward and backward) for nothing.
The spec pairs this class with ``LowRankColumnParallelLinear(split_output=True)``.
"""

from megatron.core.transformer.attention import SelfAttention


class LowRankSelfAttention(SelfAttention):
    """``SelfAttention`` whose ``linear_qkv`` returns ``[q, k, v]`` separately.

    Shapes per TP rank: q ``[s, b, np/t * hn] -> [s, b, np/t, hn]``; k and v
    ``[s, b, ng/t * hn] -> [s, b, ng/t, hn]``. Needs at least one query group per TP rank (the spec
    falls back to megatron's ``SelfAttention`` otherwise) and no output gate.
    """

    def get_query_key_value_tensors(
        self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True
    ):
        if output_gate or not split_qkv:
            raise NotImplementedError(
                "LowRankSelfAttention supports neither the attention output "
                "gate nor the fused single-QKV RoPE."
            )
        (query, key, value), _ = self.linear_qkv(hidden_states)
        head_dim = self.hidden_size_per_attention_head
        query = query.view(*query.shape[:2], -1, head_dim)
        key = key.view(*key.shape[:2], -1, head_dim)
        value = value.view(*value.shape[:2], -1, head_dim)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value
