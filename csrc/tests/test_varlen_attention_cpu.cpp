// C++ unit test of the CPU packed attention, without torch or Python (run by ctest): forward
// (out, lse) and backward (dq, dk, dv) against a direct double-precision softmax attention per
// segment, for causal and not, grouped-query heads, a head dim that is not a multiple of the
// vector tiles, a segment longer than one key block, empty query and key segments, and 1, 2
// and 8 threads (the work is split by query blocks in the forward, by (segment, kv head) in the
// backward).
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "attention/varlen_attention_cpu.h"

namespace {

struct Case {
  std::vector<int32_t> lens_q, lens_k;
  int64_t H, Hkv, D;
  bool causal;
};

// Direct attention in double: out, lse and, given dout, dq / dk / dv, per segment and head.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

Reference reference(const Case& c, const std::vector<int32_t>& cq, const std::vector<int32_t>& ck,
                    const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<float>& dout, double scale) {
  const int64_t H = c.H, Hkv = c.Hkv, D = c.D, Nq = cq.back(), Nk = ck.back();
  Reference r{std::vector<double>(Nq * H * D, 0.0), std::vector<double>(H * Nq, -INFINITY),
              std::vector<double>(Nq * H * D, 0.0), std::vector<double>(Nk * Hkv * D, 0.0),
              std::vector<double>(Nk * Hkv * D, 0.0)};
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    const int64_t Lq = cq[b + 1] - cq[b], Lk = ck[b + 1] - ck[b];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / Hkv);
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t seen = c.causal ? std::min(Lk, std::max<int64_t>(0, i + Lk - Lq + 1)) : Lk;
        if (seen == 0) continue;
        const float* qi = &q[((cq[b] + i) * H + h) * D];
        std::vector<double> s(seen), p(seen), dp(seen);
        double mx = -INFINITY, sum = 0, delta = 0;
        for (int64_t j = 0; j < seen; ++j) {
          const float* kj = &k[((ck[b] + j) * Hkv + g) * D];
          for (int64_t d = 0; d < D; ++d) s[j] += scale * qi[d] * kj[d];
          mx = std::max(mx, s[j]);
        }
        for (int64_t j = 0; j < seen; ++j) sum += (p[j] = std::exp(s[j] - mx));
        double* o = &r.out[((cq[b] + i) * H + h) * D];
        const float* doi = &dout[((cq[b] + i) * H + h) * D];
        for (int64_t j = 0; j < seen; ++j) {
          p[j] /= sum;
          const float* vj = &v[((ck[b] + j) * Hkv + g) * D];
          for (int64_t d = 0; d < D; ++d) {
            o[d] += p[j] * vj[d];
            dp[j] += doi[d] * vj[d];
          }
        }
        r.lse[h * Nq + cq[b] + i] = mx + std::log(sum);
        for (int64_t j = 0; j < seen; ++j) delta += p[j] * dp[j];
        for (int64_t j = 0; j < seen; ++j) {
          const double ds = p[j] * (dp[j] - delta);
          const float* kj = &k[((ck[b] + j) * Hkv + g) * D];
          for (int64_t d = 0; d < D; ++d) {
            r.dq[((cq[b] + i) * H + h) * D + d] += scale * ds * kj[d];
            r.dk[((ck[b] + j) * Hkv + g) * D + d] += scale * ds * qi[d];
            r.dv[((ck[b] + j) * Hkv + g) * D + d] += p[j] * doi[d];
          }
        }
      }
    }
  }
  return r;
}

// Counts the entries of `got` more than `tol` from `want` (and reports the first few).
int compare(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool same_inf = std::isinf(want[i]) && got[i] == want[i];
    if (!same_inf && !(std::fabs(got[i] - want[i]) <= tol)) {
      if (bad++ < 3) std::printf("  %s[%zu] = %g, want %g\n", what, i, got[i], want[i]);
    }
  }
  return bad;
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {{1, 2, 17, 97}, {1, 2, 17, 97}, 2, 2, 64, false},
      {{1, 2, 17, 97}, {1, 2, 17, 97}, 2, 2, 64, true},
      {{97, 33, 0, 5}, {97, 33, 4, 0}, 4, 2, 72, true},        // GQA, D not a multiple of 16
      {{60, 1, 40}, {300, 7, 0}, 3, 1, 40, false},            // MQA, 300 keys: three key blocks
      {{70, 9}, {50, 130}, 2, 2, 24, true},                   // causal with Lq > Lk and Lq < Lk
      {{49, 17, 1}, {131, 16, 15}, 2, 1, 3, false},           // D = 3: packing past the 8 x 8 blocks
      {{130, 20}, {129, 33}, 3, 3, 20, true},                 // D = 20: 8 x 8 blocks and scalar dims
  };
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  int failures = 0;
  for (size_t n = 0; n < cases.size(); ++n) {
    const Case& c = cases[n];
    std::vector<int32_t> cq{0}, ck{0};
    for (size_t b = 0; b < c.lens_q.size(); ++b) {
      cq.push_back(cq.back() + c.lens_q[b]);
      ck.push_back(ck.back() + c.lens_k[b]);
    }
    const int64_t Nq = cq.back(), Nk = ck.back(), segments = static_cast<int64_t>(c.lens_q.size());
    auto random = [&](int64_t size) {
      std::vector<float> x(size);
      for (auto& e : x) e = normal(rng);
      return x;
    };
    const std::vector<float> q = random(Nq * c.H * c.D), k = random(Nk * c.Hkv * c.D), v = random(Nk * c.Hkv * c.D);
    const std::vector<float> dout = random(Nq * c.H * c.D);
    const float scale = 1.f / std::sqrt(static_cast<float>(c.D));
    const Reference want = reference(c, cq, ck, q, k, v, dout, scale);
    for (int threads : {1, 2, 8}) {
      omp_set_num_threads(threads);
      std::vector<float> out(Nq * c.H * c.D, NAN), lse(c.H * Nq, NAN);
      sora_kernels::attention::varlen_attention_forward_cpu(q.data(), k.data(), v.data(), cq.data(), ck.data(),
                                                            segments, c.H, c.Hkv, c.D, scale, c.causal, out.data(),
                                                            lse.data());
      std::vector<float> dq(Nq * c.H * c.D, 0.f), dk(Nk * c.Hkv * c.D, 0.f), dv(Nk * c.Hkv * c.D, 0.f);
      sora_kernels::attention::varlen_attention_backward_cpu(
          dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), cq.data(), ck.data(), segments, c.H,
          c.Hkv, c.D, scale, c.causal, dq.data(), dk.data(), dv.data());
      const int bad = compare("out", out, want.out, 1e-5) + compare("lse", lse, want.lse, 1e-5) +
                      compare("dq", dq, want.dq, 1e-4) + compare("dk", dk, want.dk, 1e-4) +
                      compare("dv", dv, want.dv, 1e-4);
      if (bad) std::printf("case %zu, %d threads: %d mismatches\n", n, threads, bad);
      failures += bad;
    }
  }
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
