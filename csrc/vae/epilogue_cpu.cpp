// The decoder's epilogues on CPU (epilogue_cpu.h), OpenMP over positions / (batch, frame).
#include "vae/epilogue_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace sora_kernels {
namespace vae {

void frames_to_uint8_cpu(const float* x, uint8_t* out, int64_t C, int64_t P, int64_t c_stride, int64_t p_stride) {
  constexpr int64_t kBlock = 4096;  // positions per task: C planes of 16 KB read, C * 4 KB written
#pragma omp parallel for schedule(static)
  for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
    const int64_t p1 = std::min(P, p0 + kBlock);
    for (int64_t c = 0; c < C; ++c) {
      const float* plane = x + c * c_stride;
      for (int64_t p = p0; p < p1; ++p) {
        // The reference's order: clamp, + 1, * 127.5 (each rounded), then round half to even
        // (std::nearbyint in the default rounding mode). NaN fails both compares and becomes
        // -1 (byte 0): defined here, where torch's cast of a NaN is not.
        const float e = plane[p * p_stride];
        const float v = ((e > -1.0f ? (e < 1.0f ? e : 1.0f) : -1.0f) + 1.0f) * 127.5f;
        out[p * C + c] = static_cast<uint8_t>(std::nearbyint(v));
      }
    }
  }
}

void latent_denorm_cpu(const float* z, float* out, const float* scale, const float* shift, int32_t* nan, int64_t B,
                       int64_t C, int64_t T, int64_t S) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      int32_t count = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t base = ((b * C + c) * T + t) * S;
        const float k = scale[c], m = shift[c];
        for (int64_t s = 0; s < S; ++s) {
          const float v = z[base + s];
          count += !(std::fabs(v) <= std::numeric_limits<float>::max());  // NaN or +-Inf
          out[base + s] = v * k + m;
        }
      }
      nan[b * T + t] = count;
    }
}

}  // namespace vae
}  // namespace sora_kernels
