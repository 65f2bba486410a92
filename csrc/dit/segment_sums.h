// Per-segment sums of per-row values, for the CPU backward kernels (OpenMP, no atomics).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sora_kernels {
namespace dit {

// Per-segment sums over a thread's contiguous rows: segments strictly inside the range belong
// to this thread alone and are added to the output directly; the first and last (shared with
// neighbouring threads) are kept and added serially after the parallel region.
struct SegmentSums {
  int64_t dim, parts;
  std::vector<float> cur;               // [parts, D] sums of the current segment
  int64_t cur_seg = -1;
  int64_t first_seg = -1, last_seg = -1;
  std::vector<float> first, last;       // [parts, D] sums of the boundary segments

  SegmentSums(int64_t d, int64_t p) : dim(d), parts(p), cur(d * p, 0.f), first(d * p, 0.f), last(d * p, 0.f) {}

  void flush(float* const* outputs) {
    if (cur_seg < 0) return;
    std::vector<float>* keep = cur_seg == first_seg ? &first : cur_seg == last_seg ? &last : nullptr;
    for (int64_t p = 0; p < parts; ++p) {
      float* dst = keep ? keep->data() + p * dim : outputs[p] + cur_seg * dim;
      const float* src = cur.data() + p * dim;
      for (int64_t c = 0; c < dim; ++c) dst[c] += src[c];
    }
    std::fill(cur.begin(), cur.end(), 0.f);
  }

  // After the parallel region, serially: add the kept sums of the boundary segments.
  void add_boundary(float* const* outputs) const {
    for (int which = 0; which < 2; ++which) {
      const int64_t s = which == 0 ? first_seg : last_seg;
      if (s < 0 || (which == 1 && s == first_seg)) continue;
      const std::vector<float>& src = which == 0 ? first : last;
      for (int64_t p = 0; p < parts; ++p)
        for (int64_t c = 0; c < dim; ++c) outputs[p][s * dim + c] += src[p * dim + c];
    }
  }
};


}  // namespace dit
}  // namespace sora_kernels
