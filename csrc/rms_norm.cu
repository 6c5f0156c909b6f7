// RMSNorm over the last dimension, x [rows, n] -> y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps),
// and its backward:
//
//   dx = rstd * (w dy - x rstd^2 mean(w dy x)),    dw = sum over rows of dy x rstd
//
// torch's CUDA RMSNorm computes dw in a kernel of its own that reads x and dy a second time at about
// 0.8 TB/s (GammaBetaBackward, the largest non-GEMM kernel of the 130M step: BENCHMARKS.md). Here one
// pass over x and dy writes dx and each block's partial dw (fp32), and a small kernel sums the partials.
//
// Layout: a block normalises one row at a time (grid-stride over rows); each thread owns the same
// VPT 16-byte vectors of VEC columns in every row, so it keeps w in registers and accumulates its
// columns' partial dw across rows without atomics. Rows must be whole, 16-byte aligned vectors, at
// most 2048 of them (megatron_lpa/ops/rms_norm.py sends other rows to the PyTorch version).

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "lpa_ops.h"
#include "vector_access.cuh"

namespace {

constexpr int kMaxThreads = 1024;

// Threads per block: up to 1024 with one vector per thread; with four, 512 (register budget).
constexpr int block_limit(int vpt) { return vpt == 1 ? kMaxThreads : kMaxThreads / 2; }

// Sum of `value` over the block; every thread gets it. `shared` holds one float per warp.
__device__ __forceinline__ float block_sum(float value, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // the previous row's readers of shared[] are done
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = lane < warps ? shared[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

// Calls body(k, j) for each vector this thread owns in a row: its k-th (k < VPT, a compile-time
// constant once unrolled, so arrays indexed by k stay in registers) is vector j < vectors.
template <int VPT, typename Body>
__device__ __forceinline__ void for_owned_vectors(int vectors, Body&& body) {
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < vectors) body(k, j);
  }
}

// Loads this thread's vectors of one row.
template <typename T, int VEC, int VPT>
__device__ __forceinline__ void load_owned(const T* row, int vectors, Vector<T, VEC> (&v)[VPT]) {
  for_owned_vectors<VPT>(vectors, [&](int k, int j) { v[k] = load_vector<T, VEC>(row + j * VEC); });
}

// With one vector per thread, both kernels load the block's next row before reducing the current
// one: a row's loads would otherwise wait for the previous row's block reduction, and with a few
// blocks per SM (registers allow two of 384 threads in the backward) too few bytes would be in
// flight to keep memory busy. With four vectors a thread has four loads in flight already, and the
// registers for a second row would spill.
template <int VPT>
constexpr bool kPrefetch = VPT == 1;

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(block_limit(VPT)) rms_norm_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, float* __restrict__ rstd,
    int64_t rows, int n, float eps) {
  __shared__ float shared[32];
  const int vectors = n / VEC;
  Vector<T, VEC> weight[VPT], input[VPT], next[VPT];
  load_owned(w, vectors, weight);
  if (kPrefetch<VPT> && blockIdx.x < rows) {
    load_owned(x + blockIdx.x * static_cast<int64_t>(n), vectors, next);
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    if (kPrefetch<VPT>) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) input[k] = next[k];
      if (row + gridDim.x < rows) load_owned(x + (row + gridDim.x) * n, vectors, next);
    } else {
      load_owned(x + row * n, vectors, input);
    }
    float squares = 0.f;
    for_owned_vectors<VPT>(vectors, [&](int k, int) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float v = static_cast<float>(input[k].value[e]);
        squares += v * v;
      }
    });
    const float r = rsqrtf(block_sum(squares, shared) / n + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for_owned_vectors<VPT>(vectors, [&](int k, int j) {
      Vector<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        out.value[e] = static_cast<T>(static_cast<float>(input[k].value[e]) * r *
                                      static_cast<float>(weight[k].value[e]));
      }
      store_vector<T, VEC>(y + row * n + j * VEC, out);
    });
  }
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(block_limit(VPT)) rms_norm_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
    const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_partial,
    int64_t rows, int n) {
  __shared__ float shared[32];
  const int vectors = n / VEC;
  Vector<T, VEC> weight[VPT], grad[VPT], input[VPT], next_grad[VPT], next_input[VPT];
  load_owned(w, vectors, weight);
  if (kPrefetch<VPT> && blockIdx.x < rows) {
    load_owned(dy + blockIdx.x * static_cast<int64_t>(n), vectors, next_grad);
    load_owned(x + blockIdx.x * static_cast<int64_t>(n), vectors, next_input);
  }
  float dw[VPT][VEC] = {};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    if (kPrefetch<VPT>) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        grad[k] = next_grad[k];
        input[k] = next_input[k];
      }
      if (row + gridDim.x < rows) {
        load_owned(dy + (row + gridDim.x) * n, vectors, next_grad);
        load_owned(x + (row + gridDim.x) * n, vectors, next_input);
      }
    } else {
      load_owned(dy + row * n, vectors, grad);
      load_owned(x + row * n, vectors, input);
    }
    const float r = rstd[row];
    float dot = 0.f;  // this thread's part of sum(w dy x)
    for_owned_vectors<VPT>(vectors, [&](int k, int) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dot += static_cast<float>(weight[k].value[e]) * static_cast<float>(grad[k].value[e]) *
               static_cast<float>(input[k].value[e]);
      }
    });
    const float c = block_sum(dot, shared) * r * r * r / n;
    for_owned_vectors<VPT>(vectors, [&](int k, int j) {
      Vector<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float g = static_cast<float>(grad[k].value[e]);
        const float v = static_cast<float>(input[k].value[e]);
        out.value[e] = static_cast<T>(r * static_cast<float>(weight[k].value[e]) * g - c * v);
        dw[k][e] += g * v * r;
      }
      store_vector<T, VEC>(dx + row * n + j * VEC, out);
    });
  }
  for_owned_vectors<VPT>(vectors, [&](int k, int j) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      dw_partial[blockIdx.x * static_cast<int64_t>(n) + j * VEC + e] = dw[k][e];
    }
  });
}

// dw[col] = sum over blocks of dw_partial[block, col]: 32 columns per block, its 32 rows of threads
// each summing every 32nd partial, then the 32 sums of a column added through shared memory.
template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ partial, T* __restrict__ dw,
                                    int blocks, int n) {
  __shared__ float sums[32][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float sum = 0.f;
  if (col < n) {
    for (int b = threadIdx.y; b < blocks; b += 32) sum += partial[b * static_cast<int64_t>(n) + col];
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) total += sums[i][threadIdx.x];
    dw[col] = static_cast<T>(total);
  }
}

constexpr int kMaxVectors = block_limit(4) * 4;

template <int N>
using Int = std::integral_constant<int, N>;

// Checks that rows of n elements are whole, aligned 16-byte vectors the kernels can hold, then calls
// launch(Int<VEC>, Int<VPT>, threads): one vector per thread up to 1024 vectors, else four.
template <typename scalar_t, typename Launch>
void dispatch_shape(std::initializer_list<const void*> pointers, int n, Launch&& launch) {
  constexpr int kVec = kVectorWidth<scalar_t>;
  bool aligned = n % kVec == 0;
  for (const void* p : pointers) aligned &= reinterpret_cast<uintptr_t>(p) % 16 == 0;
  const int vectors = n / kVec;
  TORCH_CHECK(aligned && vectors <= kMaxVectors,
              "rms_norm: rows must be 16-byte aligned whole 16-byte vectors, at most 2048 of them "
              "(megatron_lpa.ops.rms_norm sends other rows to its PyTorch version)");
  if (vectors <= block_limit(1)) {
    launch(Int<kVec>{}, Int<1>{}, (vectors + 31) / 32 * 32);
  } else {
    launch(Int<kVec>{}, Int<4>{}, ((vectors + 3) / 4 + 31) / 32 * 32);
  }
}

// As many blocks as fit on the GPU at once (registers usually decide), each taking rows
// grid-stride: no block waits for a slot, and the backward writes no more partial sums than needed.
template <typename Kernel>
int grid_for(Kernel kernel, int64_t rows, int threads) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = static_cast<int64_t>(sms) * std::max(1, per_sm);
  return static_cast<int>(std::max<int64_t>(1, std::min(rows, resident)));
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2,
              "rms_norm: x must be a contiguous CUDA tensor [rows, n]");
  TORCH_CHECK(weight.is_cuda() && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be a contiguous CUDA tensor [n] in the dtype of x");
}

}  // namespace

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                         double eps) {
  check_inputs(x, weight);
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, rstd};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    dispatch_shape<scalar_t>(
        {x.data_ptr(), weight.data_ptr(), y.data_ptr()}, n, [&](auto vec, auto vpt, int threads) {
          auto kernel =
              rms_norm_forward_kernel<scalar_t, decltype(vec)::value, decltype(vpt)::value>;
          kernel<<<grid_for(kernel, rows, threads), threads, 0, stream>>>(
              x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
              rstd.data_ptr<float>(), rows, n, static_cast<float>(eps));
        });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& weight, const at::Tensor& rstd) {
  check_inputs(x, weight);
  TORCH_CHECK(grad.is_cuda() && grad.is_contiguous() && grad.sizes() == x.sizes() &&
                  grad.scalar_type() == x.scalar_type(),
              "rms_norm_backward: grad must be contiguous, shaped and typed like x");
  TORCH_CHECK(rstd.is_cuda() && rstd.is_contiguous() && rstd.scalar_type() == at::kFloat &&
                  rstd.numel() == x.size(0),
              "rms_norm_backward: rstd must be the fp32 [rows] that rms_norm_forward returned");
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty_like(weight);
  if (x.numel() == 0) return {dx, dw};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd", [&] {
    dispatch_shape<scalar_t>(
        {x.data_ptr(), grad.data_ptr(), weight.data_ptr(), dx.data_ptr()}, n,
        [&](auto vec, auto vpt, int threads) {
          auto kernel =
              rms_norm_backward_kernel<scalar_t, decltype(vec)::value, decltype(vpt)::value>;
          const int blocks = grid_for(kernel, rows, threads);
          at::Tensor partial = at::empty({blocks, n}, x.options().dtype(at::kFloat));
          kernel<<<blocks, threads, 0, stream>>>(
              grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
              rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(), partial.data_ptr<float>(), rows,
              n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          sum_partials_kernel<scalar_t><<<(n + 31) / 32, dim3(32, 32), 0, stream>>>(
              partial.data_ptr<float>(), dw.data_ptr<scalar_t>(), blocks, n);
        });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw};
}
