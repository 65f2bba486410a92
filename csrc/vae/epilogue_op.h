// Torch glue for the decoder's epilogues (epilogue_cpu.h): schemas, argument checks naming
// the argument, output allocation, the CPU registration (included by csrc/ops.cpp). The CUDA
// registration is in epilogue_cuda_ops.cpp and shares the checks.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "vae/epilogue_cpu.h"

namespace sora_kernels {
namespace vae {

inline void define_epilogues(torch::Library& m) {
  // video [C, T, H, W] float -> uint8 [T, H, W, C]: round((clamp(v, -1, 1) + 1) * 127.5) half to even
  m.def("frames_to_uint8(Tensor video) -> Tensor");
  // z [B, C, T, h, w], scale / shift float32 [C] -> (z * scale + shift, int32 count of NaN / +-Inf [B, T])
  m.def("latent_denorm(Tensor z, Tensor scale, Tensor shift) -> (Tensor, Tensor)");
}

inline void check_frames(const at::Tensor& video, bool float32_only) {
  TORCH_CHECK(video.dim() == 4, "video: expected [C, T, H, W], got ", video.sizes());
  const auto t = video.scalar_type();
  TORCH_CHECK(t == at::kFloat || (!float32_only && (t == at::kHalf || t == at::kBFloat16)),
              "video: expected ", float32_only ? "float32 (the cpu kernel)" : "float32, float16 or bfloat16",
              ", got ", t);
}

inline void check_latent(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift, bool float32_only) {
  TORCH_CHECK(z.dim() == 5, "z: expected [B, C, T, h, w], got ", z.sizes());
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || (!float32_only && (t == at::kHalf || t == at::kBFloat16)),
              "z: expected ", float32_only ? "float32 (the cpu kernel)" : "float32, float16 or bfloat16", ", got ", t);
  for (const auto& [v, name] : {std::pair{&scale, "scale"}, std::pair{&shift, "shift"}}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == z.size(1), name,
                ": expected float32 [", z.size(1), "], got ", v->scalar_type(), " ", v->sizes());
    TORCH_CHECK(v->device() == z.device(), name, ": expected it on z's device ", z.device(), ", got ", v->device());
  }
}

inline at::Tensor frames_to_uint8_cpu_op(const at::Tensor& video) {
  check_frames(video, /*float32_only=*/true);
  const int64_t C = video.size(0), P = video.size(1) * video.size(2) * video.size(3);
  // A channels-last decode's frames ([3, T, H, W] with the strides of [T, H, W, 3]) are read
  // where they are; any other layout is made contiguous first.
  const bool last = video.stride(0) == 1 && video.permute({1, 2, 3, 0}).is_contiguous();
  const at::Tensor x = last ? video : video.contiguous();
  at::Tensor out = at::empty({x.size(1), x.size(2), x.size(3), C}, x.options().dtype(at::kByte));
  frames_to_uint8_cpu(x.data_ptr<float>(), out.data_ptr<uint8_t>(), C, P, last ? 1 : P, last ? C : 1);
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> latent_denorm_cpu_op(const at::Tensor& z, const at::Tensor& scale,
                                                               const at::Tensor& shift) {
  check_latent(z, scale, shift, /*float32_only=*/true);
  const at::Tensor zc = z.contiguous(), k = scale.contiguous(), m = shift.contiguous();
  at::Tensor out = at::empty_like(zc);
  at::Tensor nan = at::empty({z.size(0), z.size(2)}, z.options().dtype(at::kInt));
  latent_denorm_cpu(zc.data_ptr<float>(), out.data_ptr<float>(), k.data_ptr<float>(), m.data_ptr<float>(),
                    nan.data_ptr<int32_t>(), z.size(0), z.size(1), z.size(2), z.size(3) * z.size(4));
  return {out, nan};
}

inline void register_epilogues_cpu(torch::Library& m) {
  m.impl("frames_to_uint8", frames_to_uint8_cpu_op);
  m.impl("latent_denorm", latent_denorm_cpu_op);
}

}  // namespace vae
}  // namespace sora_kernels
