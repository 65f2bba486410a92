// C++ unit test of the CPU rope3d, without torch or Python (run by ctest): against a direct
// rotation in double (from the same float angles) with positions of a few values per axis
// (tabulated angles) and spread over millions (angles per token), a zero-width section, the
// inverse rotation (which must undo the forward), in place (out == x), and 1 and 3 threads.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "attention/rope3d_cpu.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, int64_t spread, const int64_t* sections, double err) {
  if (!ok) {
    std::printf("FAIL %s: spread %ld, sections (%ld, %ld, %ld), error %.3g\n", what, static_cast<long>(spread),
                static_cast<long>(sections[0]), static_cast<long>(sections[1]), static_cast<long>(sections[2]), err);
    ++failures;
  }
}

void run_case(int64_t N, int64_t H, const int64_t sections[3], int64_t spread, int threads) {
  const int64_t D = sections[0] + sections[1] + sections[2], P = D / 2;
  std::mt19937 gen(static_cast<unsigned>(N * 31 + spread));
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int32_t> pos(-static_cast<int32_t>(spread), static_cast<int32_t>(spread));
  std::vector<float> x(N * H * D), out(N * H * D), back(N * H * D), inv_freq(P);
  std::vector<int32_t> positions(N * 3);
  for (float& e : x) e = normal(gen);
  for (int32_t& p : positions) p = pos(gen);
  int64_t pair = 0;
  for (int a = 0; a < 3; ++a) {
    for (int64_t j = 0; j < sections[a] / 2; ++j) {
      inv_freq[pair++] = static_cast<float>(std::pow(10000.0, -2.0 * j / sections[a]));
    }
  }
  omp_set_num_threads(threads);
  sora_kernels::attention::rope3d_cpu(x.data(), positions.data(), inv_freq.data(), sections, N, H, D, false,
                                      out.data());
  double err = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < P; ++i) {
      const int a = i < sections[0] / 2 ? 0 : (i < (sections[0] + sections[1]) / 2 ? 1 : 2);
      const double angle = static_cast<float>(positions[n * 3 + a]) * inv_freq[i];  // as the kernel rounds it
      const double c = std::cos(angle), s = std::sin(angle);
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = &x[(n * H + h) * D];
        const float* o = &out[(n * H + h) * D];
        err = std::max(err, std::abs(o[2 * i] - (xr[2 * i] * c - xr[2 * i + 1] * s)));
        err = std::max(err, std::abs(o[2 * i + 1] - (xr[2 * i + 1] * c + xr[2 * i] * s)));
      }
    }
  }
  check(err < 2e-5, "forward against double", spread, sections, err);
  back = out;  // in place: the inverse rotation must give x back
  sora_kernels::attention::rope3d_cpu(back.data(), positions.data(), inv_freq.data(), sections, N, H, D, true,
                                      back.data());
  double undo = 0.0;
  for (int64_t e = 0; e < N * H * D; ++e) undo = std::max(undo, std::abs(static_cast<double>(back[e]) - x[e]));
  check(undo < 2e-5, "inverse in place undoes the forward", spread, sections, undo);
}

}  // namespace

int main() {
  const int64_t default64[3] = {20, 22, 22}, no_t[3] = {0, 32, 32}, d40[3] = {12, 14, 14};
  for (int threads : {1, 3}) {
    for (int64_t spread : {int64_t{40}, int64_t{3000000}}) {
      run_case(257, 3, default64, spread, threads);
      run_case(100, 2, no_t, spread, threads);
      run_case(33, 1, d40, spread, threads);
      run_case(1, 4, default64, spread, threads);
    }
  }
  if (failures) return 1;
  std::printf("rope3d_cpu: all cases passed\n");
  return 0;
}
