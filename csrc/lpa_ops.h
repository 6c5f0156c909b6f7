// Host entry points of the fused CUDA kernels (one .cu file per op); lpa_ops.cpp binds them.
#pragma once

#include <torch/extension.h>

#include <vector>

// Cross-entropy over one vocabulary partition (rows = tokens, columns = this rank's vocabulary).
// Returns {row max, sum of exp(x - row max), logit of the label (0 where the label is elsewhere)}.
std::vector<at::Tensor> cross_entropy_stats(const at::Tensor& logits, const at::Tensor& labels,
                                            int64_t vocab_start);
// d loss / d logits = (softmax - one_hot(label)) * grad, softmax from the global log-sum-exp.
at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, const at::Tensor& grad,
                                  int64_t vocab_start);

// Rotary embedding of t [s, b, h, d] with angles freqs [s, rot] (fp32); backward=true rotates back.
at::Tensor rope(const at::Tensor& t, const at::Tensor& freqs, bool interleaved, bool backward);

// SwiGLU: x [..., 2f] = [gate, up] -> silu(gate) * up [..., f], and its input gradient.
at::Tensor swiglu_forward(const at::Tensor& x);
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& x);

// RMSNorm over the last dimension of x [rows, n] with weight [n]: returns {y, rstd [rows] fp32};
// backward returns {dx, dw} from the output gradient, x, weight and that rstd. Rows must be whole,
// 16-byte aligned 16-byte vectors, at most 2048 of them (n <= 16384 in 16-bit types).
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& weight, const at::Tensor& rstd);
