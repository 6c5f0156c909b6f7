"""The one model config: megatron-core's TransformerConfig plus LPA ranks and GPT-level fields."""

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lpa.layers.low_rank_linear import LPA_INIT_METHODS
from megatron_lpa.ops.rope import install_megatron_rope_hook
from megatron_lpa.ops.wgrad_accumulation import install_megatron_wgrad_hook

CORE_ATTENTION = ("sdpa", "local")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")


@dataclass
class LPAConfig(TransformerConfig):
    """Everything ``build_model`` needs: the four variants and both architecture families.

    Variants: dense (both ranks 0), LPA (``lpa_attn_rank``), low-rank FFN only (``lpa_ffn_rank``),
    low-rank everywhere (both). LLaMA-style: ``normalization="RMSNorm"``, ``gated_linear_unit=True``
    with SiLU, ``position_embedding_type="rope"``, ``add_bias_linear=False``. GPT-style: ``LayerNorm``,
    ``learned_absolute`` positions, GELU or ReLU, biases.
    """

    lpa_attn_rank: int = 0
    """Rank r of every attention projection (Q, K, V, O each get their own B(Ax)); 0 keeps it dense."""

    lpa_ffn_rank: int = 0
    """Rank of every FFN projection (fc1 / gate and up, fc2); 0 keeps the FFN dense."""

    lpa_init: str = "linear"
    """Factor initialisation, one of ``LPA_INIT_METHODS`` (see ``low_rank_linear``)."""

    vocab_size: int = 32000
    """Embedding rows (already padded for TP by the caller)."""

    max_sequence_length: int = 2048
    """Longest sequence; the size of the learned position table."""

    position_embedding_type: str = "rope"
    """``rope`` or ``learned_absolute``."""

    rotary_base: int = 10000
    """RoPE base frequency."""

    share_embeddings_and_output_weights: bool = False
    """Tie the output head to the input embedding (the paper's models are untied)."""

    core_attention: str = "sdpa"
    """``sdpa`` (flash/cuDNN through PyTorch SDPA) or ``local`` (megatron's, materialises scores)."""

    fused_kernels: bool = True
    """Cross-entropy, RoPE and SwiGLU through ``megatron_lpa.ops`` (the ``csrc/`` CUDA kernels when
    built, PyTorch fallbacks otherwise); False runs megatron-core's unfused paths."""

    def __post_init__(self):
        if self.fused_kernels:
            if self.position_embedding_type == "rope":
                # Before megatron's checks, which require the hook to be filled.
                install_megatron_rope_hook()
                self.apply_rope_fusion = True
            # megatron's MLP builds the spec's activation module (our SwiGLU) only with this switch.
            self.use_te_activation_func = self.fused_swiglu
        if self.gradient_accumulation_fusion:
            install_megatron_wgrad_hook()  # megatron's linears check for it when they are built
        super().__post_init__()
        for name in ("lpa_attn_rank", "lpa_ffn_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is {getattr(self, name)}; use 0 (dense) or a rank >= 1.")
        choices = {"lpa_init": LPA_INIT_METHODS, "core_attention": CORE_ATTENTION,
                   "position_embedding_type": POSITION_EMBEDDINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def fused_swiglu(self) -> bool:
        """Whether the MLP's SwiGLU runs as one fused activation module."""
        return self.fused_kernels and self.gated_linear_unit and self.activation_func is F.silu

    @property
    def variant(self) -> str:
        """``dense``, ``lpa``, ``lowrank_ffn`` or ``lowrank_all``."""
        return {(False, False): "dense", (True, False): "lpa", (False, True): "lowrank_ffn",
                (True, True): "lowrank_all"}[(self.lpa_attn_rank > 0, self.lpa_ffn_rank > 0)]
