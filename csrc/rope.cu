// Rotary position embedding in one pass: reads t [s, b, h, d] (any strides but the last) and the
// fp32 angles [s, rot], writes the rotated tensor contiguous. Megatron's unfused path builds
// rotate_half with a chunk, a negation and a cat, then two multiplies and an add, each a full pass.
//
// For element j of a head with partner p (j +- rot/2, or j^1 when interleaved) and angle f:
//   forward   out[j] = t[j] cos f[j] + r_j t[p] sin f[j],   r_j = -1 for the first of a pair, else +1
//   backward  dt[j]  = g[j] cos f[j] - r_j g[p] sin f[p]    (the transpose of the rotation)
// Channels from rot to d pass through unchanged.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

#include <algorithm>

#include "lpa_ops.h"
#include "vector_access.cuh"

namespace {

constexpr int kThreads = 256;

// Angles of this block's position into shared memory: [cos | sin] of its rot angles.
__device__ __forceinline__ void position_trig(const float* __restrict__ freqs, int64_t s, int rot,
                                              float* cos_s, float* sin_s) {
  for (int j = threadIdx.x; j < rot; j += blockDim.x) {
    sincosf(freqs[s * rot + j], &sin_s[j], &cos_s[j]);
  }
  __syncthreads();
}

// One element of a rotated pair: x, its partner's value, whether x is the pair's first, cos and sin
// of x's angle and sin of the partner's (the backward, the transpose, takes that one). Every kernel
// rotates through this, so the formula lives here only.
__device__ __forceinline__ float rotate(float x, float partner, bool first, float cos_x,
                                        float sin_x, float sin_partner, bool backward) {
  return backward ? x * cos_x + (first ? partner : -partner) * sin_partner
                  : x * cos_x + (first ? -partner : partner) * sin_x;
}

// One block per (position, sample): the position's cos/sin are computed once into shared memory,
// then the block rotates all heads of that token, one element per thread step. The fallback for
// layouts the vector kernel cannot read. (An element-per-thread grid with 64-bit index arithmetic
// and sin/cos per element ran at ~300 GB/s; see BENCHMARKS.md.)
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(
    const T* __restrict__ t, int64_t stride_s, int64_t stride_b, int64_t stride_h,
    const float* __restrict__ freqs, int heads, int dim, int rot, bool interleaved, bool backward,
    T* __restrict__ out) {
  extern __shared__ float trig[];
  float* cos_s = trig;
  float* sin_s = trig + rot;
  const int64_t s = blockIdx.x, b = blockIdx.y;
  position_trig(freqs, s, rot, cos_s, sin_s);
  const T* token = t + s * stride_s + b * stride_b;
  T* dst = out + (s * gridDim.y + b) * heads * dim;
  const int half = rot / 2;
  for (int idx = threadIdx.x; idx < heads * dim; idx += blockDim.x) {
    const int h = idx / dim, j = idx - h * dim;
    const T* row = token + h * stride_h;
    const float x = static_cast<float>(row[j]);
    float result = x;
    if (j < rot) {
      const bool first = interleaved ? (j % 2 == 0) : (j < half);
      const int p = interleaved ? (j ^ 1) : (first ? j + half : j - half);
      result = rotate(x, static_cast<float>(row[p]), first, cos_s[j], sin_s[j], sin_s[p],
                      backward);
    }
    dst[idx] = static_cast<T>(result);
  }
}

// N consecutive angles' cos or sin from shared memory in 16-byte loads: per-element loads at a
// stride of N floats across the warp would conflict N ways on the shared-memory banks.
template <int N>
__device__ __forceinline__ void load_angles(const float* src, float (&dst)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      dst[4 * i] = v.x; dst[4 * i + 1] = v.y; dst[4 * i + 2] = v.z; dst[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// The same rotation in 16-byte vectors of N elements (bf16/fp16: N = 8; fp32: 4). A block
// rotates `tokens` samples of one position, so the position's cos/sin are computed once for all of
// them. A thread's unit: interleaved, one vector (N/2 whole pairs, or pass-through channels);
// otherwise a vector of the first half with its partner vector in the second half, or one
// pass-through vector. Needs N | rot/2 (N | rot interleaved), N | dim, N | every stride and
// 16-byte aligned data.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads) rope_vector_kernel(
    const T* __restrict__ t, int64_t stride_s, int64_t stride_b, int64_t stride_h,
    const float* __restrict__ freqs, int batch, int tokens, int heads, int dim, int rot,
    bool interleaved, bool backward, T* __restrict__ out) {
  extern __shared__ float4 trig4[];  // 16-byte aligned: [cos | sin]
  float* cos_s = reinterpret_cast<float*>(trig4);
  float* sin_s = cos_s + rot;
  const int64_t s = blockIdx.x;
  const int first_b = blockIdx.y * tokens;
  const int block_tokens = min(tokens, batch - first_b);
  position_trig(freqs, s, rot, cos_s, sin_s);
  const int half = rot / 2;
  const int pair_units = interleaved ? 0 : half / N;
  const int units = interleaved ? dim / N : pair_units + (dim - rot) / N;
  const int token_units = heads * units;
  for (int idx = threadIdx.x; idx < block_tokens * token_units; idx += blockDim.x) {
    const int token = idx / token_units, rest = idx - token * token_units;
    const int h = rest / units, w = rest - h * units;
    const int64_t b = first_b + token;
    const T* row = t + s * stride_s + b * stride_b + h * stride_h;
    T* out_row = out + ((s * batch + b) * heads + h) * dim;
    float c1[N], s1[N], c2[N], s2[N];
    if (w < pair_units) {
      const int j = w * N;
      load_angles<N>(cos_s + j, c1); load_angles<N>(sin_s + j, s1);
      load_angles<N>(cos_s + j + half, c2); load_angles<N>(sin_s + j + half, s2);
      const Vector<T, N> x1 = load_vector<T, N>(row + j), x2 = load_vector<T, N>(row + j + half);
      Vector<T, N> o1, o2;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float a = static_cast<float>(x1.value[k]), c = static_cast<float>(x2.value[k]);
        o1.value[k] = static_cast<T>(rotate(a, c, true, c1[k], s1[k], s2[k], backward));
        o2.value[k] = static_cast<T>(rotate(c, a, false, c2[k], s2[k], s1[k], backward));
      }
      store_vector<T, N>(out_row + j, o1);
      store_vector<T, N>(out_row + j + half, o2);
      continue;
    }
    const int j = interleaved ? w * N : rot + (w - pair_units) * N;
    Vector<T, N> x = load_vector<T, N>(row + j);
    if (j < rot) {  // interleaved pairs (j + k, j + k + 1) inside the vector
      load_angles<N>(cos_s + j, c1); load_angles<N>(sin_s + j, s1);
#pragma unroll
      for (int k = 0; k < N; k += 2) {
        const float a = static_cast<float>(x.value[k]), c = static_cast<float>(x.value[k + 1]);
        x.value[k] = static_cast<T>(rotate(a, c, true, c1[k], s1[k], s1[k + 1], backward));
        x.value[k + 1] = static_cast<T>(rotate(c, a, false, c1[k + 1], s1[k + 1], s1[k], backward));
      }
    }
    store_vector<T, N>(out_row + j, x);
  }
}

}  // namespace

at::Tensor rope(const at::Tensor& t, const at::Tensor& freqs, bool interleaved, bool backward) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 4 && t.stride(3) == 1,
              "rope: t must be a CUDA tensor [s, b, h, d] with a contiguous last dimension");
  TORCH_CHECK(freqs.is_cuda() && freqs.scalar_type() == at::kFloat && freqs.dim() == 2 &&
                  freqs.size(0) == t.size(0) && freqs.is_contiguous(),
              "rope: freqs must be contiguous fp32 CUDA angles [s, rot]");
  const int64_t rot = freqs.size(1), dim = t.size(3);
  TORCH_CHECK(rot % 2 == 0 && rot <= dim,
              "rope: the rotary dimension (freqs.size(1)) must be even and at most the head "
              "dimension (t.size(3))");
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  if (t.numel() == 0) return out;
  TORCH_CHECK(t.size(1) <= 65535 && t.size(2) * dim <= INT32_MAX,
              "rope: at most 65535 samples per micro-batch and 2^31 channels per token");
  const dim3 grid(t.size(0), t.size(1));
  const size_t shared = 2 * rot * sizeof(float);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "rope", [&] {
    constexpr int N = kVectorWidth<scalar_t>;
    const int heads = static_cast<int>(t.size(2)), batch = static_cast<int>(t.size(1));
    const bool vectorised = vector_aligned<scalar_t, N>(t.data_ptr(), dim) &&
                            (interleaved ? rot : rot / 2) % N == 0 && t.stride(0) % N == 0 &&
                            t.stride(1) % N == 0 && t.stride(2) % N == 0;
    if (vectorised) {
      // Enough samples per block for about 2048 vectors of work (the 130M shape has 48 per sample).
      const int64_t per_token = heads * dim / N;
      const int tokens =
          static_cast<int>(std::min<int64_t>(batch, std::max<int64_t>(1, 2048 / per_token)));
      const dim3 vector_grid(t.size(0), (batch + tokens - 1) / tokens);
      rope_vector_kernel<scalar_t, N><<<vector_grid, kThreads, shared, stream>>>(
          t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), freqs.data_ptr<float>(),
          batch, tokens, heads, static_cast<int>(dim), static_cast<int>(rot), interleaved,
          backward, out.data_ptr<scalar_t>());
    } else {
      rope_kernel<scalar_t><<<grid, kThreads, shared, stream>>>(
          t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), freqs.data_ptr<float>(),
          heads, static_cast<int>(dim), static_cast<int>(rot), interleaved, backward,
          out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
