// Torch glue for rope3d on the CPU (rope3d_cpu.h): checks naming the argument, allocation,
// registration (included by csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/rope3d_cpu.h"

namespace sora_kernels {
namespace attention {

// x [N, H, D] float32, positions int32 [N, 3], inv_freq float32 [D / 2] (pair i's frequency),
// sections (t, h, w) features per axis -> x rotated (inverse: rotated back).
inline at::Tensor rope3d(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq,
                         at::IntArrayRef sections, bool inverse) {
  TORCH_CHECK(x.dim() == 3, "x: expected [N, H, D], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x: the cpu kernel runs float32 CPU tensors, got ",
              x.scalar_type(), " on ", x.device());
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(positions.scalar_type() == at::kInt && positions.device().is_cpu() && positions.dim() == 2 &&
                  positions.size(0) == N && positions.size(1) == 3,
              "positions: expected int32 [", N, ", 3] on the CPU, got ", positions.scalar_type(), " ",
              positions.sizes(), " on ", positions.device());
  TORCH_CHECK(sections.size() == 3, "sections: expected 3 (t, h, w), got ", sections.size());
  int64_t sum = 0;
  for (const int64_t s : sections) {
    TORCH_CHECK(s >= 0 && s % 2 == 0, "sections: expected non-negative even counts, got ", sections);
    sum += s;
  }
  TORCH_CHECK(sum == D, "sections: expected (t, h, w) summing to the head dim ", D, ", got ", sections);
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.device().is_cpu() && inv_freq.dim() == 1 &&
                  inv_freq.size(0) == D / 2,
              "inv_freq: expected float32 [", D / 2, "] on the CPU, got ", inv_freq.scalar_type(), " ",
              inv_freq.sizes(), " on ", inv_freq.device());
  const at::Tensor xc = x.contiguous(), pc = positions.contiguous(), fc = inv_freq.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t s3[3] = {sections[0], sections[1], sections[2]};
  rope3d_cpu(xc.data_ptr<float>(), pc.data_ptr<int32_t>(), fc.data_ptr<float>(), s3, N, H, D, inverse,
             out.data_ptr<float>());
  return out;
}

inline void define_rope3d(torch::Library& m) {
  // x [N, H, D], positions int32 [N, 3], inv_freq float32 [D / 2], sections (t, h, w) -> [N, H, D]
  m.def("rope3d(Tensor x, Tensor positions, Tensor inv_freq, int[] sections, bool inverse) -> Tensor");
}

inline void register_rope3d_cpu(torch::Library& m) { m.impl("rope3d", &rope3d); }

}  // namespace attention
}  // namespace sora_kernels
