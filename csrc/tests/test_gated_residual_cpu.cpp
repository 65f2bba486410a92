// C++ unit test of the CPU gated residual kernels, without torch or Python (run by ctest): the
// forward out = x + gate[seg] * y and the backward dy = dout * gate[seg], dgate[s] = sum over the
// rows of s of dout * y, against direct double loops. Segments of 1 row, a segment spread over
// the rows of several threads, thread boundaries inside segments, more threads than rows (threads
// with no rows), and a width that is not a multiple of the vector length.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "dit/gated_residual_cpu.h"

namespace {

// The kernels' float results are within 1e-7 of (1 + magnitude) of the double reference, the
// magnitude being the sum of the absolute values of the terms (the scale of the rounding error
// of a sum whose terms nearly cancel); a wrong term is off by about the magnitude itself.
constexpr double kTol = 1e-6;

int failures = 0;

// Counts a mismatch, printing the first few with their indices.
void expect_near(const char* what, int threads, int64_t i, int64_t c, double got, double want, double mag) {
  if (std::fabs(got - want) <= kTol * (1 + mag)) return;
  if (failures++ < 8)
    std::printf("threads %d: %s[%lld, %lld] = %.8g, want %.8g\n", threads, what, static_cast<long long>(i),
                static_cast<long long>(c), got, want);
}

void check(const std::vector<int>& lengths, int64_t D, std::mt19937& rng) {
  const int64_t n = static_cast<int64_t>(lengths.size());
  std::vector<int32_t> seg;
  for (int64_t s = 0; s < n; ++s) seg.insert(seg.end(), lengths[s], static_cast<int32_t>(s));
  const int64_t N = static_cast<int64_t>(seg.size());
  std::normal_distribution<float> normal;
  auto random = [&](int64_t size) {
    std::vector<float> v(size);
    for (auto& e : v) e = normal(rng);
    return v;
  };
  const std::vector<float> x = random(N * D), y = random(N * D), gate = random(n * D), dout = random(N * D);
  for (int threads : {1, 3, 8}) {
    omp_set_num_threads(threads);
    std::vector<float> out(N * D), dy(N * D), dgate(n * D, 0.f);
    sora_kernels::dit::gated_residual_forward_cpu(x.data(), y.data(), gate.data(), seg.data(), N, D, out.data());
    sora_kernels::dit::gated_residual_backward_cpu(dout.data(), y.data(), gate.data(), seg.data(), N, D, dy.data(),
                                                   dgate.data());
    std::vector<double> want_dgate(n * D, 0.0), dgate_mag(n * D, 0.0);
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < D; ++c) {
        const int64_t i = r * D + c;
        const double g = gate[seg[r] * D + c], gy = g * y[i], want_dy = dout[i] * g, dg = double(dout[i]) * y[i];
        expect_near("out", threads, r, c, out[i], x[i] + gy, std::fabs(x[i]) + std::fabs(gy));
        expect_near("dy", threads, r, c, dy[i], want_dy, std::fabs(want_dy));
        want_dgate[seg[r] * D + c] += dg;
        dgate_mag[seg[r] * D + c] += std::fabs(dg);
      }
    for (int64_t s = 0; s < n; ++s)
      for (int64_t c = 0; c < D; ++c)
        expect_near("dgate", threads, s, c, dgate[s * D + c], want_dgate[s * D + c], dgate_mag[s * D + c]);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  check({1, 50, 1, 1, 203, 7, 1}, 37, rng);  // 1-row segments; 203 rows over several threads
  check({300}, 24, rng);                      // one segment in every thread
  check({1, 1}, 13, rng);                     // more threads than rows
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
