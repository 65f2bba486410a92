// Per-frame GroupNorm (+ SiLU) of video activations [B, C, T, H, W], C++ with OpenMP (fp32).
// No torch headers: the glue (group_norm_op.h) checks arguments and converts; CMake builds
// and unit-tests this file alone.
//
// Statistics are taken per (b, t, group) over the group's C/G channels and the frame's
// S = H*W positions, so a frame's output never depends on other frames (what makes chunked
// causal decoding exact).
//   forward:  z = (x - mean) * rstd * weight[c] + bias[c];  y = silu(z) if silu else z
//   backward: dx, and per-(b, t) partial sums for dweight / dbias (the caller sums them)
//   apply:    the forward's z and y from given statistics (a tiled decode's whole-frame ones);
//             its backward is the backward with `given` set: the statistics are constants, so
//             dx = rstd * weight * dz (the group means of dz terms drop out)
//   moments:  per (b, t, group) the mean and M2 (sum of squared deviations) of x over any
//             5-dim strided view (a tile's own pixels), for merging across tiles
// Two layouts, read from the strides: contiguous (position stride 1) and channels-last-3d
// (channel stride 1). y, dy and dx share x's strides.
#pragma once

#include <cstdint>

namespace sora_kernels {
namespace vae {

struct GroupNormArgs {
  const float* x;
  const float* weight;  // [C], or null (ones)
  const float* bias;    // [C], or null (zeros)
  int64_t batch, channels, frames, positions;  // B, C, T, S = H * W
  int64_t stride_b, stride_c, stride_t, stride_s;  // element strides of x (either stride_s or stride_c is 1)
  int64_t groups;
  float eps;
  bool silu;
  bool given = false;  // backward: mean and rstd were given (apply), not computed from x
};

// y with x's strides; mean, rstd [B, T, G].
void group_norm_forward_cpu(const GroupNormArgs& a, float* y, float* mean, float* rstd);

// dy and dx with x's strides; dweight_rows, dbias_rows [B * T, C]: each frame's sums of
// dz * xhat and dz (dz the gradient of z), summed over frames by the caller.
void group_norm_backward_cpu(const GroupNormArgs& a, const float* dy, const float* mean, const float* rstd,
                             float* dx, float* dweight_rows, float* dbias_rows);

// y with x's strides from given mean, rstd [B, T, G] (eps unused).
void group_norm_apply_cpu(const GroupNormArgs& a, const float* mean, const float* rstd, float* y);

struct MomentsArgs {
  const float* x;
  int64_t batch, channels, frames, height, width;  // B, C, T, H, W
  int64_t stride_b, stride_c, stride_t, stride_h, stride_w;  // element strides of x (any)
  int64_t groups;
};

// mean and m2 [B, T, G] in double: over each (b, t, group)'s C/G channels and H x W positions.
void group_norm_moments_cpu(const MomentsArgs& a, double* mean, double* m2);

}  // namespace vae
}  // namespace sora_kernels
