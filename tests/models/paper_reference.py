"""The paper's two model settings in plain PyTorch, as the paper describes them, and a copy of our
weights into them by role.

Written for these tests from the paper's description (Lv et al., 2024, section 4 and appendix),
independently of megatron: every projection is an ``nn.Linear`` or, low-rank, two of them with
nothing in between, so each module's PyTorch defaults are the paper's initialisation.

* Setting 1, GPT-style: token + learned position embeddings; each block
  ``x = x + Dropout(LN(Attn(x)))``, ``x = x + Dropout(LN(FFN(x)))``; ReLU FFN; biases everywhere;
  no final norm; output head with a bias. A low-rank projection keeps the bias on its first factor
  when it feeds attention or the FFN's hidden layer, and on its second when it produces the
  residual-stream output.
* Setting 2, LLaMA-style: token embedding; pre-norm blocks with RMSNorm (eps 1e-6), RoPE, SwiGLU; no
  biases except the output head's; a final RMSNorm.

Layout here is ``[batch, seq, channels]``; ours is megatron's ``[seq, batch, channels]``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_MODULES = (nn.Embedding,)


@dataclass
class PaperShape:
    setting: int  # 1 (GPT-style) or 2 (LLaMA-style)
    vocab: int
    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    seq: int
    attn_rank: int = 0  # 0: dense attention projections
    ffn_rank: int = 0  # 0: dense FFN
    eps: float = 1e-6  # RMSNorm's (setting 2); LayerNorm keeps PyTorch's 1e-5


def projection(d_in: int, d_out: int, rank: int, bias: bool, bias_first: bool) -> nn.Module:
    """``nn.Linear(d_in, d_out)``, or for ``rank > 0`` the pair ``Linear(d_in, r)``, ``Linear(r,
    d_out)``
    with the bias (if any) on the first factor (``bias_first``) or the second."""
    if rank == 0:
        return nn.Linear(d_in, d_out, bias=bias)
    return nn.Sequential(
        nn.Linear(d_in, rank, bias=bias and bias_first),
        nn.Linear(rank, d_out, bias=bias and not bias_first),
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE on ``[b, h, s, hd]``: channel ``i`` pairs with ``i + hd/2``, angle
    ``pos / base^(2i/hd)``."""
    hd, seq = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    first, second = x[..., : hd // 2], x[..., hd // 2 :]
    return x * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


class Attention(nn.Module):
    def __init__(self, s: PaperShape):
        super().__init__()
        bias, width = s.setting == 1, s.heads * s.head_dim
        self.q, self.k, self.v = (
            projection(s.hidden, width, s.attn_rank, bias, True) for _ in range(3)
        )
        self.o = projection(width, s.hidden, s.attn_rank, bias, False)
        self.heads, self.rope = s.heads, s.setting == 2

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v)
        )
        if self.rope:
            q, k = rotate(q), rotate(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o((weights @ v).transpose(1, 2).reshape(b, t, -1))


class FFN(nn.Module):
    def __init__(self, s: PaperShape):
        super().__init__()
        self.gated = s.setting == 2
        bias = s.setting == 1
        self.up = projection(s.hidden, s.ffn, s.ffn_rank, bias, True)
        if self.gated:
            self.gate = projection(s.hidden, s.ffn, s.ffn_rank, bias, True)
        self.down = projection(s.ffn, s.hidden, s.ffn_rank, bias, False)

    def forward(self, x):
        hidden = F.silu(self.gate(x)) * self.up(x) if self.gated else F.relu(self.up(x))
        return self.down(hidden)


class Block(nn.Module):
    def __init__(self, s: PaperShape, dropout: float):
        super().__init__()
        self.setting = s.setting
        norm = (
            (lambda: nn.LayerNorm(s.hidden))
            if s.setting == 1
            else (lambda: RMSNorm(s.hidden, s.eps))
        )
        self.attn, self.ffn = Attention(s), FFN(s)
        self.norm1, self.norm2 = norm(), norm()
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x):
        if self.setting == 1:  # the sublayer's output is normalised, inside the residual branch
            x = x + self.drop1(self.norm1(self.attn(x)))
            return x + self.drop2(self.norm2(self.ffn(x)))
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PaperModel(nn.Module):
    """``forward(tokens [b, s]) -> logits [b, s, vocab]``."""

    def __init__(self, s: PaperShape, dropout: float = 0.0):
        super().__init__()
        self.shape = s
        self.tokens = nn.Embedding(s.vocab, s.hidden)
        self.positions = nn.Embedding(s.seq, s.hidden) if s.setting == 1 else None
        self.blocks = nn.ModuleList(Block(s, dropout) for _ in range(s.layers))
        self.final_norm = RMSNorm(s.hidden, s.eps) if s.setting == 2 else None
        self.head = nn.Linear(s.hidden, s.vocab)

    def forward(self, tokens):
        x = self.tokens(tokens)
        if self.positions is not None:
            x = x + self.positions(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x)


# ----- our weights, by role -------------------------------------------------------------------
def _pair_targets(module: nn.Module):
    """(first factor, second factor) of a low-rank projection, or (module, None) if dense."""
    return (module[0], module[1]) if isinstance(module, nn.Sequential) else (module, None)


def _copy(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if target.shape != source.shape:
        raise AssertionError(f"{name}: ours {tuple(source.shape)} vs paper {tuple(target.shape)}")
    target.data.copy_(source)


def load_ours(ref: PaperModel, ours: dict) -> None:
    """Copies the full (TP=1) state dict ``ours`` of our model into ``ref``; every tensor of ours
    must find its place and every tensor of ``ref`` must be filled."""
    s, used = ref.shape, set()

    def take(key):
        used.add(key)
        return ours[key]

    def put(target, key):
        _copy(target, take(key), key)

    def row(module, prefix):
        """A residual-stream output projection: dense, or a pair with its bias on B."""
        first, second = _pair_targets(module)
        if second is None:
            put(first.weight, f"{prefix}.weight")
        else:
            put(first.weight, f"{prefix}.down_weight")
            put(second.weight, f"{prefix}.up_weight")
        bias = (second or first).bias
        if bias is not None:
            put(bias, f"{prefix}.bias")

    put(ref.tokens.weight, "embedding.word_embeddings.weight")
    if ref.positions is not None:
        put(ref.positions.weight, "embedding.position_embeddings.weight")
    out_norm = s.setting == 1
    for i, block in enumerate(ref.blocks):
        p = f"decoder.layers.{i}"
        proj = f"{p}.self_attention.linear_proj" + (".linear" if out_norm else "")
        fc2 = f"{p}.mlp.linear_fc2" + (".linear" if out_norm else "")
        norms = (
            (f"{p}.self_attention.linear_proj.norm", f"{p}.mlp.linear_fc2.norm")
            if out_norm
            else (f"{p}.input_layernorm", f"{p}.pre_mlp_layernorm")
        )
        for norm, key in zip((block.norm1, block.norm2), norms):
            put(norm.weight, f"{key}.weight")
            if getattr(norm, "bias", None) is not None:
                put(norm.bias, f"{key}.bias")
        _load_qkv(block.attn, f"{p}.self_attention.linear_qkv", s, take)
        row(block.attn.o, proj)
        _load_fc1(block.ffn, f"{p}.mlp.linear_fc1", s, take)
        row(block.ffn.down, fc2)
    if ref.final_norm is not None:
        put(ref.final_norm.weight, "decoder.final_layernorm.weight")
    put(ref.head.weight, "output_layer.weight")
    put(ref.head.bias, "output_layer.bias")
    left = sorted(k for k in ours if k not in used and not k.endswith("_extra_state"))
    if left:
        raise AssertionError(f"tensors of ours with no place in the paper's model: {left}")


def _load_qkv(attn: Attention, prefix: str, s: PaperShape, take) -> None:
    """megatron's fused Q/K/V (per head: [q, k, v], multi-head attention) or our three pairs."""
    if s.attn_rank == 0:
        weight = take(f"{prefix}.weight").view(s.heads, 3, s.head_dim, s.hidden)
        bias = (
            take(f"{prefix}.bias").view(s.heads, 3, s.head_dim) if attn.q.bias is not None else None
        )
        for j, proj in enumerate((attn.q, attn.k, attn.v)):
            _copy(proj.weight, weight[:, j].reshape(-1, s.hidden), f"{prefix}.weight[{j}]")
            if bias is not None:
                _copy(proj.bias, bias[:, j].reshape(-1), f"{prefix}.bias[{j}]")
        return
    r = s.attn_rank
    down = take(f"{prefix}.down_weight")
    down_bias = take(f"{prefix}.down_bias") if attn.q[0].bias is not None else None
    for j, (name, proj) in enumerate(zip("qkv", (attn.q, attn.k, attn.v))):
        _copy(proj[0].weight, down[j * r : (j + 1) * r], f"{prefix}.down_weight[{name}]")
        if down_bias is not None:
            _copy(proj[0].bias, down_bias[j * r : (j + 1) * r], f"{prefix}.down_bias[{name}]")
        _copy(proj[1].weight, take(f"{prefix}.up_weight_{name}"), f"{prefix}.up_weight_{name}")


def _load_fc1(ffn: FFN, prefix: str, s: PaperShape, take) -> None:
    """The FFN's first slot: one projection (ReLU) or [gate; up] (SwiGLU), dense or low-rank."""
    parts = [ffn.gate, ffn.up] if ffn.gated else [ffn.up]
    names = ["gate", "up"] if ffn.gated else [""]
    if s.ffn_rank == 0:
        weight = take(f"{prefix}.weight").chunk(len(parts))
        bias = take(f"{prefix}.bias").chunk(len(parts)) if parts[0].bias is not None else None
        for j, proj in enumerate(parts):
            _copy(proj.weight, weight[j], f"{prefix}.weight[{j}]")
            if bias is not None:
                _copy(proj.bias, bias[j], f"{prefix}.bias[{j}]")
        return
    r = s.ffn_rank
    down = take(f"{prefix}.down_weight")
    down_bias = take(f"{prefix}.down_bias") if parts[0][0].bias is not None else None
    for j, (name, proj) in enumerate(zip(names, parts)):
        _copy(proj[0].weight, down[j * r : (j + 1) * r], f"{prefix}.down_weight[{j}]")
        if down_bias is not None:
            _copy(proj[0].bias, down_bias[j * r : (j + 1) * r], f"{prefix}.down_bias[{j}]")
        key = f"{prefix}.up_weight_{name}" if name else f"{prefix}.up_weight"
        _copy(proj[1].weight, take(key), key)
