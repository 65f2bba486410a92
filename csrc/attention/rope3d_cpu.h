// 3D rotary position embedding on the CPU (fp32, OpenMP), no torch headers.
#pragma once

#include <cstdint>

namespace sora_kernels {
namespace attention {

// out[n, h, 2i : 2i + 2] = (x0 c - x1 s, x1 c + x0 s) with (x0, x1) = x[n, h, 2i : 2i + 2] and
// c, s = cos, sin(float(positions[n, a]) * inv_freq[i]), where pair i belongs to axis a: the
// first sections[0] / 2 pairs to t, the next sections[1] / 2 to h, the last sections[2] / 2 to
// w. inverse: s -> -s (the opposite rotation, which is also the backward). x and out
// [N, H, D] contiguous (out may be x), D = sections[0] + sections[1] + sections[2] even;
// positions int32 [N, 3].
void rope3d_cpu(const float* x, const int32_t* positions, const float* inv_freq, const int64_t sections[3],
                int64_t N, int64_t H, int64_t D, bool inverse, float* out);

}  // namespace attention
}  // namespace sora_kernels
