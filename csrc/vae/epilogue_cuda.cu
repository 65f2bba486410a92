// The decoder's epilogues on CUDA (epilogue_cuda.h).
//   frames_to_uint8: one thread per position; it reads the position's C plane values (each
//     plane read coalesced across the warp) and writes its C bytes.
//   latent_denorm: a grid-stride loop over one (b, c, t) plane per block row; each thread
//     that saw NaN adds its own count with one atomic (none without NaN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <type_traits>

#include "vae/epilogue_cuda.h"

namespace sora_kernels {
namespace vae {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

template <typename T>
__global__ void frames_to_uint8_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, int64_t C, int64_t P) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  for (int64_t c = 0; c < C; ++c) {
    const float e = to_float(x[c * P + p]);
    // clamp, + 1, * 127.5 with explicit round-to-nearest operations (no fma contraction),
    // then round half to even: torch's (clamp(x, -1, 1) + 1) * 127.5).round() bit for bit.
    const float v = __fmul_rn(__fadd_rn(e > -1.0f ? (e < 1.0f ? e : 1.0f) : -1.0f, 1.0f), 127.5f);
    out[p * C + c] = static_cast<uint8_t>(__float2int_rn(v));
  }
}

template <typename T>
__global__ void latent_denorm_kernel(const T* __restrict__ z, T* __restrict__ out, const float* __restrict__ scale,
                                     const float* __restrict__ shift, int32_t* __restrict__ nan, int64_t planes,
                                     int64_t C, int64_t T_, int64_t S) {
  const int64_t plane = blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y;  // (b * C + c) * T + t
  if (plane >= planes) return;  // the last z slice of the grid may run past the planes (whole blocks)
  const int64_t t = plane % T_, c = (plane / T_) % C, b = plane / (C * T_);
  const float k = scale[c], m = shift[c];
  const int64_t base = plane * S;
  int bad = 0;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_float(z[base + s]);
    bad += !(fabsf(v) <= FLT_MAX);  // NaN or +-Inf
    out[base + s] = from_float<T>(__fadd_rn(__fmul_rn(v, k), m));  // two roundings, as the reference
  }
  // a thread's own count (non-finite values are rare: no atomics without them)
  if (bad) atomicAdd(nan + b * T_ + t, bad);
}

constexpr int kThreads = 256;

template <typename T>
int frames(const void* x, uint8_t* out, int64_t C, int64_t P, cudaStream_t stream) {
  const int64_t blocks = (P + kThreads - 1) / kThreads;
  frames_to_uint8_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const T*>(x), out,
                                                                                    C, P);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int denorm(const void* z, void* out, const float* scale, const float* shift, int32_t* nan, int64_t B, int64_t C,
           int64_t T_, int64_t S, cudaStream_t stream) {
  const int64_t planes = B * C * T_;
  const int64_t per_plane = (S + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(per_plane < 64 ? per_plane : 64),
                  static_cast<unsigned>(planes < 65535 ? planes : 65535),
                  static_cast<unsigned>((planes + 65534) / 65535));
  if (grid.z > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  latent_denorm_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(z), static_cast<T*>(out), scale, shift,
                                                           nan, planes, C, T_, S);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_frames_to_uint8_cuda(const void* x, FloatType type, uint8_t* out, int64_t C, int64_t P,
                                cudaStream_t stream) {
  if (P == 0) return 0;
  switch (type) {
    case FloatType::kFloat32: return frames<float>(x, out, C, P, stream);
    case FloatType::kFloat16: return frames<__half>(x, out, C, P, stream);
    case FloatType::kBFloat16: return frames<__nv_bfloat16>(x, out, C, P, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_latent_denorm_cuda(const void* z, void* out, FloatType type, const float* scale, const float* shift,
                              int32_t* nan, int64_t B, int64_t C, int64_t T, int64_t S, cudaStream_t stream) {
  if (B * C * T * S == 0) return 0;
  switch (type) {
    case FloatType::kFloat32: return denorm<float>(z, out, scale, shift, nan, B, C, T, S, stream);
    case FloatType::kFloat16: return denorm<__half>(z, out, scale, shift, nan, B, C, T, S, stream);
    case FloatType::kBFloat16: return denorm<__nv_bfloat16>(z, out, scale, shift, nan, B, C, T, S, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace vae
}  // namespace sora_kernels
