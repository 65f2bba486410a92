// C++ unit test of the CPU adaLN kernels, without torch or Python (run by ctest): the
// per-segment gradient sums (dshift = sum of dout over a segment's rows) against a direct
// loop, with 1-row segments and segments that straddle the rows of several threads; and the
// forward against a direct LayerNorm + modulation.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "dit/adaln_cpu.h"

using sora_kernels::dit::AdaLNArgs;
using sora_kernels::dit::AdaLNGrads;

int main() {
  const std::vector<int> lengths = {1, 50, 1, 1, 203, 7, 1};
  const int64_t D = 24, n = static_cast<int64_t>(lengths.size());
  int64_t N = 0;
  std::vector<int32_t> seg;
  for (int64_t s = 0; s < n; ++s)
    for (int i = 0; i < lengths[s]; ++i, ++N) seg.push_back(static_cast<int32_t>(s));
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto random = [&](int64_t size) {
    std::vector<float> v(size);
    for (auto& e : v) e = normal(rng);
    return v;
  };
  std::vector<float> x = random(N * D), shift = random(n * D), scale = random(n * D), dout = random(N * D);
  AdaLNArgs a{x.data(), nullptr, nullptr, shift.data(), scale.data(), nullptr, seg.data(), N, D, 1e-6f, true};
  std::vector<float> out(N * D), mean(N), rstd(N);
  int failures = 0;
  for (int threads : {1, 3, 8}) {
    omp_set_num_threads(threads);
    sora_kernels::dit::adaln_forward_cpu(a, nullptr, out.data(), mean.data(), rstd.data());
    for (int64_t r = 0; r < N; ++r) {
      double mu = 0, var = 0;
      for (int64_t c = 0; c < D; ++c) mu += x[r * D + c];
      mu /= D;
      for (int64_t c = 0; c < D; ++c) var += (x[r * D + c] - mu) * (x[r * D + c] - mu);
      const double rs = 1 / std::sqrt(var / D + 1e-6);
      for (int64_t c = 0; c < D; ++c) {
        const double want = (x[r * D + c] - mu) * rs * (1 + scale[seg[r] * D + c]) + shift[seg[r] * D + c];
        if (std::fabs(want - out[r * D + c]) > 1e-4) ++failures;
      }
    }
    std::vector<float> dx(N * D), dshift(n * D, 0.f), dscale(n * D, 0.f);
    AdaLNGrads g{dx.data(), nullptr, nullptr, dshift.data(), dscale.data(), nullptr};
    sora_kernels::dit::adaln_backward_cpu(a, dout.data(), nullptr, mean.data(), rstd.data(), n, g);
    for (int64_t s = 0; s < n; ++s)
      for (int64_t c = 0; c < D; ++c) {
        double want = 0;
        for (int64_t r = 0; r < N; ++r)
          if (seg[r] == s) want += dout[r * D + c];
        if (std::fabs(want - dshift[s * D + c]) > 1e-3) {
          if (failures++ < 5) std::printf("threads %d: dshift[%lld, %lld] = %f, want %f\n", threads,
                                          static_cast<long long>(s), static_cast<long long>(c), dshift[s * D + c], want);
        }
      }
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
