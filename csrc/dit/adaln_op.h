// Torch glue for the adaLN CPU kernels (adaln_cpu.h): argument checks naming the argument,
// output allocation, and the dispatcher registration (included by csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dit/adaln_cpu.h"

namespace sora_kernels {
namespace dit {

inline void check_float_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": the cpu kernels run float32, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == dim, name, ": expected shape [", rows, ", ", dim,
              "], got ", t.sizes());
}

inline const float* optional_rows(const std::optional<at::Tensor>& t, const char* name, int64_t rows, int64_t dim,
                                  std::vector<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  check_float_rows(*t, name, rows, dim);
  keep.push_back(t->contiguous());
  return keep.back().data_ptr<float>();
}

// Every segment id lies in [0, n): the kernels index the per-segment rows (shift, scale, gate)
// with them, so an id out of range would read or write outside those tensors. One O(N) scan
// (a vectorised min / max, then the first bad id for the message), here at the op because the
// op can be called directly and under torch.compile, where the Python checks cannot read values.
inline void check_segment_range(const int32_t* seg, int64_t rows, int64_t n) {
  int32_t lo = 0, hi = 0;
  if (rows > 0) lo = hi = seg[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t r = 0; r < rows; ++r) {
    lo = seg[r] < lo ? seg[r] : lo;
    hi = seg[r] > hi ? seg[r] : hi;
  }
  if (rows == 0 || (lo >= 0 && hi < n)) return;  // no token: no id (and seg may be null)
  int64_t bad = 0;
  while (seg[bad] >= 0 && seg[bad] < n) ++bad;
  TORCH_CHECK(false, "segment_ids: expected ids in [0, ", n, ") (rows of the per-segment [", n, ", D] tensors), got ",
              seg[bad], " at token ", bad);
}

struct Prepared {
  AdaLNArgs args{};
  std::vector<at::Tensor> keep;  // contiguous copies that the raw pointers point into
  int64_t segments = 0;
};

inline Prepared prepare(const at::Tensor& x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& gate,
                        const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& segment_ids,
                        double eps, bool layer) {
  TORCH_CHECK(x.dim() == 2, "x: expected [N, D], got ", x.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  check_float_rows(x, "x", N, D);
  Prepared p;
  p.keep.push_back(x.contiguous());
  p.args.x = p.keep.back().data_ptr<float>();
  TORCH_CHECK(scale.has_value() == shift.has_value(), "shift, scale: expected both or neither");
  TORCH_CHECK(!y.has_value() || (gate.has_value() && scale.has_value()), "y: the residual form needs gate and scale");
  p.segments = scale.has_value() ? scale->size(0) : 0;
  p.args.y = optional_rows(y, "y", N, D, p.keep);
  p.args.gate = optional_rows(gate, "gate", p.segments, D, p.keep);
  p.args.shift = optional_rows(shift, "shift", p.segments, D, p.keep);
  p.args.scale = optional_rows(scale, "scale", p.segments, D, p.keep);
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->dim() == 1 && weight->size(0) == D,
                "weight: expected float32 [", D, "], got ", weight->scalar_type(), " ", weight->sizes());
    p.keep.push_back(weight->contiguous());
    p.args.weight = p.keep.back().data_ptr<float>();
  }
  if (segment_ids.has_value()) {
    TORCH_CHECK(segment_ids->scalar_type() == at::kInt && segment_ids->dim() == 1 && segment_ids->size(0) == N,
                "segment_ids: expected int32 [", N, "], got ", segment_ids->scalar_type(), " ", segment_ids->sizes());
    TORCH_CHECK(segment_ids->device().is_cpu(), "segment_ids: expected a CPU tensor, got ", segment_ids->device());
    p.keep.push_back(segment_ids->contiguous());
    p.args.seg = p.keep.back().data_ptr<int32_t>();  // null when N == 0
  }
  // has_value, not the pointer: an empty tensor's data pointer is null (an empty batch).
  TORCH_CHECK(!scale.has_value() || segment_ids.has_value(), "segment_ids: required with shift and scale");
  if (scale.has_value()) check_segment_range(p.args.seg, N, p.segments);
  p.args.rows = N;
  p.args.dim = D;
  p.args.eps = static_cast<float>(eps);
  p.args.layer = layer;
  return p;
}

// -> (h [N, D] or [0], out [N, D], mean [N] or [0], rstd [N])
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& segment_ids, double eps, bool layer) {
  Prepared p = prepare(x, y, gate, shift, scale, weight, segment_ids, eps, layer);
  const int64_t N = p.args.rows, D = p.args.dim;
  auto opts = x.options();
  at::Tensor h = at::empty({y.has_value() ? N : 0, D}, opts), out = at::empty({N, D}, opts);
  at::Tensor mean = at::empty({layer ? N : 0}, opts), rstd = at::empty({N}, opts);
  adaln_forward_cpu(p.args, y.has_value() ? h.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                    layer ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>());
  return {h, out, mean, rstd};
}

// -> [dx, dy, dgate, dshift, dscale, dweight], absent ones as empty tensors
inline std::vector<at::Tensor> adaln_backward(
    const at::Tensor& x, const at::Tensor& dout, const std::optional<at::Tensor>& dh,
    const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& segment_ids, const at::Tensor& mean, const at::Tensor& rstd, bool layer) {
  Prepared p = prepare(x, y, gate, shift, scale, weight, segment_ids, 0.0, layer);
  const int64_t N = p.args.rows, D = p.args.dim, n = p.segments;
  check_float_rows(dout, "dout", N, D);
  at::Tensor dout_c = dout.contiguous();
  std::vector<at::Tensor> keep;
  const float* dh_ptr = optional_rows(dh, "dh", N, D, keep);
  TORCH_CHECK(!y.has_value() || dh_ptr, "dh: required with y");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == N, "rstd: expected float32 [", N, "]");
  TORCH_CHECK(!layer || (mean.scalar_type() == at::kFloat && mean.numel() == N), "mean: expected float32 [", N, "]");
  at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  auto opts = x.options();
  at::Tensor dx = at::empty({N, D}, opts), dy = at::empty({y.has_value() ? N : 0, D}, opts);
  at::Tensor dgate = at::zeros({y.has_value() ? n : 0, D}, opts);
  at::Tensor dshift = at::zeros({n, D}, opts), dscale = at::zeros({n, D}, opts);
  at::Tensor dweight = at::zeros({weight.has_value() ? D : 0}, opts);
  AdaLNGrads g{dx.data_ptr<float>(), y.has_value() ? dy.data_ptr<float>() : nullptr,
               y.has_value() ? dgate.data_ptr<float>() : nullptr, n ? dshift.data_ptr<float>() : nullptr,
               n ? dscale.data_ptr<float>() : nullptr, weight.has_value() ? dweight.data_ptr<float>() : nullptr};
  adaln_backward_cpu(p.args, dout_c.data_ptr<float>(), dh_ptr, layer ? mean_c.data_ptr<float>() : nullptr,
                     rstd_c.data_ptr<float>(), n, g);
  return {dx, dy, dgate, dshift, dscale, dweight};
}

inline void define_adaln(torch::Library& m) {
  // adaLN of packed rows x [N, D]: optional gated residual (y, gate), modulation (shift, scale per
  // segment, segment_ids [N]) and weight -> (h, out, mean, rstd); absent outputs are empty.
  m.def("adaln(Tensor x, Tensor? y, Tensor? gate, Tensor? shift, Tensor? scale, Tensor? weight, "
        "Tensor? segment_ids, float eps, bool layer) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> [dx, dy, dgate, dshift, dscale, dweight]; x is what was normalised (h with y)
  m.def("adaln_backward(Tensor x, Tensor dout, Tensor? dh, Tensor? y, Tensor? gate, Tensor? shift, Tensor? scale, "
        "Tensor? weight, Tensor? segment_ids, Tensor mean, Tensor rstd, bool layer) -> Tensor[]");
}

inline void register_adaln_cpu(torch::Library& m) {
  m.impl("adaln", &adaln_forward);
  m.impl("adaln_backward", &adaln_backward);
}

}  // namespace dit
}  // namespace sora_kernels
