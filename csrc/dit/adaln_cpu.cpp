#include "dit/adaln_cpu.h"
#include "dit/segment_sums.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace sora_kernels {
namespace dit {

// The kernels for baseline x86-64 and for AVX2 + FMA, picked at run time.
#define SORA_KERNELS_PER_TARGET "dit/adaln_cpu_impl.h"
#include "common/per_target.h"

void adaln_forward_cpu(const AdaLNArgs& a, float* h, float* out, float* mean, float* rstd) {
#ifdef SORA_KERNELS_AVX2
  if (cpu_has_avx2_fma()) return avx2::forward(a, h, out, mean, rstd);
#endif
  generic::forward(a, h, out, mean, rstd);
}

void adaln_backward_cpu(const AdaLNArgs& a, const float* dout, const float* dh, const float* mean,
                        const float* rstd, int64_t /*segments*/, const AdaLNGrads& g) {
#ifdef SORA_KERNELS_AVX2
  if (cpu_has_avx2_fma()) return avx2::backward(a, dout, dh, mean, rstd, g);
#endif
  generic::backward(a, dout, dh, mean, rstd, g);
}

}  // namespace dit
}  // namespace sora_kernels
