// C++ CPU kernels for patchify / unpatchify and packing. One work item is one
// grid row (video v, frame patch tt, row patch hh): Wg tokens, whose R runs of
// pw elements are read from (or written to) R rows of the video.
#include "patchify_cpu.h"

#include <cstring>

namespace sora_kernels {
namespace patchify {

int64_t assign_cpu_rows(VideoSlot* slots, int64_t n, const PatchDims& p) {
  int64_t rows = 0;
  for (int64_t v = 0; v < n; ++v) {
    slots[v].tile_offset = rows;
    rows += (slots[v].T / p.pt) * (slots[v].H / p.ph);
  }
  return rows;
}

namespace {

// Copies one run of pw elements. RUN_BYTES > 0 makes the size a compile-time
// constant, so the copy becomes a single move for the common small runs.
template <int RUN_BYTES>
inline void copy_run(char* dst, const char* src, int64_t run_bytes) {
  if constexpr (RUN_BYTES > 0) {
    std::memcpy(dst, src, RUN_BYTES);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(run_bytes));
  }
}

template <int RUN_BYTES>
void copy_rows(bool pack, const VideoSlot* slots, int64_t n, int64_t total_rows,
               const PatchDims& p, int64_t es, char* tokens, int32_t* positions) {
  const int64_t R = p.runs();
  const int64_t run_bytes = p.pw * es;
  const int64_t token_bytes = p.dim() * es;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < total_rows; ++row) {
    const VideoSlot& s = slots[find_video(slots, n, row)];
    const int64_t Hg = s.H / p.ph, Wg = s.W / p.pw;
    const int64_t local = row - s.tile_offset;
    const int64_t hh = local % Hg, tt = local / Hg;
    char* video = reinterpret_cast<char*>(s.data);
    char* tok = tokens + (s.token_offset + local * Wg) * token_bytes;
    if (pack && positions != nullptr) {
      int32_t* pos = positions + (s.token_offset + local * Wg) * 3;
      for (int64_t ww = 0; ww < Wg; ++ww) {
        pos[3 * ww] = static_cast<int32_t>(tt);
        pos[3 * ww + 1] = static_cast<int32_t>(hh);
        pos[3 * ww + 2] = static_cast<int32_t>(ww);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      char* vrow = video + run_offset(p, s.T, s.H, s.W, r, tt, hh, 0) * es;
      char* trow = tok + r * run_bytes;
      if (pack) {
        for (int64_t ww = 0; ww < Wg; ++ww)
          copy_run<RUN_BYTES>(trow + ww * token_bytes, vrow + ww * run_bytes, run_bytes);
      } else {
        for (int64_t ww = 0; ww < Wg; ++ww)
          copy_run<RUN_BYTES>(vrow + ww * run_bytes, trow + ww * token_bytes, run_bytes);
      }
    }
  }
}

}  // namespace

void patchify_copy_cpu(bool pack, const VideoSlot* slots, int64_t n, int64_t total_rows,
                       const PatchDims& p, int64_t elem_size, void* tokens, int32_t* positions) {
  char* t = static_cast<char*>(tokens);
  switch (p.pw * elem_size) {
    case 1: return copy_rows<1>(pack, slots, n, total_rows, p, elem_size, t, positions);
    case 2: return copy_rows<2>(pack, slots, n, total_rows, p, elem_size, t, positions);
    case 4: return copy_rows<4>(pack, slots, n, total_rows, p, elem_size, t, positions);
    case 8: return copy_rows<8>(pack, slots, n, total_rows, p, elem_size, t, positions);
    case 16: return copy_rows<16>(pack, slots, n, total_rows, p, elem_size, t, positions);
    default: return copy_rows<0>(pack, slots, n, total_rows, p, elem_size, t, positions);
  }
}

}  // namespace patchify
}  // namespace sora_kernels
