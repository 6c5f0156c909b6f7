"""The run's settings -> the model's ``LPAConfig`` (megatron-core's ``TransformerConfig`` plus
LPA)."""

import math

import torch.nn.functional as F

from megatron_lpa.config.training_config import TrainingConfig
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.platform.distributed import device_type

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def padded_vocab_size(vocab_size: int, cfg: TrainingConfig) -> int:
    """Megatron-LM's padding: a multiple of ``make_vocab_size_divisible_by * TP``."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def lpa_config(cfg: TrainingConfig, vocab_size: int) -> LPAConfig:
    """The model of ``cfg`` with ``vocab_size`` embedding rows (already padded) at its layout."""
    model, compute, parallel = cfg.model, cfg.compute, cfg.parallel
    fused = not compute.no_fused_kernels
    return LPAConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else _ACTIVATIONS[model.activation],
        add_bias_linear=not model.disable_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        embedding_dropout=model.embedding_dropout,
        init_method_std=model.init_method_std,
        init_style=model.init_style,
        init_seed=cfg.run.seed,
        sublayer_norm=model.sublayer_norm,
        output_layer_bias=model.output_layer_bias,
        lpa_attn_rank=model.lpa_attn_rank,
        lpa_ffn_rank=model.lpa_ffn_rank,
        lpa_init=model.lpa_init,
        vocab_size=vocab_size,
        max_sequence_length=model.max_position_embeddings or model.seq_length,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=compute.bf16,
        fp16=compute.fp16,
        params_dtype=compute.params_dtype,
        pipeline_dtype=compute.params_dtype,
        recompute_granularity=compute.recompute_granularity,
        recompute_method=compute.recompute_method,
        recompute_num_layers=compute.recompute_num_layers,
        core_attention=compute.core_attention,
        fused_kernels=fused,
        use_cpu_initialization=device_type() == "cpu",
        # megatron's backward needs a GPU for it (it allocates the placeholder gradient there).
        gradient_accumulation_fusion=fused and device_type() == "cuda",
    )
