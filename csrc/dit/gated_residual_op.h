// Torch glue for the gated residual and activation CPU kernels (gated_residual_cpu.h):
// checks naming the argument, allocation, registration (included by csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dit/adaln_op.h"
#include "dit/gated_residual_cpu.h"

namespace sora_kernels {
namespace dit {

// segment_ids int32 [rows], each id a row of gate [n, D]; returns it contiguous.
inline at::Tensor check_segment_ids(const at::Tensor& seg, int64_t rows, int64_t n) {
  TORCH_CHECK(seg.scalar_type() == at::kInt && seg.dim() == 1 && seg.size(0) == rows, "segment_ids: expected int32 [",
              rows, "], got ", seg.scalar_type(), " ", seg.sizes());
  TORCH_CHECK(seg.device().is_cpu(), "segment_ids: expected a CPU tensor, got ", seg.device());
  at::Tensor contiguous = seg.contiguous();
  check_segment_range(contiguous.data_ptr<int32_t>(), rows, n);
  return contiguous;
}

inline at::Tensor gated_residual_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                                         const at::Tensor& segment_ids) {
  TORCH_CHECK(x.dim() == 2, "x: expected [N, D], got ", x.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  check_float_rows(x, "x", N, D);
  check_float_rows(y, "y", N, D);
  TORCH_CHECK(gate.dim() == 2, "gate: expected [n, D], got ", gate.sizes());
  check_float_rows(gate, "gate", gate.size(0), D);
  at::Tensor sc = check_segment_ids(segment_ids, N, gate.size(0));
  at::Tensor xc = x.contiguous(), yc = y.contiguous(), gc = gate.contiguous();
  at::Tensor out = at::empty({N, D}, x.options());
  gated_residual_forward_cpu(xc.data_ptr<float>(), yc.data_ptr<float>(), gc.data_ptr<float>(), sc.data_ptr<int32_t>(),
                             N, D, out.data_ptr<float>());
  return out;
}

// -> (dy, dgate); dx is dout itself
inline std::tuple<at::Tensor, at::Tensor> gated_residual_backward(const at::Tensor& dout, const at::Tensor& y,
                                                                  const at::Tensor& gate,
                                                                  const at::Tensor& segment_ids) {
  TORCH_CHECK(y.dim() == 2, "y: expected [N, D], got ", y.sizes());
  const int64_t N = y.size(0), D = y.size(1);
  check_float_rows(dout, "dout", N, D);
  check_float_rows(y, "y", N, D);
  TORCH_CHECK(gate.dim() == 2, "gate: expected [n, D], got ", gate.sizes());
  check_float_rows(gate, "gate", gate.size(0), D);
  at::Tensor sc = check_segment_ids(segment_ids, N, gate.size(0));
  at::Tensor dc = dout.contiguous(), yc = y.contiguous(), gc = gate.contiguous();
  at::Tensor dy = at::empty({N, D}, y.options()), dgate = at::zeros(gate.sizes(), gate.options());
  gated_residual_backward_cpu(dc.data_ptr<float>(), yc.data_ptr<float>(), gc.data_ptr<float>(),
                              sc.data_ptr<int32_t>(), N, D, dy.data_ptr<float>(), dgate.data_ptr<float>());
  return {dy, dgate};
}

inline void check_activation(int64_t kind, const at::Tensor& a, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(kind == 0 || kind == 1, "kind: expected 0 (gelu_tanh) or 1 (swiglu), got ", kind);
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.device().is_cpu(), "x: the cpu kernels run float32 CPU tensors, got ",
              a.scalar_type(), " on ", a.device());
  TORCH_CHECK((kind == 1) == b.has_value(), "up: expected with swiglu only");
  TORCH_CHECK(!b.has_value() || (b->sizes() == a.sizes() && b->scalar_type() == at::kFloat),
              "up: expected float32 of shape ", a.sizes());
}

inline at::Tensor activation_forward(int64_t kind, const at::Tensor& a, const std::optional<at::Tensor>& b) {
  check_activation(kind, a, b);
  at::Tensor ac = a.contiguous(), bc = b.has_value() ? b->contiguous() : at::Tensor();
  at::Tensor out = at::empty(a.sizes(), a.options());
  activation_cpu(static_cast<int>(kind), ac.data_ptr<float>(), b.has_value() ? bc.data_ptr<float>() : nullptr,
                 nullptr, a.numel(), out.data_ptr<float>(), nullptr);
  return out;
}

// -> (da, db) with db empty for gelu_tanh
inline std::tuple<at::Tensor, at::Tensor> activation_backward(int64_t kind, const at::Tensor& dout, const at::Tensor& a,
                                                              const std::optional<at::Tensor>& b) {
  check_activation(kind, a, b);
  TORCH_CHECK(dout.sizes() == a.sizes() && dout.scalar_type() == at::kFloat, "dout: expected float32 of shape ",
              a.sizes());
  at::Tensor ac = a.contiguous(), dc = dout.contiguous(), bc = b.has_value() ? b->contiguous() : at::Tensor();
  at::Tensor da = at::empty(a.sizes(), a.options());
  at::Tensor db = at::empty(b.has_value() ? a.sizes() : at::IntArrayRef{0}, a.options());
  activation_cpu(static_cast<int>(kind), ac.data_ptr<float>(), b.has_value() ? bc.data_ptr<float>() : nullptr,
                 dc.data_ptr<float>(), a.numel(), da.data_ptr<float>(),
                 b.has_value() ? db.data_ptr<float>() : nullptr);
  return {da, db};
}

inline void define_gated_residual(torch::Library& m) {
  // x + gate[segment_ids] * y for rows [N, D], gate [n, D]
  m.def("gated_residual(Tensor x, Tensor y, Tensor gate, Tensor segment_ids) -> Tensor");
  // -> (dy, dgate)
  m.def("gated_residual_backward(Tensor dout, Tensor y, Tensor gate, Tensor segment_ids) -> (Tensor, Tensor)");
  // kind 0: gelu_tanh(a); kind 1: silu(a) * b
  m.def("activation(int kind, Tensor a, Tensor? b) -> Tensor");
  // -> (da, db), db empty for gelu_tanh
  m.def("activation_backward(int kind, Tensor dout, Tensor a, Tensor? b) -> (Tensor, Tensor)");
}

inline void register_gated_residual_cpu(torch::Library& m) {
  m.impl("gated_residual", &gated_residual_forward);
  m.impl("gated_residual_backward", &gated_residual_backward);
  m.impl("activation", &activation_forward);
  m.impl("activation_backward", &activation_backward);
}

}  // namespace dit
}  // namespace sora_kernels
