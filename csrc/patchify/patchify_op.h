// Torch-side implementation of the four patchify ops, shared by the CPU and
// CUDA registrations. Checks inputs (naming the argument), describes each video
// as a VideoSlot, allocates outputs, and hands the copy to a device's engine:
//   void engine(bool pack, std::vector<VideoSlot>& slots, const PatchDims& p,
//               const at::Tensor& tokens, int32_t* positions /* [N, 3] or nullptr */);
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "patchify_index.h"

namespace sora_kernels {
namespace patchify {

inline PatchDims check_patch(at::IntArrayRef patch_size, int64_t C) {
  TORCH_CHECK(C >= 1, "channels: expected C >= 1 (tokens: D a positive multiple of pt*ph*pw), got C=", C);
  TORCH_CHECK(patch_size.size() == 3, "patch_size: expected 3 values (pt, ph, pw), got ", patch_size.size());
  for (const auto i : c10::irange(3))
    TORCH_CHECK(patch_size[i] > 0, "patch_size[", i, "]: expected a positive size, got ", patch_size[i]);
  return PatchDims{C, patch_size[0], patch_size[1], patch_size[2]};
}

// `index` < 0: the argument is a single tensor (no "[i]" in the message).
inline void check_divisible(const char* name, int64_t index, int64_t T, int64_t H, int64_t W, const PatchDims& p) {
  const int64_t sizes[3] = {T, H, W}, patch[3] = {p.pt, p.ph, p.pw};
  const char* axes[3] = {"T", "H", "W"};
  const std::string arg = index < 0 ? std::string(name) : c10::str(name, "[", index, "]");
  for (const auto a : c10::irange(3)) {
    TORCH_CHECK(sizes[a] > 0, arg, ": expected ", axes[a], " > 0, got ", sizes[a]);
    TORCH_CHECK(sizes[a] % patch[a] == 0, arg, ": ", axes[a], "=", sizes[a],
                " is not divisible by patch_size[", a, "]=", patch[a]);
  }
}

inline VideoSlot make_slot(void* data, int64_t T, int64_t H, int64_t W, int64_t token_offset) {
  return VideoSlot{reinterpret_cast<int64_t>(data), T, H, W, token_offset, 0, 1, 1};
}

inline int64_t video_tokens(int64_t T, int64_t H, int64_t W, const PatchDims& p) {
  return (T / p.pt) * (H / p.ph) * (W / p.pw);
}

// Returns (tokens [N, D], positions int32 [N, 3]).
template <typename Engine>
std::tuple<at::Tensor, at::Tensor> pack_patchify_impl(at::TensorList videos, at::IntArrayRef patch_size,
                                                      Engine engine) {
  TORCH_CHECK(!videos.empty(), "videos: expected at least one video, got an empty list");
  const at::Tensor& first = videos[0];
  TORCH_CHECK(first.dim() == 4, "videos[0]: expected 4 dims [C, T, H, W], got ", first.sizes());
  const PatchDims p = check_patch(patch_size, first.size(0));
  std::vector<at::Tensor> contiguous;
  std::vector<VideoSlot> slots;
  contiguous.reserve(videos.size());
  slots.reserve(videos.size());
  int64_t N = 0;
  for (const auto v : c10::irange(videos.size())) {
    const at::Tensor& x = videos[v];
    TORCH_CHECK(x.dim() == 4, "videos[", v, "]: expected 4 dims [C, T, H, W], got ", x.sizes());
    TORCH_CHECK(x.size(0) == p.C, "videos[", v, "]: expected C=", p.C, " channels like videos[0], got ", x.size(0));
    TORCH_CHECK(x.scalar_type() == first.scalar_type(), "videos[", v, "]: expected dtype ", first.scalar_type(),
                " like videos[0], got ", x.scalar_type());
    TORCH_CHECK(x.device() == first.device(), "videos[", v, "]: expected device ", first.device(),
                " like videos[0], got ", x.device());
    check_divisible("videos", v, x.size(1), x.size(2), x.size(3), p);
    contiguous.push_back(x.contiguous());
    slots.push_back(make_slot(contiguous.back().data_ptr(), x.size(1), x.size(2), x.size(3), N));
    N += video_tokens(x.size(1), x.size(2), x.size(3), p);
  }
  at::Tensor tokens = at::empty({N, p.dim()}, first.options());
  at::Tensor positions = at::empty({N, 3}, first.options().dtype(at::kInt));
  engine(true, slots, p, tokens, positions.data_ptr<int32_t>());
  return {tokens, positions};
}

template <typename Engine>
std::vector<at::Tensor> unpack_unpatchify_impl(const at::Tensor& tokens, at::IntArrayRef patch_size,
                                               at::IntArrayRef sizes, Engine engine) {
  TORCH_CHECK(tokens.dim() == 2, "tokens: expected 2 dims [N, D], got ", tokens.sizes());
  TORCH_CHECK(!sizes.empty() && sizes.size() % 3 == 0,
              "sizes: expected (T, H, W) for each video, a non-empty multiple of 3 values, got ", sizes.size());
  const PatchDims unit = check_patch(patch_size, 1);
  const int64_t per_channel = unit.pt * unit.ph * unit.pw;
  TORCH_CHECK(tokens.size(1) % per_channel == 0, "tokens: expected D divisible by pt*ph*pw=", per_channel,
              ", got D=", tokens.size(1));
  const PatchDims p{tokens.size(1) / per_channel, unit.pt, unit.ph, unit.pw};
  const at::Tensor tok = tokens.contiguous();
  const int64_t n = static_cast<int64_t>(sizes.size()) / 3;
  std::vector<at::Tensor> videos;
  std::vector<VideoSlot> slots;
  int64_t N = 0;
  for (const auto v : c10::irange(n)) {
    const int64_t T = sizes[3 * v], H = sizes[3 * v + 1], W = sizes[3 * v + 2];
    check_divisible("sizes", v, T, H, W, p);
    videos.push_back(at::empty({p.C, T, H, W}, tokens.options()));
    slots.push_back(make_slot(videos.back().data_ptr(), T, H, W, N));
    N += video_tokens(T, H, W, p);
  }
  TORCH_CHECK(N == tokens.size(0), "tokens: expected ", N, " tokens for the given sizes, got ", tokens.size(0));
  engine(false, slots, p, tok, nullptr);
  return videos;
}

template <typename Engine>
at::Tensor patchify3d_impl(const at::Tensor& x, at::IntArrayRef patch_size, Engine engine) {
  TORCH_CHECK(x.dim() == 5, "x: expected 5 dims [B, C, T, H, W], got ", x.sizes());
  const PatchDims p = check_patch(patch_size, x.size(1));
  const int64_t B = x.size(0), T = x.size(2), H = x.size(3), W = x.size(4);
  check_divisible("x", -1, T, H, W, p);
  const at::Tensor xc = x.contiguous();
  const int64_t L = video_tokens(T, H, W, p);
  at::Tensor tokens = at::empty({B, L, p.dim()}, x.options());
  std::vector<VideoSlot> slots;
  char* base = static_cast<char*>(xc.data_ptr());
  const int64_t video_bytes = p.C * T * H * W * static_cast<int64_t>(x.element_size());
  for (const auto b : c10::irange(B)) slots.push_back(make_slot(base + b * video_bytes, T, H, W, b * L));
  if (B > 0) engine(true, slots, p, tokens, nullptr);
  return tokens;
}

template <typename Engine>
at::Tensor unpatchify3d_impl(const at::Tensor& tokens, at::IntArrayRef patch_size, at::IntArrayRef grid,
                             Engine engine) {
  TORCH_CHECK(tokens.dim() == 3, "tokens: expected 3 dims [B, L, D], got ", tokens.sizes());
  TORCH_CHECK(grid.size() == 3, "grid: expected 3 values (T/pt, H/ph, W/pw), got ", grid.size());
  const PatchDims unit = check_patch(patch_size, 1);
  const int64_t per_channel = unit.pt * unit.ph * unit.pw;
  TORCH_CHECK(tokens.size(2) % per_channel == 0, "tokens: expected D divisible by pt*ph*pw=", per_channel,
              ", got D=", tokens.size(2));
  const PatchDims p{tokens.size(2) / per_channel, unit.pt, unit.ph, unit.pw};
  for (const auto a : c10::irange(3)) TORCH_CHECK(grid[a] > 0, "grid[", a, "]: expected > 0, got ", grid[a]);
  TORCH_CHECK(grid[0] * grid[1] * grid[2] == tokens.size(1), "tokens: expected L=", grid[0] * grid[1] * grid[2],
              " tokens for grid ", grid, ", got L=", tokens.size(1));
  const int64_t B = tokens.size(0), T = grid[0] * p.pt, H = grid[1] * p.ph, W = grid[2] * p.pw;
  const at::Tensor tok = tokens.contiguous();
  at::Tensor x = at::empty({B, p.C, T, H, W}, tokens.options());
  std::vector<VideoSlot> slots;
  char* base = static_cast<char*>(x.data_ptr());
  const int64_t video_bytes = p.C * T * H * W * static_cast<int64_t>(x.element_size());
  for (const auto b : c10::irange(B)) slots.push_back(make_slot(base + b * video_bytes, T, H, W, b * tokens.size(1)));
  if (B > 0) engine(false, slots, p, tok, nullptr);
  return x;
}

// The four ops over one device's engine (a function, as a template argument so that
// each registration gets plain function pointers).
template <auto engine>
struct PatchifyOps {
  static std::tuple<at::Tensor, at::Tensor> pack(at::TensorList videos, at::IntArrayRef patch_size) {
    return pack_patchify_impl(videos, patch_size, engine);
  }
  static std::vector<at::Tensor> unpack(const at::Tensor& tokens, at::IntArrayRef patch_size, at::IntArrayRef sizes) {
    return unpack_unpatchify_impl(tokens, patch_size, sizes, engine);
  }
  static at::Tensor patchify(const at::Tensor& x, at::IntArrayRef patch_size) {
    return patchify3d_impl(x, patch_size, engine);
  }
  static at::Tensor unpatchify(const at::Tensor& tokens, at::IntArrayRef patch_size, at::IntArrayRef grid) {
    return unpatchify3d_impl(tokens, patch_size, grid, engine);
  }
  // Registers the four ops for one dispatch key (inside TORCH_LIBRARY_IMPL).
  static void register_impls(torch::Library& m) {
    m.impl("patchify3d", &patchify);
    m.impl("unpatchify3d", &unpatchify);
    m.impl("pack_patchify", &pack);
    m.impl("unpack_unpatchify", &unpack);
  }
};

}  // namespace patchify
}  // namespace sora_kernels
