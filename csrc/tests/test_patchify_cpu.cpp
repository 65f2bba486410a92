// C++ unit tests of the CPU patchify kernels, without torch or Python (run by ctest).
// Packs random videos of mixed sizes and compares every element with a direct loop
// over (video, t, h, w, c, i, j, k); then unpacks and checks the round trip.
#include <array>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "patchify/patchify_cpu.h"

using sora_kernels::patchify::PatchDims;
using sora_kernels::patchify::VideoSlot;

template <typename T>
static int check(const PatchDims& p, const std::vector<std::array<int64_t, 3>>& sizes, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<T>> videos;
  std::vector<VideoSlot> slots;
  int64_t N = 0;
  for (const auto& s : sizes) {
    videos.emplace_back(p.C * s[0] * s[1] * s[2]);
    for (auto& x : videos.back()) x = static_cast<T>(rng());
    slots.push_back({reinterpret_cast<int64_t>(videos.back().data()), s[0], s[1], s[2], N, 0, 1, 1});
    N += (s[0] / p.pt) * (s[1] / p.ph) * (s[2] / p.pw);
  }
  const int64_t D = p.dim(), n = static_cast<int64_t>(sizes.size());
  std::vector<T> tokens(N * D);
  std::vector<int32_t> positions(N * 3, -1);
  const int64_t rows = sora_kernels::patchify::assign_cpu_rows(slots.data(), n, p);
  sora_kernels::patchify::patchify_copy_cpu(true, slots.data(), n, rows, p, sizeof(T), tokens.data(),
                                            positions.data());
  int errors = 0;
  int64_t tok = 0;
  for (size_t v = 0; v < sizes.size(); ++v) {
    const int64_t T_ = sizes[v][0], H = sizes[v][1], W = sizes[v][2];
    for (int64_t tt = 0; tt < T_ / p.pt; ++tt)
      for (int64_t hh = 0; hh < H / p.ph; ++hh)
        for (int64_t ww = 0; ww < W / p.pw; ++ww, ++tok) {
          if ((positions[3 * tok] != tt || positions[3 * tok + 1] != hh || positions[3 * tok + 2] != ww) &&
              errors++ < 5)
            std::printf("wrong position: token %lld\n", (long long)tok);
          for (int64_t c = 0, f = 0; c < p.C; ++c)
            for (int64_t i = 0; i < p.pt; ++i)
              for (int64_t j = 0; j < p.ph; ++j)
                for (int64_t k = 0; k < p.pw; ++k, ++f) {
                  const T want = videos[v][((c * T_ + tt * p.pt + i) * H + hh * p.ph + j) * W + ww * p.pw + k];
                  if (tokens[tok * D + f] != want && errors++ < 5)
                    std::printf("mismatch: video %zu token %lld feature %lld\n", v, (long long)tok, (long long)f);
                }
        }
  }
  std::vector<std::vector<T>> back;
  for (size_t v = 0; v < sizes.size(); ++v) {
    back.emplace_back(videos[v].size());
    slots[v].data = reinterpret_cast<int64_t>(back.back().data());
  }
  sora_kernels::patchify::patchify_copy_cpu(false, slots.data(), n, rows, p, sizeof(T), tokens.data());
  for (size_t v = 0; v < sizes.size(); ++v)
    if (back[v] != videos[v] && errors++ < 5) std::printf("round trip differs for video %zu\n", v);
  return errors;
}

int main() {
  int errors = 0;
  errors += check<uint16_t>({16, 1, 2, 2}, {{13, 18, 32}, {5, 8, 8}, {1, 16, 24}, {1, 2, 2}}, 1);
  errors += check<uint32_t>({3, 2, 3, 5}, {{2, 3, 5}, {4, 9, 20}}, 2);
  errors += check<uint8_t>({5, 1, 1, 3}, {{1, 1, 3}, {3, 7, 9}}, 3);
  errors += check<uint64_t>({2, 1, 4, 1}, {{2, 8, 3}}, 4);
  // 4-byte runs take the 4x4 transpose path: R and Wg with remainders modulo 4.
  errors += check<uint16_t>({3, 1, 1, 2}, {{2, 3, 14}, {1, 5, 6}}, 5);
  errors += check<uint32_t>({5, 1, 2, 1}, {{3, 4, 9}, {1, 2, 40}}, 6);
  std::printf(errors ? "FAILED: %d errors\n" : "all patchify CPU checks passed\n", errors);
  return errors ? 1 : 0;
}
