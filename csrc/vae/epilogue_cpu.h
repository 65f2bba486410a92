// The video decoder's epilogues on CPU, torch-free (raw pointers and sizes; float32):
//   frames_to_uint8: x [C, P] (P = T * H * W; element (c, p) at x[c * c_stride + p * p_stride]:
//     planes (P, 1), or channels-last frames (1, C)) -> bytes out [P, C]:
//     round((clamp(x, -1, 1) + 1) * 127.5) half to even (torch.round's rule);
//   latent_denorm: z [B, C, T, S] -> out = z * scale[c] + shift[c], nan[b, t] = count of
//   non-finite values (NaN, +-Inf).
#pragma once

#include <cstdint>

namespace sora_kernels {
namespace vae {

void frames_to_uint8_cpu(const float* x, uint8_t* out, int64_t C, int64_t P, int64_t c_stride, int64_t p_stride);

void latent_denorm_cpu(const float* z, float* out, const float* scale, const float* shift, int32_t* nan, int64_t B,
                       int64_t C, int64_t T, int64_t S);

}  // namespace vae
}  // namespace sora_kernels
