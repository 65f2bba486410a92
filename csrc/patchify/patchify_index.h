// Index math for 3D patchify and variable-size packing, shared by the C++ CPU
// kernels (OpenMP) and the CUDA kernels, so the CPU tests exercise the same
// arithmetic the GPU runs. No torch headers here: CMake builds it without Python.
//
// Layout (the contract of every backend, see sora_kernels/reference/patchify.py):
//   video  [C, T, H, W], contiguous
//   patch  (pt, ph, pw); grid (Tg, Hg, Wg) = (T/pt, H/ph, W/pw)
//   token  s = (tt * Hg + hh) * Wg + ww        raster (t, h, w) order
//   feature f = ((c * pt + i) * ph + j) * pw + k  (C, pt, ph, pw) order
// A token's features are R = C*pt*ph "runs" of pw elements that are contiguous
// in the video: run r = (c * pt + i) * ph + j starts at run_offset(...).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace sora_kernels {
namespace patchify {

// Patch sizes and channel count, the same for every video of one call.
struct PatchDims {
  int64_t C, pt, ph, pw;
  SK_HOST_DEVICE int64_t runs() const { return C * pt * ph; }        // R
  SK_HOST_DEVICE int64_t dim() const { return C * pt * ph * pw; }    // D
};

// One video of a packed batch. `data` is the address of its [C, T, H, W]
// elements; `token_offset` is the row of its first token in the [N, D] tokens.
// `tile_offset` is the index of its first tile (CUDA) or grid row (CPU);
// a CUDA tile covers tile_rows grid rows of tile_tokens tokens each.
struct VideoSlot {
  int64_t data;
  int64_t T, H, W;
  int64_t token_offset;
  int64_t tile_offset;
  int64_t tile_rows, tile_tokens;
};
static_assert(sizeof(VideoSlot) == 8 * sizeof(int64_t), "VideoSlot is copied to the GPU as int64[8]");

// Element offset inside the video of run r of the token at grid (tt, hh, ww).
SK_HOST_DEVICE int64_t run_offset(const PatchDims& p, int64_t T, int64_t H, int64_t W,
                                  int64_t r, int64_t tt, int64_t hh, int64_t ww) {
  // r < C*pt*ph fits in 32 bits: keep the divisions narrow (cheap on a GPU).
  const int32_t r32 = static_cast<int32_t>(r), ph = static_cast<int32_t>(p.ph), pt = static_cast<int32_t>(p.pt);
  const int64_t j = r32 % ph;
  const int32_t ci = r32 / ph;
  const int64_t i = ci % pt;
  const int64_t c = ci / pt;
  return ((c * T + tt * p.pt + i) * H + hh * p.ph + j) * W + ww * p.pw;
}

// Index of the video that owns work item `item`: the last v with
// slots[v].tile_offset <= item (slots sorted by tile_offset; empty videos are
// skipped because a later video with the same offset wins).
SK_HOST_DEVICE int64_t find_video(const VideoSlot* slots, int64_t n, int64_t item) {
  int64_t lo = 0, hi = n;  // slots[lo].tile_offset <= item < slots[hi].tile_offset
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (slots[mid].tile_offset <= item) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace patchify
}  // namespace sora_kernels
