"""The one model config: megatron-core's TransformerConfig plus LPA ranks and GPT-level fields."""

from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lpa.layers.low_rank_linear import LPA_INIT_METHODS
from megatron_lpa.ops.rope import install_megatron_rope_hook
from megatron_lpa.ops.wgrad_accumulation import install_megatron_wgrad_hook

CORE_ATTENTION = ("sdpa", "local")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
SUBLAYER_NORMS = ("input", "output")
INIT_STYLES = ("megatron", "pytorch")


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

    lpa_init: Optional[str] = None
    """Factor initialisation, one of ``LPA_INIT_METHODS`` (see ``low_rank_linear``). By default
    ``variance`` under megatron's init (so that ``B @ A`` starts like the dense weight it replaces
    and a dense-vs-LPA comparison compares like with like) and ``linear`` under PyTorch's."""

    init_style: str = "megatron"
    """``megatron``: megatron-core's init (weights N(0, ``init_method_std``), output projections
    scaled by 1/sqrt(2 * layers), biases 0, embeddings N(0, ``init_method_std``)). ``pytorch``: every
    tensor as PyTorch's modules initialise it, as the paper's code (plain ``nn.Module``s) does:
    embeddings N(0, 1), every linear's weight and bias, dense and low-rank alike,
    U(+-1/sqrt(fan_in)), norms 1 and 0 (``models/pytorch_init.py``)."""

    init_seed: int = 1234
    """Seed of the ``pytorch`` init: each tensor is drawn whole from (seed, its name), so the
    weights are the same at every TP and PP size."""

    sublayer_norm: str = "input"
    """``input``: pre-norm, each sublayer's input normalised, plus a final norm (megatron, LLaMA,
    the paper's setting 2). ``output``: each sublayer's output normalised inside its residual branch,
    ``x + Dropout(Norm(f(x)))``, no final norm (the paper's GPT-style setting 1)."""

    output_layer_bias: bool = False
    """A bias on the output layer (vocabulary-parallel like its weight); the paper's head has one."""

    embedding_dropout: Optional[float] = None
    """Dropout on the embedding output; None keeps megatron's, which is ``hidden_dropout``."""

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

    cuda_graph_scope: list = field(default_factory=list)
    """megatron's per-layer CUDA-graph scope, unused here (``--cuda-graph`` captures the whole
    step); megatron's own default, "full", is deprecated and warns each time a config is made."""

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
        if self.lpa_init is None:
            self.lpa_init = "variance" if self.init_style == "megatron" else "linear"
        choices = {"lpa_init": LPA_INIT_METHODS, "core_attention": CORE_ATTENTION,
                   "position_embedding_type": POSITION_EMBEDDINGS,
                   "sublayer_norm": SUBLAYER_NORMS, "init_style": INIT_STYLES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.init_style == "pytorch" and self.lpa_init != "linear":
            raise ValueError("init_style='pytorch' initialises the LPA factors like nn.Linear "
                             f"(lpa_init='linear'); lpa_init={self.lpa_init!r} is for megatron's "
                             "init: drop it or use init_style='megatron'.")
        if self.lpa_attn_rank > 0:
            self._check_lpa_attention()

    def _check_lpa_attention(self) -> None:
        """LPA hands Q, K and V to attention per TP rank; that needs whole query groups per rank."""
        groups = self.num_query_groups or self.num_attention_heads
        if groups < self.tensor_model_parallel_size:
            raise ValueError(
                f"LPA attention needs at least one whole query group per tensor-parallel rank, but "
                f"{groups} query group(s) are split over TP={self.tensor_model_parallel_size}: use "
                f"a TP size <= {groups} (--tensor-model-parallel-size) or more query groups "
                "(--num-query-groups).")
        if self.attention_output_gate:
            raise ValueError("LPA attention has no low-rank form of the attention output gate; "
                             "turn the gate off or keep attention dense (lpa_attn_rank=0).")

    @property
    def fused_swiglu(self) -> bool:
        """Whether the MLP's SwiGLU runs as one fused activation module."""
        return self.fused_kernels and self.gated_linear_unit and self.activation_func is F.silu

    @property
    def variant(self) -> str:
        """``dense``, ``lpa``, ``lowrank_ffn`` or ``lowrank_all``."""
        return {(False, False): "dense", (True, False): "lpa", (False, True): "lowrank_ffn",
                (True, True): "lowrank_all"}[(self.lpa_attn_rank > 0, self.lpa_ffn_rank > 0)]
