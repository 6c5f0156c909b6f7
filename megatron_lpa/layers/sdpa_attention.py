"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the ``[b, np, sq, sk]`` score matrix;
SDPA dispatches to flash / cuDNN / memory-efficient kernels on GPU (and a fused math path on CPU)
and never stores it. Same slot contract as ``DotProductAttention``.
"""

import contextlib
from typing import Optional

import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Causal (or explicitly masked) multi-head / grouped-query attention.

    ``forward(query [sq, b, np/t, hn], key/value [sk, b, ng/t, hn], attention_mask)`` returns ``[sq,
    b, np/t * hn]``. ``attention_mask`` follows megatron's convention (True = masked out); when it
    is None the attention is causal.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism.")
        if config.apply_query_key_layer_scaling or config.softmax_type != "vanilla":
            raise ValueError(
                "SDPAttention supports neither query-key layer scaling nor softmax "
                "offsets; use megatron's DotProductAttention for those."
            )
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        heads = divide(config.num_attention_heads, tp_size)
        self.grouped = heads != divide(config.num_query_groups, tp_size)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(
                "SDPAttention takes neither attention_bias nor packed sequences."
            )
        sq, b = query.shape[:2]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        # Without SP, each TP rank drops out its own heads: draw from the per-rank RNG stream.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=mask is None,
                scale=self.softmax_scale,
                enable_gqa=self.grouped,
            )
        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)
