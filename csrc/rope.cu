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

#include "lpa_ops.h"

namespace {

constexpr int kThreads = 256;

// One block per (position, sample): the position's cos/sin are computed once into shared memory,
// then the block rotates all heads of that token. (An element-per-thread version with 64-bit
// index arithmetic and sin/cos per element ran at ~300 GB/s; see BENCHMARKS.md.)
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(
    const T* __restrict__ t, int64_t stride_s, int64_t stride_b, int64_t stride_h,
    const float* __restrict__ freqs, int heads, int dim, int rot, bool interleaved, bool backward,
    T* __restrict__ out) {
  extern __shared__ float trig[];  // [cos | sin] of this position's rot angles
  float* cos_s = trig;
  float* sin_s = trig + rot;
  const int64_t s = blockIdx.x, b = blockIdx.y;
  for (int j = threadIdx.x; j < rot; j += blockDim.x) {
    sincosf(freqs[s * rot + j], &sin_s[j], &cos_s[j]);
  }
  __syncthreads();
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
      const float partner = static_cast<float>(row[p]);
      result = backward ? x * cos_s[j] + (first ? partner : -partner) * sin_s[p]
                        : x * cos_s[j] + (first ? -partner : partner) * sin_s[j];
    }
    dst[idx] = static_cast<T>(result);
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
  TORCH_CHECK(rot % 2 == 0 && rot <= dim, "rope: the rotary dimension ", rot,
              " must be even and at most the head dimension ", dim);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  if (t.numel() == 0) return out;
  TORCH_CHECK(t.size(1) <= 65535 && t.size(2) * dim <= INT32_MAX,
              "rope: at most 65535 samples per micro-batch and 2^31 channels per token");
  const dim3 grid(t.size(0), t.size(1));
  const size_t shared = 2 * rot * sizeof(float);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "rope", [&] {
    rope_kernel<scalar_t><<<grid, kThreads, shared, stream>>>(
        t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), freqs.data_ptr<float>(),
        static_cast<int>(t.size(2)), static_cast<int>(dim), static_cast<int>(rot), interleaved,
        backward, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
