// Compiles one kernel header twice, for the baseline x86-64 target and for AVX2 + FMA (the
// extension is built for baseline x86-64, SSE2: 4 lanes without FMA); the kernels pick the copy
// at run time with cpu_has_avx2_fma(). Include it, inside the kernel file's namespace, after
// defining SORA_KERNELS_PER_TARGET as the header's quoted path:
//
//   #define SORA_KERNELS_PER_TARGET "vae/group_norm_cpu_impl.h"
//   #include "common/per_target.h"        // -> namespace generic {...} and, on x86-64 GCC,
//                                         //    namespace avx2 {...}; SORA_KERNELS_AVX2 defined
//
// Inside, SORA_KERNELS_AVX2_INTRINSICS is 0 in the generic copy and 1 in the AVX2 one (for
// hand-written intrinsics). No include guard: each kernel file includes it once per header.
// The including file includes <cstdlib> and <cstring> (and <immintrin.h> on x86-64) at file
// scope first.

namespace generic {
#define SORA_KERNELS_AVX2_INTRINSICS 0
#include SORA_KERNELS_PER_TARGET
#undef SORA_KERNELS_AVX2_INTRINSICS
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define SORA_KERNELS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define SORA_KERNELS_AVX2_INTRINSICS 1
#include SORA_KERNELS_PER_TARGET
#undef SORA_KERNELS_AVX2_INTRINSICS
}  // namespace avx2
#pragma GCC pop_options
#endif

#undef SORA_KERNELS_PER_TARGET

#ifndef SORA_KERNELS_CPU_HAS_AVX2_FMA
#define SORA_KERNELS_CPU_HAS_AVX2_FMA
// Whether this CPU runs the avx2 copies (checked once). SORA_KERNELS_CPU_BASELINE=1 in the
// environment keeps the baseline copies (ctest runs every test both ways).
inline bool cpu_has_avx2_fma() {
#ifdef SORA_KERNELS_AVX2
  static const char* baseline = std::getenv("SORA_KERNELS_CPU_BASELINE");
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !(baseline != nullptr && std::strcmp(baseline, "1") == 0);
  return ok;
#else
  return false;
#endif
}
#endif
