// Vocabulary-parallel cross-entropy in two passes over bf16/fp16/fp32 logits, never in fp32 copies.
//
// Forward: one block per token row reads its logits once and keeps an online (max, sum of exp)
// pair per thread, merged across the block; the caller combines the pairs of all TP ranks into the
// log-sum-exp. Backward: one block per row writes (softmax - one_hot) * grad in the logits' dtype.
// Megatron's unfused path instead materialises fp32 logits, exp, softmax and its gradient.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

#include <cmath>
#include <type_traits>

#include "lpa_ops.h"
#include "vector_access.cuh"

namespace {

constexpr int kThreads = 512;

// Merges the running (max, sum of exp(x - max)) pair (m, s) with (other_m, other_s).
__device__ __forceinline__ void merge(float& m, float& s, float other_m, float other_s) {
  const float new_m = fmaxf(m, other_m);
  if (new_m == -INFINITY) return;  // both still empty
  s = s * __expf(m - new_m) + other_s * __expf(other_m - new_m);
  m = new_m;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) cross_entropy_stats_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t vocab,
    int64_t vocab_start, float* __restrict__ row_max, float* __restrict__ row_sum_exp,
    float* __restrict__ label_logit) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  float m = -INFINITY, s = 0.f;
  for (int64_t i = threadIdx.x * VEC; i < vocab; i += kThreads * VEC) {
    const Vector<T, VEC> v = load_vector<T, VEC>(x + i);
    float values[VEC];
    float chunk_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      values[k] = static_cast<float>(v.value[k]);
      chunk_max = fmaxf(chunk_max, values[k]);
    }
    const float new_m = fmaxf(m, chunk_max);
    if (new_m == -INFINITY) continue;
    float chunk_sum = 0.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) chunk_sum += __expf(values[k] - new_m);
    s = s * __expf(m - new_m) + chunk_sum;
    m = new_m;
  }
  // Warp, then block reduction of the (max, sum) pairs.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_m = __shfl_xor_sync(0xffffffff, m, offset);
    const float other_s = __shfl_xor_sync(0xffffffff, s, offset);
    merge(m, s, other_m, other_s);
  }
  __shared__ float warp_m[kThreads / 32], warp_s[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / 32 ? warp_m[lane] : -INFINITY;
    s = lane < kThreads / 32 ? warp_s[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other_m = __shfl_xor_sync(0xffffffff, m, offset);
      const float other_s = __shfl_xor_sync(0xffffffff, s, offset);
      merge(m, s, other_m, other_s);
    }
    if (lane == 0) {
      row_max[row] = m;
      row_sum_exp[row] = s;
      const int64_t local = labels[row] - vocab_start;
      label_logit[row] = (local >= 0 && local < vocab) ? static_cast<float>(x[local]) : 0.f;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) cross_entropy_backward_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t vocab,
    int64_t vocab_start, const float* __restrict__ lse, const float* __restrict__ grad,
    T* __restrict__ grad_logits) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  T* out = grad_logits + row * vocab;
  const float row_lse = lse[row], row_grad = grad[row];
  const int64_t local = labels[row] - vocab_start;
  for (int64_t i = threadIdx.x * VEC; i < vocab; i += kThreads * VEC) {
    const Vector<T, VEC> v = load_vector<T, VEC>(x + i);
    Vector<T, VEC> result;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float p = __expf(static_cast<float>(v.value[k]) - row_lse);
      result.value[k] = static_cast<T>((p - (i + k == local ? 1.f : 0.f)) * row_grad);
    }
    store_vector<T, VEC>(out + i, result);
  }
}

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(),
              "cross_entropy: logits must be a contiguous CUDA tensor [tokens, vocab]");
  TORCH_CHECK(labels.is_cuda() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == logits.size(0) && labels.is_contiguous(),
              "cross_entropy: labels must be a contiguous int64 CUDA tensor [tokens]");
}

// Calls launch(scalar_t{}, std::integral_constant<int, VEC>{}) for the logits' dtype: VEC elements
// make 16 bytes when every row starts on a 16-byte boundary, else VEC = 1.
template <typename Launch>
void dispatch_rows(const at::Tensor& logits, Launch&& launch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy", [&] {
        constexpr int kVec = kVectorWidth<scalar_t>;
        if (vector_aligned<scalar_t, kVec>(logits.data_ptr(), logits.size(1))) {
          launch(scalar_t{}, std::integral_constant<int, kVec>{});
        } else {
          launch(scalar_t{}, std::integral_constant<int, 1>{});
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

std::vector<at::Tensor> cross_entropy_stats(const at::Tensor& logits, const at::Tensor& labels,
                                            int64_t vocab_start) {
  check_rows(logits, labels);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto options = logits.options().dtype(at::kFloat);
  at::Tensor row_max = at::empty({rows}, options), row_sum_exp = at::empty({rows}, options),
             label_logit = at::empty({rows}, options);
  if (rows == 0) return {row_max, row_sum_exp, label_logit};
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_rows(logits, [&](auto type, auto vec) {
    using T = decltype(type);
    cross_entropy_stats_kernel<T, decltype(vec)::value><<<rows, kThreads, 0, stream>>>(
        logits.data_ptr<T>(), labels.data_ptr<int64_t>(), vocab, vocab_start,
        row_max.data_ptr<float>(), row_sum_exp.data_ptr<float>(), label_logit.data_ptr<float>());
  });
  return {row_max, row_sum_exp, label_logit};
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, const at::Tensor& grad,
                                  int64_t vocab_start) {
  check_rows(logits, labels);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  for (const at::Tensor* t : {&lse, &grad}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->dim() == 1 &&
                    t->size(0) == rows && t->is_contiguous(),
                "cross_entropy_backward: lse and grad must be contiguous fp32 CUDA [tokens]");
  }
  at::Tensor grad_logits = at::empty_like(logits);
  if (rows == 0) return grad_logits;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_rows(logits, [&](auto type, auto vec) {
    using T = decltype(type);
    cross_entropy_backward_kernel<T, decltype(vec)::value><<<rows, kThreads, 0, stream>>>(
        logits.data_ptr<T>(), labels.data_ptr<int64_t>(), vocab, vocab_start,
        lse.data_ptr<float>(), grad.data_ptr<float>(), grad_logits.data_ptr<T>());
  });
  return grad_logits;
}
