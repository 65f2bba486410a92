// C++ unit test of the CPU MLP activations (dit/activation_cpu_impl.h, through activation_cpu),
// without torch or Python (run by ctest): gelu_tanh and swiglu, forward and backward, against
// direct double loops of the textbook formulas (std::tanh and std::exp, not the kernels'
// sigmoid form and polynomial exp). Inputs: a dense grid over [-12, 12], values past the exp's
// clamp (|z| > 88 in the sigmoid), zeros and NaN; a length that is not a multiple of the vector
// length, split over 1 and 3 threads.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "dit/gated_residual_cpu.h"

namespace {

constexpr int kGelu = 0, kSwiglu = 1;  // activation_cpu's kinds
constexpr double kK0 = 0.7978845608028654, kK1 = 0.044715;  // sqrt(2 / pi), the cubic's

// Passes within kTol of (1 + magnitude). The magnitude is |want|, plus in the derivatives the
// rounding of their s (1 - s) term: a float sigmoid s near 1 leaves 1 - s off by up to a float's
// epsilon (or all of it, where s rounds to 1), which the factor multiplying s (1 - s) scales
// (v 2 k0 (1 + 3 k1 v^2) in gelu_tanh's, v in silu's): gelu_tanh's is 1e-6 off at |v| = 3..5.
// Measured within 2e-7 of that magnitude; a wrong term or sign is off by 1e-2 or more.
constexpr double kTol = 1e-6;

// The magnitude of the error in factor * s (1 - s) in units of kTol, per unit of the factor: 1
// where s (1 - s) is large, down to 4 s (1 - s) / kTol where s (1 - s) is about kTol or less
// (so 0 where it is 0 in double: the checks past the exp's clamp are exact).
double sigmoid_term_scale(double s) { return std::min(1.0, 4 * s * (1 - s) / kTol); }

int failures = 0;

// Counts a mismatch (NaN must match NaN), printing the first few with their index and input.
void expect_near(const char* what, int threads, int64_t i, double a, double got, double want, double mag) {
  if (std::isnan(want) ? std::isnan(got) : std::fabs(got - want) <= kTol * (1 + mag)) return;
  if (failures++ < 8)
    std::printf("threads %d: %s[%lld] (a = %.8g) = %.8g, want %.8g\n", threads, what, static_cast<long long>(i), a, got,
                want);
}

double gelu_tanh(double v) { return 0.5 * v * (1 + std::tanh(kK0 * (v + kK1 * v * v * v))); }

double gelu_tanh_grad(double v) {
  const double t = std::tanh(kK0 * (v + kK1 * v * v * v));
  return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * kK0 * (1 + 3 * kK1 * v * v);
}

double silu(double v) { return v / (1 + std::exp(-v)); }

double silu_grad(double v) {
  const double s = 1 / (1 + std::exp(-v));
  return s + v * s * (1 - s);
}

}  // namespace

int main() {
  std::vector<float> a;
  for (int i = -1200; i <= 1200; ++i) a.push_back(0.01f * static_cast<float>(i));  // includes 0
  for (float v : {-1000.f, -100.f, -90.f, -45.f, -44.f, 44.f, 45.f, 90.f, 100.f, 1000.f, -0.f})
    a.push_back(v);
  a.push_back(std::numeric_limits<float>::quiet_NaN());
  const int64_t n = static_cast<int64_t>(a.size());  // 2413: not a multiple of 4 or 8
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> b(n), dout(n);
  for (auto& e : b) e = normal(rng);
  for (auto& e : dout) e = normal(rng);
  for (int threads : {1, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> out(n), da(n), db(n);
    sora_kernels::dit::activation_cpu(kGelu, a.data(), nullptr, nullptr, n, out.data(), nullptr);
    sora_kernels::dit::activation_cpu(kGelu, a.data(), nullptr, dout.data(), n, da.data(), nullptr);
    for (int64_t i = 0; i < n; ++i) {
      const double v = a[i], want = gelu_tanh(v), want_da = dout[i] * gelu_tanh_grad(v);
      const double s = 1 / (1 + std::exp(-2 * kK0 * (v + kK1 * v * v * v)));  // sigmoid(2u)
      const double factor = std::fabs(dout[i] * v * 2 * kK0 * (1 + 3 * kK1 * v * v));
      expect_near("gelu_tanh", threads, i, v, out[i], want, std::fabs(want));
      expect_near("gelu_tanh da", threads, i, v, da[i], want_da, std::fabs(want_da) + factor * sigmoid_term_scale(s));
    }
    sora_kernels::dit::activation_cpu(kSwiglu, a.data(), b.data(), nullptr, n, out.data(), nullptr);
    sora_kernels::dit::activation_cpu(kSwiglu, a.data(), b.data(), dout.data(), n, da.data(), db.data());
    for (int64_t i = 0; i < n; ++i) {
      const double v = a[i], want = silu(v) * b[i], want_da = double(dout[i]) * b[i] * silu_grad(v);
      const double want_db = dout[i] * silu(v);
      expect_near("swiglu", threads, i, v, out[i], want, std::fabs(want));
      expect_near("swiglu da", threads, i, v, da[i], want_da,
                  std::fabs(want_da) + std::fabs(dout[i] * b[i] * v) * sigmoid_term_scale(1 / (1 + std::exp(-v))));
      expect_near("swiglu db", threads, i, v, db[i], want_db, std::fabs(want_db));
    }
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
