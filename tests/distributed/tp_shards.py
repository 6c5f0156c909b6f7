"""A TP rank's weights cut from the full (TP=1) state dict by rule, independently of the layers.

The layers' own ``sharded_state_dict`` (which dist_checkpointing reshards with) and their
``partition_dim`` attributes are what this checks, so neither is read here. The rules are
megatron-core's documented layout plus the LPA table at the top of
``megatron_lpa/layers/low_rank_linear.py``:

* ``embedding.word_embeddings.weight``: dim 0 (vocab-parallel embedding);
* ``output_layer.weight`` / ``.bias``: dim 0 (vocab-parallel logits);
* dense column ``linear_qkv.weight`` / ``.bias``: dim 0; the fused rows are query-group major
  ([q heads of g, k_g, v_g] per group g), so a rank's groups are one contiguous block;
* dense column ``linear_fc1.weight`` / ``.bias``: dim 0; with SwiGLU the full tensor is [gate; up]
  and a rank holds [its gate rows; its up rows] (megatron's stride 2);
* dense row ``linear_proj.weight``, ``linear_fc2.weight``: dim 1;
* LPA column ``up_weight*`` (B of Q, K, V, gate, up): dim 0, each projection on its own;
* LPA column ``down_weight`` / ``down_bias`` (A): replicated;
* LPA row ``down_weight`` (A): dim 1;
* LPA row ``up_weight`` (B), row biases, norms, position embeddings: replicated.

Every key must match exactly one rule (an unknown parameter is an error, not silently replicated),
and ``_extra_state`` entries (per-layer metadata, not weights) are the only ones not cut.
"""

import re

import torch

_LAYER = r"decoder\.layers\.\d+\."
# Row slots may be wrapped with their output norm (the paper's GPT-style block): ``.linear.``.
_ROW = _LAYER + r"(self_attention\.linear_proj|mlp\.linear_fc2)(\.linear)?\."
_COLUMN = _LAYER + r"(self_attention\.linear_qkv|mlp\.linear_fc1)\."
_NORM = r"(layernorm|norm)\.(weight|bias)$"

# (pattern, how): how is "dim0", "dim1", "replicated" or "fc1" (dim 0, by halves with SwiGLU).
RULES = [
    (r"embedding\.word_embeddings\.weight$", "dim0"),
    (r"embedding\.position_embeddings\.weight$", "replicated"),
    (r"output_layer\.(weight|bias)$", "dim0"),
    (_LAYER + r"self_attention\.linear_qkv\.(weight|bias)$", "dim0"),
    (_LAYER + r"mlp\.linear_fc1\.(weight|bias)$", "fc1"),
    (_ROW + r"weight$", "dim1"),
    (_ROW + r"bias$", "replicated"),
    (_COLUMN + r"up_weight(_q|_k|_v|_gate|_up)?$", "dim0"),
    (_COLUMN + r"down_(weight|bias)$", "replicated"),
    (_ROW + r"down_weight$", "dim1"),
    (_ROW + r"up_weight$", "replicated"),
    (_LAYER + r"\w*" + _NORM, "replicated"),  # input_layernorm, pre_mlp_layernorm
    (_ROW + _NORM, "replicated"),  # the output norm of a wrapped row slot
    (r"decoder\.final_" + _NORM, "replicated"),
]
EXTRA_STATE = re.compile(
    r"(" + _LAYER + r"(self_attention\.linear_(qkv|proj)|mlp\.linear_fc[12])(\.linear)?"
    r"|output_layer)\._extra_state$"
)


def rule(key: str, gated: bool) -> str:
    matches = [how for pattern, how in RULES if re.search(r"(^|\.)" + pattern, key)]
    assert len(matches) == 1, f"{key}: {len(matches)} sharding rules match ({matches})"
    how = matches[0]
    if how == "fc1":
        return "gated_dim0" if gated else "dim0"
    return how


def cut(key: str, full: torch.Tensor, tp_rank: int, tp_size: int, gated: bool) -> torch.Tensor:
    """This rank's shard of ``full`` (a TP=1 tensor of ``key``)."""
    how = rule(key, gated)
    if how == "replicated":
        return full.clone()
    if how == "gated_dim0":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    dim = {"dim0": 0, "dim1": 1}[how]
    assert full.shape[dim] % tp_size == 0, f"{key}: {tuple(full.shape)} does not split by {tp_size}"
    return full.chunk(tp_size, dim=dim)[tp_rank].clone()


def rank_state_dict(full: dict, own: dict, tp_rank: int, tp_size: int, gated: bool):
    """The state dict for this rank: every tensor of ``full`` cut by rule; the ``_extra_state``
    entries are this model's own (``own``: its ``state_dict()``). Returns (state, extra keys)."""
    assert set(full) == set(own), (
        f"keys only at TP=1: {sorted(set(full) - set(own))}; "
        f"only at TP={tp_size}: {sorted(set(own) - set(full))}"
    )
    state, extra = {}, []
    for key, value in full.items():
        if key.endswith("._extra_state"):
            extra.append(key)
            state[key] = own[key]
        else:
            state[key] = cut(key, value, tp_rank, tp_size, gated)
    return state, extra
