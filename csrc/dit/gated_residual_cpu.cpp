#include "dit/gated_residual_cpu.h"

#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dit/segment_sums.h"

namespace sora_kernels {
namespace dit {

// The activations for baseline x86-64 and for AVX2 + FMA, picked at run time.
#define SORA_KERNELS_PER_TARGET "dit/activation_cpu_impl.h"
#include "common/per_target.h"

void gated_residual_forward_cpu(const float* x, const float* y, const float* gate, const int32_t* seg, int64_t rows,
                                int64_t dim, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + static_cast<int64_t>(seg[r]) * dim;
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) out[r * dim + c] = x[r * dim + c] + g[c] * y[r * dim + c];
  }
}

void gated_residual_backward_cpu(const float* dout, const float* y, const float* gate, const int32_t* seg,
                                 int64_t rows, int64_t dim, float* dy, float* dgate) {
  const int threads = omp_get_max_threads();
  std::vector<SegmentSums> boundary;
  boundary.reserve(threads);
  for (int t = 0; t < threads; ++t) boundary.emplace_back(dim, 1);
  float* outputs[1] = {dgate};
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t r0 = rows * t / T, r1 = rows * (t + 1) / T;
    SegmentSums& sums = boundary[t];
    if (r1 > r0) {
      sums.first_seg = seg[r0];
      sums.last_seg = seg[r1 - 1];
    }
    float* acc = sums.cur.data();
    for (int64_t r = r0; r < r1; ++r) {
      if (seg[r] != sums.cur_seg) {
        sums.flush(outputs);
        sums.cur_seg = seg[r];
      }
      const float* g = gate + static_cast<int64_t>(seg[r]) * dim;
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) {
        dy[r * dim + c] = dout[r * dim + c] * g[c];
        acc[c] += dout[r * dim + c] * y[r * dim + c];
      }
    }
    sums.flush(outputs);
  }
  for (auto& sums : boundary) sums.add_boundary(outputs);
}

void activation_cpu(int kind, const float* a, const float* b, const float* dout, int64_t n, float* out, float* db) {
#ifdef SORA_KERNELS_AVX2
  if (cpu_has_avx2_fma()) return avx2::activation(kind, a, b, dout, n, out, db);
#endif
  generic::activation(kind, a, b, dout, n, out, db);
}

}  // namespace dit
}  // namespace sora_kernels
