// CUDA implementations of the group_norm schemas declared in csrc/ops.cpp (group_norm_op.h):
// argument checks naming the argument, the layout (channels-last-3d kept, anything else made
// contiguous, as the CPU op), the plan (group_norm_cuda_plan.h), outputs and workspace, and the
// sums of the backward's per-piece channel sums into dweight / dbias.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "vae/group_norm_cuda.h"
#include "vae/group_norm_op.h"

namespace sora_kernels {
namespace {

struct CudaPrepared {
  at::Tensor x;                        // x in the layout the kernels read
  std::optional<at::Tensor> weight, bias;  // float32 contiguous copies
  vae::GnShape shape{};
  vae::FloatType type = vae::FloatType::kFloat32;
};

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, ": expected it on x's device ", x.device(), ", got ", t.device());
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 5, "x: expected [B, C, T, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
}

// Called under a CUDAGuard of x's device (check_x first).
CudaPrepared prepare_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, int64_t num_groups) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "x: the cuda kernels run float32, float16 or bfloat16, got ", t);
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "num_groups: expected a divisor of C=", C, ", got ", num_groups);
  CudaPrepared p;
  p.type = t == at::kFloat ? vae::FloatType::kFloat32 : t == at::kHalf ? vae::FloatType::kFloat16
                                                                       : vae::FloatType::kBFloat16;
  const bool channels_last = vae::is_channels_last(x);
  p.x = vae::dense_layout(x, channels_last);
  for (const auto& [src, dst, name] : {std::tuple{&weight, &p.weight, "weight"}, std::tuple{&bias, &p.bias, "bias"}}) {
    if (!src->has_value()) continue;
    const at::Tensor& v = **src;
    TORCH_CHECK(v.is_floating_point() && v.dim() == 1 && v.size(0) == C, name, ": expected a floating-point [", C,
                "], got ", v.scalar_type(), " ", v.sizes());
    check_same_device(v, x, name);
    *dst = v.to(at::kFloat).contiguous();
  }
  const at::Tensor& xc = p.x;
  vae::GnShape& s = p.shape;
  s.batch = x.size(0);
  s.channels = C;
  s.frames = x.size(2);
  s.positions = x.size(3) * x.size(4);
  s.groups = num_groups;
  s.stride_b = xc.stride(0);
  s.stride_c = xc.stride(1);
  s.stride_t = xc.stride(2);
  // Position s = h * W + w at s * stride_s: stride(4), or stride(3) when W == 1 (the stride of
  // a length-1 dimension can be anything in a dense tensor).
  s.stride_s = x.size(4) > 1 ? xc.stride(4) : xc.stride(3);
  s.channels_last = channels_last;
  // What the kernels index by: positions (contiguous) or channels (channels-last) at unit stride.
  TORCH_CHECK(x.size(3) <= 1 || x.size(4) <= 1 || xc.stride(3) == x.size(4) * xc.stride(4),
              "x: internal error, positions of a frame are not evenly strided: ", xc.strides());
  TORCH_CHECK(channels_last ? (C <= 1 || xc.stride(1) == 1) : (s.positions <= 1 || s.stride_s == 1),
              "x: internal error, unexpected strides ", xc.strides(), " for the ",
              channels_last ? "channels-last" : "contiguous", " kernels");
  return p;
}

// Whether two tensors of x's sizes have the same strides along every dimension longer than 1.
bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

const float* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void check_launch(int err, const char* what, const vae::GnPlan& plan) {
  TORCH_CHECK(err == 0, "group_norm ", what, " kernels failed to launch: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)), " (", plan.blocks, " blocks of ", plan.pieces,
              " pieces)");
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// -> (y [B, C, T, H, W] in x's layout, mean float32 [B, T, G], rstd float32 [B, T, G])
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward_cuda(const at::Tensor& x,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      int64_t num_groups, double eps, bool silu) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaPrepared p = prepare_cuda(x, weight, bias, num_groups);
  at::Tensor y = at::empty_like(p.x);
  const auto stat_options = x.options().dtype(at::kFloat);
  if (x.numel() == 0) {
    at::Tensor zeros = at::zeros({x.size(0), x.size(2), num_groups}, stat_options);
    return {y, zeros, zeros.clone()};
  }
  at::Tensor mean = at::empty({x.size(0), x.size(2), num_groups}, stat_options), rstd = at::empty_like(mean);
  const auto address = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
  const int vec = vae::gn_vector_width(p.shape, static_cast<int>(x.element_size()), {address(p.x), address(y)});
  const vae::GnPlan plan = vae::gn_plan(p.shape, vec, sm_count());
  at::Tensor workspace = at::empty({vae::gn_workspace_floats(p.shape, plan)}, stat_options);
  const int err = vae::launch_group_norm_forward_cuda(
      p.type, p.shape, plan, p.x.data_ptr(), data_or_null(p.weight), data_or_null(p.bias), static_cast<float>(eps),
      silu, y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), workspace.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream());
  check_launch(err, "forward", plan);
  return {y, mean, rstd};
}

// -> (dx in x's layout, dweight float32 [C] or [0], dbias float32 [C] or [0])
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaPrepared p = prepare_cuda(x, weight, bias, num_groups);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.sizes() == x.sizes(), "dy: expected ", x.scalar_type(), " ",
              x.sizes(), " like x, got ", dy.scalar_type(), " ", dy.sizes());
  check_same_device(dy, x, "dy");
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2);
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == B * T * num_groups, name, ": expected float32 [", B,
                ", ", T, ", ", num_groups, "], got ", t->scalar_type(), " ", t->sizes());
    check_same_device(*t, x, name);
  }
  const at::Tensor dyc = vae::dense_layout(dy, p.shape.channels_last);
  TORCH_CHECK(same_strides(dyc, p.x), "dy: internal error, strides ", dyc.strides(), " differ from x's ",
              p.x.strides());
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor dx = at::empty_like(p.x);
  const auto stat_options = x.options().dtype(at::kFloat);
  at::Tensor dweight = at::zeros({weight.has_value() ? C : 0}, stat_options);
  at::Tensor dbias = at::zeros({bias.has_value() ? C : 0}, stat_options);
  if (x.numel() == 0) return {dx, dweight, dbias};
  const auto address = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
  const int vec = vae::gn_vector_width(p.shape, static_cast<int>(x.element_size()),
                                       {address(p.x), address(dyc), address(dx)});
  const vae::GnPlan plan = vae::gn_plan(p.shape, vec, sm_count());
  at::Tensor workspace = at::empty({vae::gn_workspace_floats(p.shape, plan)}, stat_options);
  const int err = vae::launch_group_norm_backward_cuda(
      p.type, p.shape, plan, p.x.data_ptr(), dyc.data_ptr(), data_or_null(p.weight), data_or_null(p.bias),
      mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(), silu, dx.data_ptr(), workspace.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream());
  check_launch(err, "backward", plan);
  if (weight.has_value() || bias.has_value()) {
    // part [B*T, C, pieces, 2]: per piece, each channel's sums of dz and dz * xhat (a fixed-order
    // reduction, as every sum here: the same bits on every run).
    const at::Tensor sums = workspace.narrow(0, 0, vae::gn_part_floats(p.shape, plan))
                                .view({B * T, C, plan.pieces, 2})
                                .sum(at::IntArrayRef{0, 2});  // [C, 2]
    if (weight.has_value()) dweight = sums.select(1, 1).contiguous();
    if (bias.has_value()) dbias = sums.select(1, 0).contiguous();
  }
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(sora_kernels, CUDA, m) {
  m.impl("group_norm", &group_norm_forward_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
}

}  // namespace sora_kernels
