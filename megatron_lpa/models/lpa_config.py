"""The one model config: megatron-core's TransformerConfig plus LPA ranks and GPT-level fields."""

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lpa.layers.low_rank_linear import LPA_INIT_METHODS, check_lpa_rank
from megatron_lpa.platform import megatron_patches

CORE_ATTENTION = ("sdpa", "local")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
SUBLAYER_NORMS = ("input", "output")
INIT_STYLES = ("megatron", "pytorch")


@dataclass
class LPAConfig(TransformerConfig):
    """Everything ``build_model`` needs: the four variants and both architecture families.

    Variants: dense (both ranks 0), LPA (``lpa_attn_rank``), low-rank FFN only (``lpa_ffn_rank``),
    low-rank everywhere (both). LLaMA-style: ``normalization="RMSNorm"``, ``gated_linear_unit=True``
    with SiLU, ``position_embedding_type="rope"``, ``add_bias_linear=False``. GPT-style:
    ``LayerNorm``, ``learned_absolute`` positions, GELU or ReLU, biases.
    """

    lpa_attn_rank: int = 0
    """Rank r of every attention projection (Q, K, V, O each get their own B(Ax)); 0 keeps it
    dense."""

    lpa_ffn_rank: int = 0
    """Rank of every FFN projection (fc1 / gate and up, fc2); 0 keeps the FFN dense."""

    lpa_init: Optional[str] = None
    """Factor initialisation, one of ``LPA_INIT_METHODS`` (see ``low_rank_linear``). By default
    ``variance`` under megatron's init (so that ``B @ A`` starts like the dense weight it replaces
    and a dense-vs-LPA comparison compares like with like) and ``linear`` under PyTorch's."""

    init_style: str = "megatron"
    """``megatron``: megatron-core's init (weights N(0, ``init_method_std``), output projections
    scaled by 1/sqrt(2 * layers), biases 0, embeddings N(0, ``init_method_std``)). ``pytorch``:
    every tensor as PyTorch's modules initialise it, as the paper's code (plain ``nn.Module``s)
    does: embeddings N(0, 1), every linear's weight and bias, dense and low-rank alike,
    U(+-1/sqrt(fan_in)), norms 1 and 0 (``models/pytorch_init.py``)."""

    init_seed: int = 1234
    """Seed of the ``pytorch`` init: each tensor is drawn whole from (seed, its name), so the
    weights are the same at every TP and PP size."""

    sublayer_norm: str = "input"
    """``input``: pre-norm, each sublayer's input normalised, plus a final norm (megatron, LLaMA,
    the paper's setting 2). ``output``: each sublayer's output normalised inside its residual
    branch,
    ``x + Dropout(Norm(f(x)))``, no final norm (the paper's GPT-style setting 1)."""

    output_layer_bias: bool = False
    """A bias on the output layer (vocabulary-parallel like its weight); the paper's head has
    one."""

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
    """``sdpa`` (flash/cuDNN through PyTorch SDPA) or ``local`` (megatron's, materialises
    scores)."""

    cuda_graph_scope: list = field(default_factory=list)
    """megatron's per-layer CUDA-graph scope, unused here (``--cuda-graph`` captures the whole
    step); megatron's own default, "full", is deprecated and warns each time a config is made."""

    fused_kernels: bool = True
    """Cross-entropy, RoPE and SwiGLU through ``megatron_lpa.ops`` (the ``csrc/`` CUDA kernels when
    built, PyTorch fallbacks otherwise); False runs megatron-core's unfused paths."""

    def __post_init__(self):
        if self.fused_kernels:
            if self.position_embedding_type == "rope":
                # megatron's own check (in super().__post_init__) needs the hook filled.
                megatron_patches.require("fused RoPE (LPAConfig(fused_kernels=True))")
                self.apply_rope_fusion = True
            # megatron's MLP builds the spec's activation module (our SwiGLU) only with this switch.
            self.use_te_activation_func = self.fused_swiglu
        if self.gradient_accumulation_fusion:
            megatron_patches.require("gradient_accumulation_fusion")
        super().__post_init__()
        self.lpa_init = resolve_lpa_init(self.init_style, self.lpa_init)
        choices = {
            "lpa_init": LPA_INIT_METHODS,
            "core_attention": CORE_ATTENTION,
            "position_embedding_type": POSITION_EMBEDDINGS,
            "sublayer_norm": SUBLAYER_NORMS,
            "init_style": INIT_STYLES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_ranks(
            self.lpa_attn_rank,
            self.lpa_ffn_rank,
            self.hidden_size,
            self.num_attention_heads,
            self.num_query_groups,
            self.kv_channels,
            self.ffn_hidden_size,
        )
        if self.lpa_attn_rank > 0:
            check_attention_split(self.num_query_groups, self.tensor_model_parallel_size)
        if self.lpa_attn_rank > 0 and self.attention_output_gate:
            raise ValueError(
                "LPA attention has no low-rank form of the attention output gate; "
                "turn the gate off or keep attention dense (lpa_attn_rank=0)."
            )

    @property
    def fused_swiglu(self) -> bool:
        """Whether the MLP's SwiGLU runs as one fused activation module."""
        return self.fused_kernels and self.gated_linear_unit and self.activation_func is F.silu

    @property
    def variant(self) -> str:
        """``dense``, ``lpa``, ``lowrank_ffn`` or ``lowrank_all``."""
        return {
            (False, False): "dense",
            (True, False): "lpa",
            (False, True): "lowrank_ffn",
            (True, True): "lowrank_all",
        }[(self.lpa_attn_rank > 0, self.lpa_ffn_rank > 0)]


def resolve_lpa_init(init_style: str, lpa_init: Optional[str]) -> str:
    """The factor init ``lpa_init`` names, or the default of ``init_style`` when it is None."""
    if lpa_init is None:
        return "variance" if init_style == "megatron" else "linear"
    if init_style == "pytorch" and lpa_init != "linear":
        raise ValueError(
            f"--lpa-init {lpa_init} matches megatron's init; --init-style pytorch "
            "initialises the factors like nn.Linear. Drop --lpa-init or use --init-style megatron."
        )
    return lpa_init


def check_ranks(
    attn_rank: int, ffn_rank: int, hidden: int, heads: int, groups: int, head_dim: int, ffn: int
) -> None:
    """Each rank is 0 (dense) or fits every projection it replaces (``check_lpa_rank``)."""
    projections = {
        "attention (--lpa-attn-rank)": (
            attn_rank,
            {
                "query": (hidden, heads * head_dim),
                "key/value": (hidden, groups * head_dim),
                "output": (heads * head_dim, hidden),
            },
        ),
        "FFN (--lpa-ffn-rank)": (ffn_rank, {"fc1": (hidden, ffn), "fc2": (ffn, hidden)}),
    }
    for what, (rank, shapes) in projections.items():
        if rank < 0:
            raise ValueError(f"the {what} rank is {rank}; use 0 (dense) or a rank >= 1.")
        with warnings.catch_warnings():  # ranks that save nothing: the layers warn when built
            warnings.simplefilter("ignore")
            for name, (fan_in, fan_out) in shapes.items() if rank else ():
                check_lpa_rank(rank, fan_in, fan_out, f"{what} {name}")


def check_attention_split(groups: int, tp: int) -> None:
    """LPA attention needs whole query groups per tensor-parallel rank.

    megatron-core replicates query groups over TP ranks when there are fewer groups than ranks
    and gathers them from its fused QKV layout; LPA hands Q, K and V to attention per rank and
    cannot be laid out that way. (Dense attention takes megatron's path.)
    """
    if groups % tp:
        raise ValueError(
            f"LPA attention needs whole query groups on each tensor-parallel rank, but "
            f"{groups} query group(s) do not split over TP={tp}: use a TP size <= {groups} "
            "that divides them (--tensor-model-parallel-size) or more query groups "
            "(--num-query-groups)."
        )
