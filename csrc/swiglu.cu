// SwiGLU in one pass each way: x [rows, 2f] = [gate, up] -> silu(gate) * up [rows, f]. Megatron's
// unfused path runs silu and the product as separate kernels and keeps silu(gate) for backward;
// here backward recomputes it from x, so only x is kept.
//
//   silu(g) = g sigmoid(g),  silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
//   d gate = dy * up * silu'(gate),  d up = dy * silu(gate)

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

#include "lpa_ops.h"
#include "vector_access.cuh"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(
    const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t f) {
  const int64_t vectors_per_row = f / VEC, total = rows * vectors_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / vectors_per_row, col = (i % vectors_per_row) * VEC;
    const Vector<T, VEC> gate = load_vector<T, VEC>(x + row * 2 * f + col);
    const Vector<T, VEC> up = load_vector<T, VEC>(x + row * 2 * f + f + col);
    Vector<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = static_cast<float>(gate.value[k]);
      out.value[k] = static_cast<T>(g * sigmoid(g) * static_cast<float>(up.value[k]));
    }
    store_vector<T, VEC>(y + row * f + col, out);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t rows,
    int64_t f) {
  const int64_t vectors_per_row = f / VEC, total = rows * vectors_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / vectors_per_row, col = (i % vectors_per_row) * VEC;
    const Vector<T, VEC> grad = load_vector<T, VEC>(dy + row * f + col);
    const Vector<T, VEC> gate = load_vector<T, VEC>(x + row * 2 * f + col);
    const Vector<T, VEC> up = load_vector<T, VEC>(x + row * 2 * f + f + col);
    Vector<T, VEC> d_gate, d_up;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = static_cast<float>(gate.value[k]), u = static_cast<float>(up.value[k]);
      const float d = static_cast<float>(grad.value[k]), sig = sigmoid(g);
      d_gate.value[k] = static_cast<T>(d * u * sig * (1.f + g * (1.f - sig)));
      d_up.value[k] = static_cast<T>(d * g * sig);
    }
    store_vector<T, VEC>(dx + row * 2 * f + col, d_gate);
    store_vector<T, VEC>(dx + row * 2 * f + f + col, d_up);
  }
}

int64_t grid_for(int64_t vectors) {
  return std::max<int64_t>(1, std::min<int64_t>((vectors + kThreads - 1) / kThreads, 132 * 16));
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "swiglu: x must be a contiguous CUDA tensor [..., 2f] holding [gate, up]");
}

}  // namespace

at::Tensor swiglu_forward(const at::Tensor& x) {
  check_input(x);
  const int64_t f = x.size(-1) / 2, rows = f ? x.numel() / (2 * f) : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = f;
  at::Tensor y = at::empty(sizes, x.options());
  if (y.numel() == 0) return y;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "swiglu", [&] {
    constexpr int kVec = kVectorWidth<scalar_t>;
    const auto* data = x.data_ptr<scalar_t>();
    if (vector_aligned<scalar_t, kVec>(data, f)) {
      swiglu_forward_kernel<scalar_t, kVec><<<grid_for(rows * f / kVec), kThreads, 0, stream>>>(
          data, y.data_ptr<scalar_t>(), rows, f);
    } else {
      swiglu_forward_kernel<scalar_t, 1><<<grid_for(rows * f), kThreads, 0, stream>>>(
          data, y.data_ptr<scalar_t>(), rows, f);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& x) {
  check_input(x);
  const int64_t f = x.size(-1) / 2, rows = f ? x.numel() / (2 * f) : 0;
  TORCH_CHECK(grad.is_cuda() && grad.is_contiguous() && grad.scalar_type() == x.scalar_type() &&
                  grad.numel() == rows * f && grad.size(-1) == f,
              "swiglu_backward: grad must be contiguous [..., f] in the dtype of x");
  at::Tensor dx = at::empty_like(x);
  if (dx.numel() == 0) return dx;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "swiglu_bwd", [&] {
    constexpr int kVec = kVectorWidth<scalar_t>;
    const auto* data = x.data_ptr<scalar_t>();
    const auto* dy = grad.data_ptr<scalar_t>();
    if (vector_aligned<scalar_t, kVec>(data, f) && vector_aligned<scalar_t, kVec>(dy, f)) {
      swiglu_backward_kernel<scalar_t, kVec><<<grid_for(rows * f / kVec), kThreads, 0, stream>>>(
          dy, data, dx.data_ptr<scalar_t>(), rows, f);
    } else {
      swiglu_backward_kernel<scalar_t, 1><<<grid_for(rows * f), kThreads, 0, stream>>>(
          dy, data, dx.data_ptr<scalar_t>(), rows, f);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}
