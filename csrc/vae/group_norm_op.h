// Torch glue for the per-frame GroupNorm (+ SiLU) CPU kernels (group_norm_cpu.h): argument
// checks naming the argument, layout handling, output allocation, and the dispatcher
// registration (included by csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "vae/group_norm_cpu.h"

namespace sora_kernels {
namespace vae {

// x in one of the two layouts the kernels read: channels-last-3d if it already is, else contiguous.
inline at::Tensor dense_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast3d) : t.contiguous();
}

inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !x.is_contiguous();
}

struct Prepared {
  GroupNormArgs args{};
  std::vector<at::Tensor> keep;  // the tensors the raw pointers point into
  bool channels_last = false;
};

// x float32 [B, C, T, H, W] on the CPU, num_groups a divisor of C.
inline void check_video(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(x.dim() == 5, "x: expected [B, C, T, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x: the cpu kernels run float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, "num_groups: expected a divisor of C=", x.size(1),
              ", got ", num_groups);
}

inline Prepared prepare(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool silu) {
  check_video(x, num_groups);
  const int64_t C = x.size(1);
  Prepared p;
  p.channels_last = is_channels_last(x);
  p.keep.push_back(dense_layout(x, p.channels_last));
  const at::Tensor xc = p.keep.back();  // a handle: keep may reallocate below
  p.args.x = xc.data_ptr<float>();
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->scalar_type() == at::kFloat && (*t)->dim() == 1 && (*t)->size(0) == C, name,
                ": expected float32 [", C, "], got ", (*t)->scalar_type(), " ", (*t)->sizes());
    p.keep.push_back((*t)->contiguous());
  }
  size_t i = 1;
  p.args.weight = weight.has_value() ? p.keep[i++].data_ptr<float>() : nullptr;
  p.args.bias = bias.has_value() ? p.keep[i++].data_ptr<float>() : nullptr;
  p.args.batch = x.size(0);
  p.args.channels = C;
  p.args.frames = x.size(2);
  p.args.positions = x.size(3) * x.size(4);
  p.args.stride_b = xc.stride(0);
  p.args.stride_c = xc.stride(1);
  p.args.stride_t = xc.stride(2);
  p.args.stride_s = xc.stride(4);
  p.args.groups = num_groups;
  p.args.eps = static_cast<float>(eps);
  p.args.silu = silu;
  return p;
}

// -> (y [B, C, T, H, W] in x's layout, mean [B, T, G], rstd [B, T, G])
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, bool silu) {
  Prepared p = prepare(x, weight, bias, num_groups, eps, silu);
  at::Tensor y = at::empty_like(p.keep[0]);
  auto opts = x.options();
  at::Tensor mean = at::empty({x.size(0), x.size(2), num_groups}, opts), rstd = at::empty_like(mean);
  if (x.numel() > 0)
    group_norm_forward_cpu(p.args, y.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>());
  return {y, mean, rstd};
}

// mean, rstd as float32 [B, T, G] (any strides), named in errors.
inline std::pair<at::Tensor, at::Tensor> statistics(const at::Tensor& x, const at::Tensor& mean,
                                                    const at::Tensor& rstd, int64_t num_groups) {
  const int64_t B = x.size(0), T = x.size(2);
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == T &&
                    t->size(2) == num_groups && t->device().is_cpu(),
                name, ": expected float32 [", B, ", ", T, ", ", num_groups, "] on the CPU, got ", t->scalar_type(), " ",
                t->sizes(), " on ", t->device());
  }
  return {mean.contiguous(), rstd.contiguous()};
}

// -> y in x's layout, from given statistics mean, rstd [B, T, G]
inline at::Tensor group_norm_apply(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                   const at::Tensor& rstd, int64_t num_groups, bool silu) {
  Prepared p = prepare(x, weight, bias, num_groups, 0.0, silu);
  const auto [mean_c, rstd_c] = statistics(x, mean, rstd, num_groups);
  at::Tensor y = at::empty_like(p.keep[0]);
  if (x.numel() > 0)
    group_norm_apply_cpu(p.args, mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

// -> (dx in x's layout, dweight [C] or [0], dbias [C] or [0]); given: mean and rstd were
// given (group_norm_apply), so they are constants of the gradient.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu, bool given) {
  Prepared p = prepare(x, weight, bias, num_groups, 0.0, silu);
  p.args.given = given;
  TORCH_CHECK(dy.scalar_type() == at::kFloat && dy.sizes() == x.sizes(), "dy: expected float32 ", x.sizes(), ", got ",
              dy.scalar_type(), " ", dy.sizes());
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2);
  const auto [mean_c, rstd_c] = statistics(x, mean, rstd, num_groups);
  at::Tensor dyc = dense_layout(dy, p.channels_last);
  at::Tensor dx = at::empty_like(p.keep[0]);
  at::Tensor rows = at::empty({2, B * T, C}, x.options());
  if (x.numel() > 0) {
    group_norm_backward_cpu(p.args, dyc.data_ptr<float>(), mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(),
                            dx.data_ptr<float>(), rows[0].data_ptr<float>(), rows[1].data_ptr<float>());
  }
  // one sum each: rows.sum(1)[0] and [1] would be views of one tensor, outputs that alias
  // each other, which the op's schema does not declare (torch.library.opcheck refuses them)
  const auto channel_sums = [&](int64_t i) { return B * T > 0 ? rows[i].sum(0) : at::zeros({C}, x.options()); };
  at::Tensor dweight = weight.has_value() ? channel_sums(0) : at::empty({0}, x.options());
  at::Tensor dbias = bias.has_value() ? channel_sums(1) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  return backward(dy, x, weight, bias, mean, rstd, num_groups, silu, false);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_apply_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  return backward(dy, x, weight, bias, mean, rstd, num_groups, silu, true);
}

// -> (mean, m2) float64 [B, T, G] of x [B, C, T, H, W] (any strides: a tile's own pixels)
inline std::tuple<at::Tensor, at::Tensor> group_norm_moments(const at::Tensor& x, int64_t num_groups) {
  check_video(x, num_groups);
  const int64_t C = x.size(1);
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor mean = at::empty({x.size(0), x.size(2), num_groups}, opts), m2 = at::empty_like(mean);
  if (mean.numel() > 0) {
    MomentsArgs a{x.data_ptr<float>(), x.size(0), C, x.size(2), x.size(3), x.size(4),
                  x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4), num_groups};
    group_norm_moments_cpu(a, mean.data_ptr<double>(), m2.data_ptr<double>());
  }
  return {mean, m2};
}

inline void define_group_norm(torch::Library& m) {
  // Per-frame GroupNorm of x [B, C, T, H, W] (statistics per (b, t, group)), affine, optional
  // SiLU -> (y in x's layout, mean [B, T, G], rstd [B, T, G]).
  m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool silu) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (dx, dweight or [0], dbias or [0])
  m.def("group_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");
  // From given statistics mean, rstd [B, T, G] (a tiled decode's whole-frame ones) -> y in
  // x's layout; its backward takes them as constants -> (dx, dweight or [0], dbias or [0]).
  m.def("group_norm_apply(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int num_groups, "
        "bool silu) -> Tensor");
  m.def("group_norm_apply_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");
  // Per (b, t, group) mean and M2 (sum of squared deviations), float64 [B, T, G], of any
  // strided view of x [B, C, T, H, W] (a tile's own pixels, merged across tiles by the caller).
  m.def("group_norm_moments(Tensor x, int num_groups) -> (Tensor, Tensor)");
}

inline void register_group_norm_cpu(torch::Library& m) {
  m.impl("group_norm", &group_norm_forward);
  m.impl("group_norm_backward", &group_norm_backward);
  m.impl("group_norm_apply", &group_norm_apply);
  m.impl("group_norm_apply_backward", &group_norm_apply_backward);
  m.impl("group_norm_moments", &group_norm_moments);
}

}  // namespace vae
}  // namespace sora_kernels
