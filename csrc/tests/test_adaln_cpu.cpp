// C++ unit test of the CPU adaLN kernels, without torch or Python (run by ctest): every output
// of the forward (h, out, mean, rstd) and of the backward (dx, dy, dgate, dshift, dscale,
// dweight) against direct double loops, for LayerNorm and RMSNorm, with and without the gated
// residual, the modulation and the weight. The reference backward multiplies by the norm's
// Jacobian, d xhat_i / d h_j = rstd (delta_ij - 1/D (LayerNorm only) - xhat_i xhat_j / D), one
// element at a time (not the kernels' factored form). Segments of 1 row, a segment spread over
// several threads' rows, thread boundaries inside segments, more threads than rows, and widths
// that are not a multiple of the vector length.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "dit/adaln_cpu.h"

using sora_kernels::dit::AdaLNArgs;
using sora_kernels::dit::AdaLNGrads;

namespace {

struct Case {
  const char* name;
  bool layer;      // LayerNorm, else RMSNorm
  bool modulated;  // shift, scale per segment (and segment ids)
  bool residual;   // h = x + gate[seg] * y first (needs the modulation, as the glue checks)
  bool weighted;   // weight [D]
  std::vector<int> lengths;  // rows per segment
  int64_t D;
};

// A reference value and its magnitude: the sum of its terms' absolute values, the scale of a
// float computation's rounding error (a sum of many terms that nearly cancel keeps the error of
// its terms' size; dweight over 263 rows, say).
struct Want {
  double v = 0, mag = 0;
  void add(double term, double term_mag) {
    v += term;
    mag += term_mag;
  }
  void add(double term) { add(term, std::fabs(term)); }
};

// The kernels' float results are within 2e-7 of (1 + magnitude) of the double reference, every
// output, both targets; a wrong sign or term in a formula is off by about the magnitude itself.
constexpr double kTol = 2e-6;

int failures = 0;

// Counts a mismatch (beyond kTol relative to the value's magnitude), printing the first few with
// the case, thread count and indices.
void expect_near(const Case& k, int threads, const char* what, int64_t i, int64_t c, double got, const Want& want) {
  if (std::fabs(got - want.v) <= kTol * (1 + want.mag)) return;
  if (failures++ < 10)
    std::printf("%s, threads %d: %s[%lld, %lld] = %.8g, want %.8g\n", k.name, threads, what,
                static_cast<long long>(i), static_cast<long long>(c), got, want.v);
}

void check(const Case& k, std::mt19937& rng) {
  const int64_t D = k.D, n = static_cast<int64_t>(k.lengths.size());
  std::vector<int32_t> seg;
  for (int64_t s = 0; s < n; ++s) seg.insert(seg.end(), k.lengths[s], static_cast<int32_t>(s));
  const int64_t N = static_cast<int64_t>(seg.size());
  std::normal_distribution<float> normal;
  auto random = [&](int64_t size, float mean, float std) {
    std::vector<float> v(size);
    for (auto& e : v) e = mean + std * normal(rng);
    return v;
  };
  const std::vector<float> x = random(N * D, 0.5f, 2.f), y = random(N * D, 0.f, 1.f);
  const std::vector<float> gate = random(n * D, 0.f, 0.5f), shift = random(n * D, 0.f, 0.5f);
  const std::vector<float> scale = random(n * D, 0.f, 0.5f), weight = random(D, 1.f, 0.3f);
  const std::vector<float> dout = random(N * D, 0.f, 1.f), dh = random(N * D, 0.f, 1.f);
  const float eps = 1e-6f;
  const AdaLNArgs args{x.data(), k.residual ? y.data() : nullptr, k.residual ? gate.data() : nullptr,
                       k.modulated ? shift.data() : nullptr, k.modulated ? scale.data() : nullptr,
                       k.weighted ? weight.data() : nullptr, k.modulated ? seg.data() : nullptr, N, D, eps, k.layer};

  // the reference, in double
  std::vector<Want> want_h(N * D), want_out(N * D), want_mean(N), want_rstd(N), want_dx(N * D), want_dy(N * D);
  std::vector<Want> want_dgate(n * D), want_dshift(n * D), want_dscale(n * D), want_dweight(D);
  std::vector<double> hr(D), xhat(D), dxhat(D);
  for (int64_t r = 0; r < N; ++r) {
    const int64_t s = seg[r];
    for (int64_t c = 0; c < D; ++c) {
      want_h[r * D + c].add(x[r * D + c]);
      if (k.residual) want_h[r * D + c].add(double(gate[s * D + c]) * y[r * D + c]);
      hr[c] = want_h[r * D + c].v;
    }
    double mu = 0, mu_mag = 0, var = 0;
    if (k.layer) {
      for (int64_t c = 0; c < D; ++c) mu += hr[c], mu_mag += std::fabs(hr[c]);
      mu /= D;
    }
    for (int64_t c = 0; c < D; ++c) var += (hr[c] - mu) * (hr[c] - mu);
    const double rs = 1 / std::sqrt(var / D + eps);
    want_mean[r].add(mu, mu_mag / D);
    want_rstd[r].add(rs);
    for (int64_t c = 0; c < D; ++c) {
      const double w = k.weighted ? weight[c] : 1.0, sc = k.modulated ? scale[s * D + c] : 0.0;
      const double sh = k.modulated ? shift[s * D + c] : 0.0, go = dout[r * D + c];
      xhat[c] = (hr[c] - mu) * rs;
      want_out[r * D + c].add(xhat[c] * w * (1 + sc));
      want_out[r * D + c].add(sh);
      dxhat[c] = go * w * (1 + sc);
      want_dshift[s * D + c].add(go);
      want_dscale[s * D + c].add(go * xhat[c] * w);
      want_dweight[c].add(go * (1 + sc) * xhat[c]);
    }
    for (int64_t j = 0; j < D; ++j) {
      Want& g = want_dx[r * D + j];
      for (int64_t i = 0; i < D; ++i)
        g.add(dxhat[i] * rs * ((i == j) - (k.layer ? 1.0 / D : 0.0) - xhat[i] * xhat[j] / D));
      if (k.residual) {  // the gradient of h, from the norm and from h's other uses (dh)
        g.add(dh[r * D + j]);
        want_dy[r * D + j].add(g.v * gate[s * D + j], g.mag * std::fabs(gate[s * D + j]));
        want_dgate[s * D + j].add(g.v * y[r * D + j], g.mag * std::fabs(y[r * D + j]));
      }
    }
  }

  for (int threads : {1, 3, 8}) {
    omp_set_num_threads(threads);
    std::vector<float> h(k.residual ? N * D : 0), out(N * D), mean(k.layer ? N : 0), rstd(N);
    sora_kernels::dit::adaln_forward_cpu(args, k.residual ? h.data() : nullptr, out.data(),
                                         k.layer ? mean.data() : nullptr, rstd.data());
    for (int64_t r = 0; r < N; ++r) {
      if (k.layer) expect_near(k, threads, "mean", r, 0, mean[r], want_mean[r]);
      expect_near(k, threads, "rstd", r, 0, rstd[r], want_rstd[r]);
      for (int64_t c = 0; c < D; ++c) {
        if (k.residual) expect_near(k, threads, "h", r, c, h[r * D + c], want_h[r * D + c]);
        expect_near(k, threads, "out", r, c, out[r * D + c], want_out[r * D + c]);
      }
    }
    // the backward normalises what the forward did: h for the residual form (as the glue passes it)
    AdaLNArgs b = args;
    if (k.residual) b.x = h.data();
    std::vector<float> dx(N * D), dy(N * D), dgate(n * D, 0.f), dshift(n * D, 0.f), dscale(n * D, 0.f),
        dweight(D, 0.f);
    const AdaLNGrads g{dx.data(), k.residual ? dy.data() : nullptr, k.residual ? dgate.data() : nullptr,
                       k.modulated ? dshift.data() : nullptr, k.modulated ? dscale.data() : nullptr,
                       k.weighted ? dweight.data() : nullptr};
    sora_kernels::dit::adaln_backward_cpu(b, dout.data(), k.residual ? dh.data() : nullptr,
                                          k.layer ? mean.data() : nullptr, rstd.data(), k.modulated ? n : 0, g);
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < D; ++c) {
        expect_near(k, threads, "dx", r, c, dx[r * D + c], want_dx[r * D + c]);
        if (k.residual) expect_near(k, threads, "dy", r, c, dy[r * D + c], want_dy[r * D + c]);
      }
    for (int64_t s = 0; s < n; ++s)
      for (int64_t c = 0; c < D; ++c) {
        if (k.modulated) {
          expect_near(k, threads, "dshift", s, c, dshift[s * D + c], want_dshift[s * D + c]);
          expect_near(k, threads, "dscale", s, c, dscale[s * D + c], want_dscale[s * D + c]);
        }
        if (k.residual) expect_near(k, threads, "dgate", s, c, dgate[s * D + c], want_dgate[s * D + c]);
      }
    if (k.weighted)
      for (int64_t c = 0; c < D; ++c) expect_near(k, threads, "dweight", 0, c, dweight[c], want_dweight[c]);
  }
}

}  // namespace

int main() {
  // 1-row segments at both ends and between longer ones; 203 rows spread over several threads
  const std::vector<int> mixed = {1, 50, 1, 1, 203, 7, 1};
  const Case cases[] = {
      {"adaLN (LayerNorm, modulated)", true, true, false, false, mixed, 24},
      {"adaLN, weight", true, true, false, true, mixed, 37},
      {"gated residual + adaLN", true, true, true, true, mixed, 37},
      {"gated residual + adaRMS", false, true, true, true, mixed, 37},
      {"adaRMS, no weight", false, true, false, false, mixed, 13},
      {"RMSNorm (rms_norm: no segments)", false, false, false, true, {263}, 37},
      {"LayerNorm (no segments, no weight)", true, false, false, false, {263}, 24},
      {"gated residual + adaRMS, more threads than rows", false, true, true, true, {1, 1}, 37},
  };
  std::mt19937 rng(0);
  for (const Case& k : cases) check(k, rng);
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
