"""Pure-PyTorch versions of the fused kernels: the CPU (and no-extension) path and the test oracle.

Each function computes in fp32 (fp64 for fp64 inputs, as the tests' oracle) and returns the dtype
the kernel returns; shapes and semantics are the kernels' own (``csrc/lpa_ops.h``).
"""

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision the math runs in: fp32, or fp64 when given fp64."""
    return x if x.dtype == torch.float64 else x.float()


def _label_columns(labels: torch.Tensor, vocab_start: int, vocab: int):
    """Column of each row's label in this vocabulary slice, and whether the slice holds it."""
    local = labels - vocab_start
    inside = (local >= 0) & (local < vocab)
    return local.clamp(0, vocab - 1), inside


def cross_entropy_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    """``logits [n, v]``, ``labels [n]`` -> fp32 ``(row max, sum exp(x - max), label logit or
    0)``."""
    x = _wide(logits)
    row_max = x.max(dim=-1).values
    sum_exp = torch.exp(x - row_max[:, None]).sum(dim=-1)
    column, inside = _label_columns(labels, vocab_start, x.shape[-1])
    label_logit = torch.where(inside, x.gather(1, column[:, None]).squeeze(1), 0.0)
    return row_max.float(), sum_exp.float(), label_logit.float()


def cross_entropy_backward(logits, labels, lse, grad, vocab_start: int) -> torch.Tensor:
    """``(softmax(logits) - one_hot(labels)) * grad`` per row, in the logits' dtype."""
    probs = torch.exp(_wide(logits) - lse[:, None])
    column, inside = _label_columns(labels, vocab_start, logits.shape[-1])
    probs.scatter_add_(1, column[:, None], -inside.to(probs.dtype)[:, None])
    return (probs * grad[:, None]).to(logits.dtype)


def _partner(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The other element of each rotation pair, along the last dimension."""
    if interleaved:
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def _first_of_pair(rot: int, interleaved: bool, device) -> torch.Tensor:
    index = torch.arange(rot, device=device)
    return index % 2 == 0 if interleaved else index < rot // 2


def rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool, backward: bool) -> torch.Tensor:
    """Rotates ``t [s, b, h, d]`` by the angles ``freqs [s, rot]`` (``backward``: by their
    inverse)."""
    rot = freqs.shape[-1]
    x, passed = _wide(t[..., :rot]), _wide(t[..., rot:])
    angles = _wide(freqs)[:, None, None, :]
    sign = torch.where(_first_of_pair(rot, interleaved, t.device), -1.0, 1.0)
    if backward:
        rotated = x * torch.cos(angles) - sign * _partner(x, interleaved) * torch.sin(
            _partner(angles, interleaved)
        )
    else:
        rotated = x * torch.cos(angles) + sign * _partner(x, interleaved) * torch.sin(angles)
    return torch.cat((rotated, passed), dim=-1).to(t.dtype)


def swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2f] = [gate, up]`` -> ``silu(gate) * up [..., f]``."""
    gate, up = _wide(x).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def swiglu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of ``swiglu_forward`` at ``x`` for the output gradient ``grad [..., f]``."""
    gate, up = _wide(x).chunk(2, dim=-1)
    dy = _wide(grad)
    sig = torch.sigmoid(gate)
    d_gate = dy * up * sig * (1 + gate * (1 - sig))
    return torch.cat((d_gate, dy * gate * sig), dim=-1).to(x.dtype)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """``x [rows, n]``, ``weight [n]`` -> ``(x * rstd * weight, rstd [rows])`` (rstd in fp32, or
    fp64 for fp64 inputs)."""
    wide = _wide(x)
    rstd = torch.rsqrt(wide.square().mean(dim=-1) + eps)
    return (wide * rstd[:, None] * _wide(weight)).to(x.dtype), rstd


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
):
    """Input and weight gradients of ``rms_norm_forward`` for the output gradient ``grad``."""
    dy, wide, w = _wide(grad), _wide(x), _wide(weight)
    r = rstd.to(wide.dtype)[:, None]
    mean_dot = (dy * w * wide).mean(dim=-1, keepdim=True)
    dx = r * w * dy - wide * r.pow(3) * mean_dot
    return dx.to(x.dtype), (dy * wide * r).sum(dim=0).to(weight.dtype)
