// CUDA implementations of the patchify schemas declared in csrc/ops.cpp:
// plan the tiles on the host, copy the slot table to the device (one small
// copy from pinned memory) and launch one kernel for the whole list.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "patchify_cuda.h"
#include "patchify_op.h"

namespace sora_kernels {
namespace {

using patchify::PatchDims;
using patchify::VideoSlot;

void patchify_engine_cuda(bool pack, std::vector<VideoSlot>& slots, const PatchDims& dims, const at::Tensor& tokens,
                          int32_t* positions) {
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t n = static_cast<int64_t>(slots.size());
  const int64_t es = tokens.element_size();
  int64_t align = patchify::pow2_divisor(reinterpret_cast<int64_t>(tokens.data_ptr()));
  for (const VideoSlot& s : slots)
    align = std::min({align, patchify::pow2_divisor(s.data), patchify::pow2_divisor(s.W * es)});
  patchify::CudaPlan plan = patchify::plan_cuda(dims, es, align);
  TORCH_CHECK(plan.max_tile_tokens >= 1, "patch_size and dtype: tokens of D*itemsize=", dims.dim() * es,
              " bytes per token do not fit the cuda backend's 48 KB shared-memory tile");
  PatchDims p = dims;
  const int64_t tiles = patchify::assign_cuda_tiles(slots.data(), n, p, es, plan);
  at::Tensor host = at::empty({n, static_cast<int64_t>(sizeof(VideoSlot) / sizeof(int64_t))},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr(), slots.data(), n * sizeof(VideoSlot));
  const at::Tensor dev = host.to(tokens.device(), /*non_blocking=*/true);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int err = patchify::launch_patchify_copy_cuda(pack, reinterpret_cast<const VideoSlot*>(dev.data_ptr()), n,
                                                      tiles, p, plan, tokens.data_ptr(), positions, stream);
  TORCH_CHECK(err == 0, "patchify kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)),
              " (", tiles, " tiles)");
}

}  // namespace

TORCH_LIBRARY_IMPL(sora_kernels, CUDA, m) {
  patchify::PatchifyOps<patchify_engine_cuda>::register_impls(m);
}

}  // namespace sora_kernels
