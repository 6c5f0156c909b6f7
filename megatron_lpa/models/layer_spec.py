"""The layer spec: the only place that knows which megatron-core slots LPA replaces.

Starts from megatron-core's local GPT layer (``get_gpt_layer_local_spec``) and swaps
``linear_qkv``/``linear_proj`` (attention rank) and ``linear_fc1``/``linear_fc2`` (FFN rank) for the
low-rank layers (with LPA, self-attention for one that takes Q, K and V separately), the norms for
the sequence-parallel-capable ones, by default core attention for SDPA and, with fused kernels, the
SwiGLU activation for the fused one.

Where the norms go follows ``config.sublayer_norm``: ``input`` normalises each sublayer's input and
the last layer's output (megatron's and LLaMA's pre-norm); ``output`` normalises each sublayer's
output inside its residual branch and has no final norm (the paper's GPT-style block): the input
norm slots stay empty and the output slots become ``NormalizedOutputLinear``.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_lpa.layers.low_rank_attention import LowRankSelfAttention
from megatron_lpa.layers.low_rank_linear import (
    LowRankColumnParallelLinear,
    LowRankRowParallelLinear,
)
from megatron_lpa.layers.norm import SequenceParallelNormFactory
from megatron_lpa.layers.output_norm import NormalizedOutputLinear, NormalizedOutputSubmodules
from megatron_lpa.layers.sdpa_attention import SDPAttention
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.ops.swiglu import SwiGLU


def _column(config: LPAConfig, rank: int, projections: str, split_output: bool = False):
    if rank == 0:
        return ColumnParallelLinear
    params = {
        "lpa_rank": rank,
        "projections": projections,
        "lpa_init": config.lpa_init,
        "split_output": split_output,
    }
    return ModuleSpec(module=LowRankColumnParallelLinear, params=params)


def _row(config: LPAConfig, rank: int):
    """A sublayer's output slot: its linear, with the norm after it for
    ``sublayer_norm="output"``."""
    linear = (
        RowParallelLinear
        if rank == 0
        else ModuleSpec(
            module=LowRankRowParallelLinear, params={"lpa_rank": rank, "lpa_init": config.lpa_init}
        )
    )
    if config.sublayer_norm == "input":
        return linear
    return ModuleSpec(
        module=NormalizedOutputLinear,
        submodules=NormalizedOutputSubmodules(linear=linear, norm=SequenceParallelNormFactory),
    )


def get_lpa_layer_spec(config: LPAConfig) -> ModuleSpec:
    """One transformer layer for any of the four variants of ``config``."""
    fc1_projections = "gate_up" if config.gated_linear_unit else "single"
    core_attention = SDPAttention if config.core_attention == "sdpa" else DotProductAttention
    input_norm = SequenceParallelNormFactory if config.sublayer_norm == "input" else IdentityOp
    # LPA's Q, K and V go to attention separately (LPAConfig makes sure each TP rank holds whole
    # query groups and there is no output gate, the cases that need megatron's fused layout).
    low_rank_attention = config.lpa_attn_rank > 0
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=LowRankSelfAttention if low_rank_attention else SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=_column(config, config.lpa_attn_rank, "qkv", low_rank_attention),
                    core_attention=core_attention,
                    linear_proj=_row(config, config.lpa_attn_rank),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=input_norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=_column(config, config.lpa_ffn_rank, fc1_projections),
                    activation_func=SwiGLU if config.fused_swiglu else None,
                    linear_fc2=_row(config, config.lpa_ffn_rank),
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_lpa_block_spec(config: LPAConfig) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus, with pre-norm, the final norm (SP-capable, unlike
    megatron's fallback)."""
    layer = get_lpa_layer_spec(config)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config),
        layer_norm=SequenceParallelNormFactory if config.sublayer_norm == "input" else None,
    )
