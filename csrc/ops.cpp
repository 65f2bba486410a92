// The sora_kernels operator library: every schema, and the CPU implementations.
// CUDA implementations of the same schemas are registered in the .cpp files
// next to each op's .cu (compiled only in CUDA builds).
#include <torch/library.h>

#include "attention/rope3d_op.h"
#include "attention/varlen_attention_op.h"
#include "dit/adaln_op.h"
#include "dit/gated_residual_op.h"
#include "patchify/patchify_cpu.h"
#include "patchify/patchify_op.h"
#include "vae/epilogue_op.h"
#include "vae/group_norm_op.h"

namespace sora_kernels {
namespace {

using patchify::PatchDims;
using patchify::VideoSlot;

void patchify_engine_cpu(bool pack, std::vector<VideoSlot>& slots, const PatchDims& p, const at::Tensor& tokens,
                         int32_t* positions) {
  const int64_t n = static_cast<int64_t>(slots.size());
  const int64_t rows = patchify::assign_cpu_rows(slots.data(), n, p);
  patchify::patchify_copy_cpu(pack, slots.data(), n, rows, p, tokens.element_size(), tokens.data_ptr(), positions);
}

}  // namespace

TORCH_LIBRARY(sora_kernels, m) {
  // x [B, C, T, H, W] -> tokens [B, L, C*pt*ph*pw]
  m.def("patchify3d(Tensor x, int[] patch_size) -> Tensor");
  // tokens [B, L, D] -> x [B, C, T, H, W], grid = (T/pt, H/ph, W/pw)
  m.def("unpatchify3d(Tensor tokens, int[] patch_size, int[] grid) -> Tensor");
  // videos: list of [C, Ti, Hi, Wi] -> tokens [N, D], positions int32 [N, 3] (t, h, w)
  m.def("pack_patchify(Tensor[] videos, int[] patch_size) -> (Tensor, Tensor)");
  // tokens [N, D] -> list of [C, Ti, Hi, Wi]; sizes = (T0, H0, W0, T1, H1, W1, ...)
  m.def("unpack_unpatchify(Tensor tokens, int[] patch_size, int[] sizes) -> Tensor[]");
  attention::define_varlen_attention(m);
  attention::define_rope3d(m);
  dit::define_adaln(m);
  dit::define_gated_residual(m);
  vae::define_group_norm(m);
  vae::define_epilogues(m);
}

TORCH_LIBRARY_IMPL(sora_kernels, CPU, m) {
  patchify::PatchifyOps<patchify_engine_cpu>::register_impls(m);
  attention::register_varlen_attention_cpu(m);
  attention::register_rope3d_cpu(m);
  dit::register_adaln_cpu(m);
  dit::register_gated_residual_cpu(m);
  vae::register_group_norm_cpu(m);
  vae::register_epilogues_cpu(m);
}

}  // namespace sora_kernels
