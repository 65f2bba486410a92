// C++ CPU kernels for patchify / unpatchify and packing. One work item is one
// grid row (video v, frame patch tt, row patch hh): Wg tokens, whose R runs of
// pw elements are read from (or written to) R rows of the video.
#include "patchify_cpu.h"

#include <vector>

#include <algorithm>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

constexpr int64_t kTokenBlock = 16;  // tokens per block when packing: keeps the token lines in L1

#if defined(__SSE2__)
// Transposes a 4x4 block of 4-byte runs: 4 runs (rows src, src + src_stride, ...) of 4
// consecutive tokens become 4 tokens (dst, dst + dst_stride, ...) of 4 consecutive runs.
// Pure bit shuffles: exact for every dtype.
inline void transpose4x4(char* dst, int64_t dst_stride, const char* src, int64_t src_stride) {
  __m128 a = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  __m128 b = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + src_stride)));
  __m128 c = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * src_stride)));
  __m128 d = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 3 * src_stride)));
  _MM_TRANSPOSE4_PS(a, b, c, d);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_castps_si128(a));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + dst_stride), _mm_castps_si128(b));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * dst_stride), _mm_castps_si128(c));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * dst_stride), _mm_castps_si128(d));
}
#endif

// Moves runs [r0, r1) x tokens [w0, w1) of one grid row between the video rows
// (vrows[r], runs of a row contiguous) and the tokens (tok, token_bytes apart).
template <int RUN_BYTES>
inline void copy_block(bool pack, char* const* vrows, char* tok, int64_t r0, int64_t r1, int64_t w0, int64_t w1,
                       int64_t run_bytes, int64_t token_bytes) {
  int64_t r = r0;
#if defined(__SSE2__)
  if constexpr (RUN_BYTES == 4) {  // 4x4 blocks of 4-byte runs through SSE registers
    for (; r + 4 <= r1; r += 4) {
      int64_t ww = w0;
      for (; ww + 4 <= w1; ww += 4) {
        char* t = tok + ww * token_bytes + r * 4;
        if (pack) {
          // vrows[r..r+3] are not equally spaced in general: gather them through a small buffer.
          alignas(16) char rows[64];
          for (int i = 0; i < 4; ++i) std::memcpy(rows + 16 * i, vrows[r + i] + ww * 4, 16);
          transpose4x4(t, token_bytes, rows, 16);
        } else {
          alignas(16) char rows[64];
          transpose4x4(rows, 16, t, token_bytes);
          for (int i = 0; i < 4; ++i) std::memcpy(vrows[r + i] + ww * 4, rows + 16 * i, 16);
        }
      }
      for (; ww < w1; ++ww)
        for (int i = 0; i < 4; ++i) {
          char* t = tok + ww * token_bytes + (r + i) * 4;
          if (pack) std::memcpy(t, vrows[r + i] + ww * 4, 4); else std::memcpy(vrows[r + i] + ww * 4, t, 4);
        }
    }
  }
#endif
  for (; r < r1; ++r) {
    char* vrow = vrows[r];
    char* trow = tok + r * run_bytes;
    for (int64_t ww = w0; ww < w1; ++ww) {
      if (pack) copy_run<RUN_BYTES>(trow + ww * token_bytes, vrow + ww * run_bytes, run_bytes);
      else copy_run<RUN_BYTES>(vrow + ww * run_bytes, trow + ww * token_bytes, run_bytes);
    }
  }
}

template <int RUN_BYTES>
void copy_rows(bool pack, const VideoSlot* slots, int64_t n, int64_t total_rows,
               const PatchDims& p, int64_t es, char* tokens, int32_t* positions) {
  const int64_t R = p.runs();
  const int64_t run_bytes = p.pw * es;
  const int64_t token_bytes = p.dim() * es;
#pragma omp parallel
  {
    std::vector<char*> vrows(R);  // start of each run's video row, for the current grid row
#pragma omp for schedule(static)
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
      for (int64_t r = 0; r < R; ++r) vrows[r] = video + run_offset(p, s.T, s.H, s.W, r, tt, hh, 0) * es;
      // Blocks of tokens keep the written (pack) or read (unpack) token lines in L1.
      for (int64_t w0 = 0; w0 < Wg; w0 += kTokenBlock)
        copy_block<RUN_BYTES>(pack, vrows.data(), tok, 0, R, w0, std::min(Wg, w0 + kTokenBlock), run_bytes,
                              token_bytes);
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
