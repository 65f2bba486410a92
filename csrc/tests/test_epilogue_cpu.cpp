// C++ unit test of the decoder's epilogue CPU kernels, without torch or Python (run by ctest):
// frames_to_uint8 on a tie, clamps and NaN against values worked out by hand, and
// latent_denorm's values and per-(batch, frame) NaN counts against a direct loop.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "vae/epilogue_cpu.h"

int main() {
  int failures = 0;
  // frames: C = 2 planes of P = 5 positions -> [P, C] bytes
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // v = (x + 1) * 127.5. Plane 0: -3 -> 0 (clamped); 0 -> 127.5 -> 128 (the one exact tie in
  // range, to even); -0.5 -> 63.75 -> 64; 0.25 -> 159.375 -> 159; NaN -> 0. Plane 1: 1 -> 255;
  // 7 -> 255; -1 -> 0; 0.5 -> 191.25 -> 191; -0.99 -> 1.275 -> 1. (Near-ties against torch's
  // float arithmetic are checked bit for bit in tests/test_frames_to_uint8.py.)
  std::vector<float> x = {-3.f, 0.f, -0.5f, 0.25f, nan, 1.f, 7.f, -1.f, 0.5f, -0.99f};
  std::vector<uint8_t> want = {0, 255, 128, 255, 64, 0, 159, 191, 0, 1}, out(10);
  sora_kernels::vae::frames_to_uint8_cpu(x.data(), out.data(), 2, 5, /*c_stride=*/5, /*p_stride=*/1);
  // the same values channels-last ([P, C] already, read with strides (1, C)) give the same bytes
  std::vector<float> xl(10);
  for (int p = 0; p < 5; ++p)
    for (int c = 0; c < 2; ++c) xl[p * 2 + c] = x[c * 5 + p];
  std::vector<uint8_t> outl(10);
  sora_kernels::vae::frames_to_uint8_cpu(xl.data(), outl.data(), 2, 5, /*c_stride=*/1, /*p_stride=*/2);
  for (int i = 0; i < 10; ++i)
    if (out[i] != want[i] || outl[i] != want[i]) {
      std::printf("frames_to_uint8: byte %d is %d (channels-last %d), expected %d\n", i, out[i], outl[i], want[i]);
      ++failures;
    }
  // latent_denorm: B = 2, C = 3, T = 2, S = 4, NaN at two places of (b=1, t=0) and one of (b=0, t=1)
  const int64_t B = 2, C = 3, T = 2, S = 4;
  std::vector<float> z(B * C * T * S), o(z.size()), scale = {2.f, 0.5f, -1.f}, shift = {1.f, 0.f, 3.f};
  for (size_t i = 0; i < z.size(); ++i) z[i] = 0.25f * static_cast<float>(i) - 3.f;
  auto at = [&](int64_t b, int64_t c, int64_t t, int64_t s) { return ((b * C + c) * T + t) * S + s; };
  z[at(1, 0, 0, 2)] = z[at(1, 2, 0, 3)] = z[at(0, 1, 1, 0)] = nan;
  std::vector<int32_t> count(B * T, -1);
  sora_kernels::vae::latent_denorm_cpu(z.data(), o.data(), scale.data(), shift.data(), count.data(), B, C, T, S);
  const std::vector<int32_t> want_count = {0, 1, 2, 0};  // [b, t]
  for (int i = 0; i < B * T; ++i)
    if (count[i] != want_count[i]) {
      std::printf("latent_denorm: NaN count [%d] is %d, expected %d\n", i, count[i], want_count[i]);
      ++failures;
    }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < S; ++s) {
          const float v = z[at(b, c, t, s)], got = o[at(b, c, t, s)], expect = v * scale[c] + shift[c];
          if (std::isnan(v) ? !std::isnan(got) : got != expect) {
            std::printf("latent_denorm: [%ld, %ld, %ld, %ld] is %g, expected %g\n", static_cast<long>(b),
                        static_cast<long>(c), static_cast<long>(t), static_cast<long>(s), got, expect);
            ++failures;
          }
        }
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures != 0;
}
