"""LPA language models for Hugging Face ``transformers``, computing what megatron_lpa trains.

Written into every factored export (``tools/export_hf.py --format factored``) with
``configuration_lpa.py``; load it with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. Plain PyTorch and
``transformers``; nothing of megatron_lpa or megatron-core.

A low-rank projection keeps its two factors, ``y = B(A x + c) + b`` (``A: in -> r``,
``B: r -> out``; ``c`` on Q/K/V and FFN-input projections, ``b`` on output projections, each only
with ``config.bias``), so inference keeps LPA's savings. Parameter names (``L`` a layer)::

    model.embed_tokens.weight [vocab, d]     model.embed_positions.weight [max_pos, d] (learned)
    model.layers.L.self_attn.{q,k,v,o}_proj  model.layers.L.mlp.{gate,up,down}_proj (gate: SwiGLU)
        dense: .weight [out, in], .bias [out]
        low-rank: .A.weight [r, in], .A.bias [r], .B.weight [out, r], .B.bias [out]
    model.layers.L.input_layernorm, .post_attention_layernorm, model.norm   (sublayer_norm input)
    model.layers.L.attn_output_layernorm, .mlp_output_layernorm             (sublayer_norm output)
    lm_head.weight [vocab, d] (untied), output_bias [vocab] (output_layer_bias)

Layout ``[batch, seq, channels]``. Grouped-query attention repeats each key/value head for the
``heads / groups`` consecutive query heads of its group. RoPE rotates channel ``i`` with channel
``i + head_dim/2``. Generation keeps keys and values in a ``transformers`` cache.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lpa import LpaConfig

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# transformers renamed the cache argument and output field from past_key_values to cache (5.x).
CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class LowRankLinear(nn.Module):
    """``y = B(A x)``: ``A: in -> r`` and ``B: r -> out``, each an ``nn.Linear`` with or without
    its bias."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias_on_a: bool, bias_on_b: bool
    ):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=bias_on_a)
        self.B = nn.Linear(rank, out_features, bias=bias_on_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def projection(
    in_features: int, out_features: int, rank: int, bias: bool, bias_on_a: bool
) -> nn.Module:
    """``nn.Linear`` for rank 0, else a ``LowRankLinear`` with the bias on A (``bias_on_a``) or
    B."""
    if rank == 0:
        return nn.Linear(in_features, out_features, bias=bias)
    return LowRankLinear(
        in_features, out_features, rank, bias and bias_on_a, bias and not bias_on_a
    )


class LpaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden_size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def norm(config: LpaConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return LpaRMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def rotary_cos_sin(config: LpaConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin ``[b, 1, s, head_dim]`` of the RoPE angles ``position / theta^(2i/head_dim)``."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    )
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class LpaAttention(nn.Module):
    def __init__(self, config: LpaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rope = config.head_dim, config.position_embedding_type == "rope"
        q_width, kv_width = self.heads * self.head_dim, self.groups * self.head_dim
        d, r, bias = config.hidden_size, config.lpa_attn_rank, config.bias
        self.q_proj = projection(d, q_width, r, bias, bias_on_a=True)
        self.k_proj = projection(d, kv_width, r, bias, bias_on_a=True)
        self.v_proj = projection(d, kv_width, r, bias, bias_on_a=True)
        self.o_proj = projection(q_width, d, r, bias, bias_on_a=False)

    def forward(self, x, rotary, mask, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        repeat = self.heads // self.groups
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class LpaMLP(nn.Module):
    def __init__(self, config: LpaConfig):
        super().__init__()
        d, f, r, bias = (
            config.hidden_size,
            config.intermediate_size,
            config.lpa_ffn_rank,
            config.bias,
        )
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = projection(d, f, r, bias, bias_on_a=True) if config.gated_mlp else None
        self.up_proj = projection(d, f, r, bias, bias_on_a=True)
        self.down_proj = projection(f, d, r, bias, bias_on_a=False)

    def forward(self, x):
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class LpaDecoderLayer(nn.Module):
    def __init__(self, config: LpaConfig, layer_idx: int):
        super().__init__()
        self.self_attn, self.mlp = LpaAttention(config, layer_idx), LpaMLP(config)
        self.pre_norm = config.sublayer_norm == "input"
        if self.pre_norm:
            self.input_layernorm, self.post_attention_layernorm = norm(config), norm(config)
        else:
            self.attn_output_layernorm, self.mlp_output_layernorm = norm(config), norm(config)

    def forward(self, x, rotary, mask, cache):
        if self.pre_norm:
            x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.attn_output_layernorm(self.self_attn(x, rotary, mask, cache))
        return x + self.mlp_output_layernorm(self.mlp(x))


class LpaPreTrainedModel(PreTrainedModel):
    config_class = LpaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LpaDecoderLayer"]


class LpaModel(LpaPreTrainedModel):
    """Embeddings, decoder layers and (pre-norm) the final norm: hidden states ``[b, s, d]``."""

    def __init__(self, config: LpaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            LpaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = norm(config) if config.sublayer_norm == "input" else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """``input_ids [b, s]``, the ones after the ``cache``'s ``past`` tokens;
        ``attention_mask [b, past + s]`` (1 = a real token, 0 = padding) or None."""
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=input_ids.device).expand(b, s)
        x = self.embed_tokens(input_ids)
        rotary = None
        if self.config.position_embedding_type == "learned_absolute":
            x = x + self.embed_positions(position_ids)
        else:
            rotary = rotary_cos_sin(self.config, position_ids, x.dtype)
        mask = self._mask(attention_mask, b, s, past, x.device)
        for layer in self.layers:
            x = layer(x, rotary, mask, cache)
        return self.norm(x) if self.norm is not None else x

    @staticmethod
    def _mask(attention_mask, b: int, s: int, past: int, device) -> torch.Tensor:
        """``[b, 1, s, past + s]``, True where a query may attend: causal, not to padding, and
        always to itself (so a padding query's row is not empty)."""
        queries = torch.arange(past, past + s, device=device)[:, None]
        keys = torch.arange(past + s, device=device)[None, :]
        allowed = (keys <= queries)[None, None].expand(b, 1, s, past + s)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            allowed = allowed | (keys == queries)[None, None]
        return allowed


class LpaForCausalLM(LpaPreTrainedModel, GenerationMixin):
    """``LpaModel`` and the output layer: logits ``[b, s, vocab]``. Tied to the input embedding
    when ``config.tie_word_embeddings`` (then there is no ``lm_head``)."""

    def __init__(self, config: LpaConfig):
        super().__init__(config)
        self.model = LpaModel(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.output_bias = (
            nn.Parameter(torch.zeros(config.vocab_size)) if config.output_layer_bias else None
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """Logits of ``input_ids [b, s]`` (the last ``logits_to_keep`` positions if > 0) and, with
        ``labels [b, s]``, the mean next-token loss (-100 ignored)."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight, self.output_bias)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None}
        )
