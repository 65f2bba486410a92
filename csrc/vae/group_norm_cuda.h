// Per-frame GroupNorm (+ SiLU) of video activations [B, C, T, H, W] on CUDA, torch-free (raw
// pointers, a dtype code, a stream): the contract of group_norm_cpu.h for float32, float16 and
// bfloat16 x, with fp32 math and the same saved statistics (mean, rstd per (b, t, group)).
// The glue (group_norm_cuda_ops.cpp) checks arguments, picks the plan (group_norm_cuda_plan.h),
// allocates outputs and the workspace, and sums the backward's per-piece channel sums into
// dweight / dbias.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vae/epilogue_cuda.h"  // FloatType
#include "vae/group_norm_cuda_plan.h"

namespace sora_kernels {
namespace vae {

// x, y: `type`, strides of `s`; weight, bias: float32 [C] or null (ones, zeros); mean, rstd:
// float32 [B*T*G]; workspace: gn_workspace_floats(s, p) floats. Returns a cudaError_t.
int launch_group_norm_forward_cuda(FloatType type, const GnShape& s, const GnPlan& p, const void* x,
                                   const float* weight, const float* bias, float eps, bool silu, void* y, float* mean,
                                   float* rstd, float* workspace, cudaStream_t stream);

// dy, dx: x's type and strides; mean, rstd from the forward. On return the workspace's first
// gn_part_floats(s, p) floats hold part [B*T, C, pieces, 2]: per piece, each channel's sums of
// dz and dz * xhat (dz the gradient of z = xhat * w + b); their sums over frames and pieces are
// dbias and dweight. Returns a cudaError_t.
int launch_group_norm_backward_cuda(FloatType type, const GnShape& s, const GnPlan& p, const void* x, const void* dy,
                                    const float* weight, const float* bias, const float* mean, const float* rstd,
                                    bool silu, void* dx, float* workspace, cudaStream_t stream);

}  // namespace vae
}  // namespace sora_kernels
