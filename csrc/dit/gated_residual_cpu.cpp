#include "dit/gated_residual_cpu.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "dit/segment_sums.h"

namespace sora_kernels {
namespace dit {

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
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = a[i];
    if (kind == 0) {
      const float t = std::tanh(k0 * (v + k1 * v * v * v));
      out[i] = dout ? dout[i] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * k0 * (1.f + 3.f * k1 * v * v))
                    : 0.5f * v * (1.f + t);
    } else {
      const float sig = 1.f / (1.f + std::exp(-v));
      if (dout) {
        out[i] = dout[i] * b[i] * sig * (1.f + v * (1.f - sig));
        db[i] = dout[i] * v * sig;
      } else {
        out[i] = v * sig * b[i];
      }
    }
  }
}

}  // namespace dit
}  // namespace sora_kernels
