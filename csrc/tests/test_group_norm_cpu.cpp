// C++ unit test of the per-frame GroupNorm + SiLU CPU kernels, without torch or Python (run by
// ctest): the forward of both layouts (contiguous, channels-last) against a direct double
// loop, and the two layouts' backward against each other (the Python tests check gradients
// against autograd of the reference); the apply from given statistics (the forward's own: the
// same bits as the forward) and its backward against a double loop; the moments of a strided
// region against a double loop.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "vae/group_norm_cpu.h"

using sora_kernels::vae::GroupNormArgs;

int main() {
  const int64_t B = 2, C = 12, T = 3, S = 300, G = 4, Cg = C / G;  // S > the kernels' 256-position block
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> x(B * C * T * S), xl(x.size()), w(C), bias(C), dy(x.size()), dyl(x.size());
  // contiguous index ((b * C + c) * T + t) * S + s; channels-last ((b * T + t) * S + s) * C + c
  auto cont = [&](int64_t b, int64_t c, int64_t t, int64_t s) { return ((b * C + c) * T + t) * S + s; };
  auto last = [&](int64_t b, int64_t c, int64_t t, int64_t s) { return ((b * T + t) * S + s) * C + c; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < S; ++s) {
          xl[last(b, c, t, s)] = x[cont(b, c, t, s)] = 3.f + 2.f * normal(rng);
          dyl[last(b, c, t, s)] = dy[cont(b, c, t, s)] = normal(rng);
        }
  for (auto& e : w) e = 1.f + 0.3f * normal(rng);
  for (auto& e : bias) e = 0.3f * normal(rng);
  GroupNormArgs ac{x.data(), w.data(), bias.data(), B, C, T, S, C * T * S, T * S, S, 1, G, 1e-6f, true};
  GroupNormArgs al{xl.data(), w.data(), bias.data(), B, C, T, S, T * S * C, 1, S * C, C, G, 1e-6f, true};
  int failures = 0;
  for (int threads : {1, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> yc(x.size()), yl(x.size()), mc(B * T * G), rc(B * T * G), ml(B * T * G), rl(B * T * G);
    sora_kernels::vae::group_norm_forward_cpu(ac, yc.data(), mc.data(), rc.data());
    sora_kernels::vae::group_norm_forward_cpu(al, yl.data(), ml.data(), rl.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          double mu = 0, var = 0;
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
            for (int64_t s = 0; s < S; ++s) mu += x[cont(b, c, t, s)];
          mu /= Cg * S;
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
            for (int64_t s = 0; s < S; ++s) var += (x[cont(b, c, t, s)] - mu) * (x[cont(b, c, t, s)] - mu);
          const double rs = 1 / std::sqrt(var / (Cg * S) + 1e-6);
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
            for (int64_t s = 0; s < S; ++s) {
              const double z = (x[cont(b, c, t, s)] - mu) * rs * w[c] + bias[c];
              const double want = z / (1 + std::exp(-z));
              failures += std::fabs(want - yc[cont(b, c, t, s)]) > 1e-5;
              failures += std::fabs(want - yl[last(b, c, t, s)]) > 1e-5;
            }
        }
    std::vector<float> dxc(x.size()), dxl(x.size()), dwc(B * T * C), dbc(B * T * C), dwl(B * T * C), dbl(B * T * C);
    sora_kernels::vae::group_norm_backward_cpu(ac, dy.data(), mc.data(), rc.data(), dxc.data(), dwc.data(), dbc.data());
    sora_kernels::vae::group_norm_backward_cpu(al, dyl.data(), ml.data(), rl.data(), dxl.data(), dwl.data(),
                                               dbl.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t s = 0; s < S; ++s) failures += std::fabs(dxc[cont(b, c, t, s)] - dxl[last(b, c, t, s)]) > 1e-4;
    for (int64_t i = 0; i < B * T * C; ++i)
      failures += std::fabs(dwc[i] - dwl[i]) > 1e-3 || std::fabs(dbc[i] - dbl[i]) > 1e-3;

    // apply from the forward's own statistics: the forward's y, bit for bit, in both layouts
    std::vector<float> ac_y(x.size()), al_y(x.size());
    sora_kernels::vae::group_norm_apply_cpu(ac, mc.data(), rc.data(), ac_y.data());
    sora_kernels::vae::group_norm_apply_cpu(al, ml.data(), rl.data(), al_y.data());
    failures += ac_y != yc;
    failures += al_y != yl;
    // its backward (statistics given: constants): dx = silu'(z) dy w r
    GroupNormArgs gc = ac, gl = al;
    gc.given = gl.given = true;
    sora_kernels::vae::group_norm_backward_cpu(gc, dy.data(), mc.data(), rc.data(), dxc.data(), dwc.data(), dbc.data());
    sora_kernels::vae::group_norm_backward_cpu(gl, dyl.data(), ml.data(), rl.data(), dxl.data(), dwl.data(),
                                               dbl.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t st = (b * T + t) * G + c / Cg;
          for (int64_t s = 0; s < S; ++s) {
            const double z = (x[cont(b, c, t, s)] - mc[st]) * double(rc[st]) * w[c] + bias[c];
            const double sg = 1 / (1 + std::exp(-z));
            const double want = dy[cont(b, c, t, s)] * sg * (1 + z * (1 - sg)) * w[c] * rc[st];
            failures += std::fabs(want - dxc[cont(b, c, t, s)]) > 1e-5;
            failures += std::fabs(want - dxl[last(b, c, t, s)]) > 1e-5;
          }
        }
  }
  // moments of a strided region: the frame as H x W = 15 x 20, rows 2..12 and columns 3..16 of
  // the contiguous x (and of its channels-last copy: channel stride 1, column stride C)
  const int64_t H = 15, W = 20, h0 = 2, h1 = 13, w0 = 3, w1 = 17;
  using sora_kernels::vae::MomentsArgs;
  MomentsArgs mcont{x.data() + h0 * W + w0, B, C, T, h1 - h0, w1 - w0, C * T * S, T * S, S, W, 1, G};
  MomentsArgs mlast{xl.data() + (h0 * W + w0) * C, B, C, T, h1 - h0, w1 - w0, T * S * C, 1, S * C, W * C, C, G};
  for (const MomentsArgs& ma : {mcont, mlast}) {
    std::vector<double> mean(B * T * G), m2(B * T * G);
    sora_kernels::vae::group_norm_moments_cpu(ma, mean.data(), m2.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          double mu = 0, dev = 0;
          const double n = double(Cg * (h1 - h0) * (w1 - w0));
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w_ = w0; w_ < w1; ++w_) mu += x[cont(b, c, t, h * W + w_)];
          mu /= n;
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w_ = w0; w_ < w1; ++w_) dev += std::pow(x[cont(b, c, t, h * W + w_)] - mu, 2);
          const int64_t i = (b * T + t) * G + g;
          failures += std::fabs(mean[i] - mu) > 1e-6 || std::fabs(m2[i] - dev) > 1e-6 * dev;
        }
  }
  std::printf("%s: %d failures\n", failures ? "FAIL" : "ok", failures);
  return failures ? 1 : 0;
}
