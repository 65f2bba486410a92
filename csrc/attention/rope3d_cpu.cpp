#include "attention/rope3d_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace sora_kernels {
namespace attention {

namespace {

// Entries (positions x pairs, cos and sin each) up to which an axis's angles are tabulated.
constexpr int64_t kMaxTable = int64_t{1} << 20;

// cos and sin of every (position value, pair) of one axis that the tokens use: positions are
// grid indices, a few dozen to a few hundred values per axis, so a call evaluates each angle
// once instead of once per token (N * D / 2 of them). Angles are float(p) * inv_freq[j] in fp32,
// as the reference computes them; std::cos / std::sin of a float are libm's cosf / sinf.
struct AxisTable {
  int64_t first = 0, pairs = 0, lo = 0;  // pair range [first, first + pairs), lowest position
  std::vector<float> cos, sin;           // [p - lo][j]; empty: computed per token
};

}  // namespace

void rope3d_cpu(const float* x, const int32_t* positions, const float* inv_freq, const int64_t sections[3],
                int64_t N, int64_t H, int64_t D, bool inverse, float* out) {
  const int64_t P = D / 2;
  AxisTable axes[3];
  int64_t first = 0;
  for (int a = 0; a < 3; ++a) {
    AxisTable& t = axes[a];
    t.first = first;
    t.pairs = sections[a] / 2;
    first += t.pairs;
    if (t.pairs == 0 || N == 0) continue;
    int64_t lo = positions[a], hi = positions[a];
#pragma omp parallel for reduction(min : lo) reduction(max : hi)
    for (int64_t n = 0; n < N; ++n) {
      lo = std::min<int64_t>(lo, positions[n * 3 + a]);
      hi = std::max<int64_t>(hi, positions[n * 3 + a]);
    }
    const int64_t values = hi - lo + 1;
    if (values * t.pairs > kMaxTable || values > N) continue;  // sparse or huge positions: per token
    t.lo = lo;
    t.cos.resize(values * t.pairs);
    t.sin.resize(values * t.pairs);
    for (int64_t p = 0; p < values; ++p) {
      for (int64_t j = 0; j < t.pairs; ++j) {
        const float angle = static_cast<float>(lo + p) * inv_freq[t.first + j];
        t.cos[p * t.pairs + j] = std::cos(angle);
        t.sin[p * t.pairs + j] = std::sin(angle);
      }
    }
  }
  const float sign = inverse ? -1.f : 1.f;
#pragma omp parallel
  {
    std::vector<float> cs(2 * P);  // this token's cos [0, P) and signed sin [P, 2P)
    float* c = cs.data();
    float* s = c + P;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int a = 0; a < 3; ++a) {
        const AxisTable& t = axes[a];
        const int64_t p = positions[n * 3 + a];
        if (!t.cos.empty()) {
          const float* tc = t.cos.data() + (p - t.lo) * t.pairs;
          const float* ts = t.sin.data() + (p - t.lo) * t.pairs;
          for (int64_t j = 0; j < t.pairs; ++j) {
            c[t.first + j] = tc[j];
            s[t.first + j] = sign * ts[j];
          }
        } else {
          for (int64_t j = 0; j < t.pairs; ++j) {
            const float angle = static_cast<float>(p) * inv_freq[t.first + j];
            c[t.first + j] = std::cos(angle);
            s[t.first + j] = sign * std::sin(angle);
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = x + (n * H + h) * D;
        float* o = out + (n * H + h) * D;
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) {
          const float x0 = xr[2 * i], x1 = xr[2 * i + 1];
          o[2 * i] = x0 * c[i] - x1 * s[i];
          o[2 * i + 1] = x1 * c[i] + x0 * s[i];
        }
      }
    }
  }
}

}  // namespace attention
}  // namespace sora_kernels
