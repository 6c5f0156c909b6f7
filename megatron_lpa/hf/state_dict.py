"""Our model's full state dict <-> the Hugging Face names of ``modeling_lpa.py``, and the two
transforms between dense and low-rank projections on the Hugging Face side.

Ours is the TP=1, PP=1 ``named_parameters()`` of ``LPAGPTModel`` (megatron-core's names, the
low-rank layers' ``down_*``/``up_*``). The Hugging Face side is ``modeling_lpa.py``'s; its dense
names are ``LlamaForCausalLM``'s, so a dense (or merged) LLaMA-style state dict is a Llama one.

* megatron's dense ``linear_qkv.weight`` ``[(h + 2g) * hd, d]`` interleaves the heads per query
  group, ``[q heads of group 0, k_0, v_0, q heads of group 1, ...]``; SwiGLU's dense
  ``linear_fc1.weight`` is ``[gate; up]``; a low-rank column slot stacks its A's
  (``down_weight [P*r, d]``, ``down_bias [P*r]``) and keeps one B per projection.
* Vocabulary rows: ours are padded for tensor parallelism; ``to_hf`` keeps the tokenizer's rows,
  ``from_hf`` pads with zero rows.
"""

import torch

from megatron_lpa.models.lpa_config import LPAConfig

_ATTENTION = ("q", "k", "v")


def _column_parts(config: LPAConfig, slot: str) -> list:
    """(Hugging Face projection, our up-projection suffix) of a column slot, in our order."""
    if slot == "linear_qkv":
        return [(f"self_attn.{p}_proj", p) for p in _ATTENTION]
    if config.gated_linear_unit:
        return [("mlp.gate_proj", "gate"), ("mlp.up_proj", "up")]
    return [("mlp.up_proj", "")]


def _row_projection(slot: str) -> str:
    return "self_attn.o_proj" if slot == "linear_proj" else "mlp.down_proj"


def _layer_slots(config: LPAConfig, i: int) -> list:
    """(slot, our prefix, rank, whether it is a column slot) of each linear of layer ``i``."""
    p = f"decoder.layers.{i}"
    row_suffix = ".linear" if config.sublayer_norm == "output" else ""
    return [
        ("linear_qkv", f"{p}.self_attention.linear_qkv", config.lpa_attn_rank, True),
        ("linear_proj", f"{p}.self_attention.linear_proj{row_suffix}", config.lpa_attn_rank, False),
        ("linear_fc1", f"{p}.mlp.linear_fc1", config.lpa_ffn_rank, True),
        ("linear_fc2", f"{p}.mlp.linear_fc2{row_suffix}", config.lpa_ffn_rank, False),
    ]


def _norm_names(config: LPAConfig, i: int) -> dict:
    """Our norm prefix -> the Hugging Face one, for layer ``i``."""
    ours, hf = f"decoder.layers.{i}", f"model.layers.{i}"
    if config.sublayer_norm == "input":
        return {
            f"{ours}.input_layernorm": f"{hf}.input_layernorm",
            f"{ours}.pre_mlp_layernorm": f"{hf}.post_attention_layernorm",
        }
    return {
        f"{ours}.self_attention.linear_proj.norm": f"{hf}.attn_output_layernorm",
        f"{ours}.mlp.linear_fc2.norm": f"{hf}.mlp_output_layernorm",
    }


def _qkv_split(config: LPAConfig, fused: torch.Tensor) -> list:
    """megatron's per-group interleaved ``[(h + 2g) * hd, ...]`` -> ``[q, k, v]``."""
    heads, groups = (
        config.num_attention_heads,
        config.num_query_groups or config.num_attention_heads,
    )
    per_group = fused.reshape(groups, heads // groups + 2, config.kv_channels, *fused.shape[1:])
    q = per_group[:, : heads // groups].reshape(heads * config.kv_channels, *fused.shape[1:])
    return [q, per_group[:, -2].flatten(0, 1), per_group[:, -1].flatten(0, 1)]


def _qkv_join(config: LPAConfig, q, k, v) -> torch.Tensor:
    heads, groups = (
        config.num_attention_heads,
        config.num_query_groups or config.num_attention_heads,
    )
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups, config.kv_channels, *rest)
    k, v = (t.reshape(groups, 1, config.kv_channels, *rest) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_column(config, slot: str, tensor: torch.Tensor) -> list:
    return (
        _qkv_split(config, tensor)
        if slot == "linear_qkv"
        else list(tensor.chunk(2 if config.gated_linear_unit else 1))
    )


def _join_column(config, slot: str, parts: list) -> torch.Tensor:
    return _qkv_join(config, *parts) if slot == "linear_qkv" else torch.cat(parts)


# Tensors with a vocabulary row per token: cut to the tokenizer's rows, or padded back.
_VOCABULARY_ROWS = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("output_layer.weight", "lm_head.weight"),
    ("output_layer.bias", "output_bias"),
]


def _renames(config: LPAConfig) -> list:
    """(our name, Hugging Face name) of every tensor that maps one to one, optional ones (biases,
    positions) included: all but the column slots' and the vocabulary rows."""
    pairs = [
        ("embedding.position_embeddings.weight", "model.embed_positions.weight"),
        ("decoder.final_layernorm.weight", "model.norm.weight"),
        ("decoder.final_layernorm.bias", "model.norm.bias"),
    ]
    for i in range(config.num_layers):
        for ours_norm, hf_norm in _norm_names(config, i).items():
            pairs += [
                (f"{ours_norm}.{field}", f"{hf_norm}.{field}") for field in ("weight", "bias")
            ]
        for slot, prefix, rank, column in _layer_slots(config, i):
            if column:
                continue
            name = f"model.layers.{i}.{_row_projection(slot)}"
            if rank == 0:
                pairs += [
                    (f"{prefix}.weight", f"{name}.weight"),
                    (f"{prefix}.bias", f"{name}.bias"),
                ]
            else:
                pairs += [
                    (f"{prefix}.down_weight", f"{name}.A.weight"),
                    (f"{prefix}.up_weight", f"{name}.B.weight"),
                    (f"{prefix}.bias", f"{name}.B.bias"),
                ]
    return pairs


def _column_slots(config: LPAConfig):
    """(slot, our prefix, rank, Hugging Face layer prefix) of every column-parallel projection."""
    for i in range(config.num_layers):
        for slot, prefix, rank, column in _layer_slots(config, i):
            if column:
                yield slot, prefix, rank, f"model.layers.{i}"


def _translate(
    tensors: dict, config: LPAConfig, into_hf: bool, vocabulary, column, unplaced: str
) -> dict:
    """The walk ``to_hf`` and ``from_hf`` share (``into_hf`` says which way): the vocabulary rows
    through ``vocabulary(rows)``, the one-to-one names, then each column slot through
    ``column(config, slot, rank, prefix, layer, left, out)``, which pops what it takes from
    ``left``. Raises ``KeyError`` with ``unplaced`` and what is left over."""

    def directed(pairs):
        return pairs if into_hf else [(hf_name, ours_name) for ours_name, hf_name in pairs]

    out, left = {}, dict(tensors)
    for source, target in directed(_VOCABULARY_ROWS):
        if source in left:
            out[target] = vocabulary(left.pop(source))
    for source, target in directed(_renames(config)):
        if source in left:
            out[target] = left.pop(source)
    for slot, prefix, rank, layer in _column_slots(config):
        column(config, slot, rank, prefix, layer, left, out)
    if left:
        raise KeyError(f"{unplaced}: {sorted(left)}")
    return out


def to_hf(ours: dict, config: LPAConfig, vocab_size: int) -> dict:
    """Our full state dict -> ``modeling_lpa.py``'s, the vocabulary cut to ``vocab_size`` rows.

    Raises ``KeyError`` naming any tensor of ours that found no place.
    """
    return _translate(
        ours,
        config,
        True,
        lambda rows: rows[:vocab_size],
        _column_to_hf,
        "tensors with no Hugging Face name",
    )


def _column_to_hf(config, slot, rank, prefix, layer, left, hf) -> None:
    take = left.pop
    parts = _column_parts(config, slot)
    if rank == 0:
        weights = _split_column(config, slot, take(f"{prefix}.weight"))
        biases = (
            _split_column(config, slot, take(f"{prefix}.bias"))
            if f"{prefix}.bias" in left
            else [None] * len(parts)
        )
        for (name, _), weight, bias in zip(parts, weights, biases):
            hf[f"{layer}.{name}.weight"] = weight
            if bias is not None:
                hf[f"{layer}.{name}.bias"] = bias
        return
    downs = take(f"{prefix}.down_weight").chunk(len(parts))
    down_biases = (
        take(f"{prefix}.down_bias").chunk(len(parts))
        if f"{prefix}.down_bias" in left
        else [None] * len(parts)
    )
    for (name, suffix), down, down_bias in zip(parts, downs, down_biases):
        hf[f"{layer}.{name}.A.weight"] = down
        if down_bias is not None:
            hf[f"{layer}.{name}.A.bias"] = down_bias
        hf[f"{layer}.{name}.B.weight"] = take(
            f"{prefix}.up_weight_{suffix}" if suffix else f"{prefix}.up_weight"
        )


def from_hf(hf: dict, config: LPAConfig) -> dict:
    """``modeling_lpa.py``'s state dict -> our full one for ``config`` (vocabulary padded to
    ``config.vocab_size`` with zero rows). The inverse of ``to_hf`` up to those rows.

    Raises ``KeyError`` naming any Hugging Face tensor that found no place.
    """

    def padded(rows: torch.Tensor) -> torch.Tensor:
        pad = config.vocab_size - rows.shape[0]
        return torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])]) if pad else rows

    return _translate(
        hf,
        config,
        False,
        padded,
        _column_from_hf,
        "Hugging Face tensors with no place in our model",
    )


def _column_from_hf(config, slot, rank, prefix, layer, left, ours) -> None:
    take = left.pop
    names = [f"{layer}.{name}" for name, _ in _column_parts(config, slot)]
    if rank == 0:
        ours[f"{prefix}.weight"] = _join_column(config, slot, [take(f"{n}.weight") for n in names])
        if f"{names[0]}.bias" in left:
            ours[f"{prefix}.bias"] = _join_column(config, slot, [take(f"{n}.bias") for n in names])
        return
    ours[f"{prefix}.down_weight"] = torch.cat([take(f"{n}.A.weight") for n in names])
    if f"{names[0]}.A.bias" in left:
        ours[f"{prefix}.down_bias"] = torch.cat([take(f"{n}.A.bias") for n in names])
    for n, (_, suffix) in zip(names, _column_parts(config, slot)):
        ours[f"{prefix}.up_weight_{suffix}" if suffix else f"{prefix}.up_weight"] = take(
            f"{n}.B.weight"
        )


def merge_low_rank(hf: dict) -> dict:
    """Each low-rank pair folded into one dense projection, in fp32 then the pair's dtype:
    ``W = B A`` and ``bias = B c + b`` (``c`` A's bias, ``b`` B's)."""
    merged = {}
    for key, tensor in hf.items():
        if ".A." in key or ".B." in key:
            continue
        merged[key] = tensor
    for key in hf:
        if not key.endswith(".A.weight"):
            continue
        name = key[: -len(".A.weight")]
        down, up = hf[key], hf[f"{name}.B.weight"]
        merged[f"{name}.weight"] = (up.float() @ down.float()).to(up.dtype)
        bias = None
        if f"{name}.A.bias" in hf:
            bias = up.float() @ hf[f"{name}.A.bias"].float()
        if f"{name}.B.bias" in hf:
            bias = hf[f"{name}.B.bias"].float() + (bias if bias is not None else 0)
        if bias is not None:
            merged[f"{name}.bias"] = bias.to(up.dtype)
    return merged


def factorize(weight: torch.Tensor, rank: int) -> tuple:
    """``(A [r, in], B [out, r])`` with ``B A`` the best rank-r approximation of ``weight [out,
    in]``
    (truncated SVD, Eckart-Young), each factor taking the square root of the singular values."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return (
        (root[:, None] * vh[:rank]).to(weight.dtype),
        (u[:, :rank] * root[None, :]).to(weight.dtype),
    )


def factorize_projections(hf: dict, attn_rank: int, ffn_rank: int) -> dict:
    """A dense (Llama-named, bias-free) state dict with every attention projection factored at
    ``attn_rank`` and every FFN projection at ``ffn_rank`` (0 leaves them dense)."""
    out = {}
    for key, tensor in hf.items():
        rank = attn_rank if ".self_attn." in key else ffn_rank if ".mlp." in key else 0
        if rank == 0 or not key.endswith("_proj.weight"):
            out[key] = tensor
            continue
        name = key[: -len(".weight")]
        out[f"{name}.A.weight"], out[f"{name}.B.weight"] = factorize(tensor, rank)
    return out
