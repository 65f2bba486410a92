// The video decoder's epilogues on CUDA, torch-free (raw pointers, a dtype code, a stream):
// the same contracts as epilogue_cpu.h for float32, float16 and bfloat16 inputs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sora_kernels {
namespace vae {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x: C planes of P positions -> out: P rows of C bytes. Returns a cudaError_t.
int launch_frames_to_uint8_cuda(const void* x, FloatType type, uint8_t* out, int64_t C, int64_t P,
                                cudaStream_t stream);

// z, out: [B, C, T, S] of `type`; scale, shift: float32 [C]; nan: int32 [B, T], zeroed by the
// caller. Returns a cudaError_t.
int launch_latent_denorm_cuda(const void* z, void* out, FloatType type, const float* scale, const float* shift,
                              int32_t* nan, int64_t B, int64_t C, int64_t T, int64_t S, cudaStream_t stream);

}  // namespace vae
}  // namespace sora_kernels
