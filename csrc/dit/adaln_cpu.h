// Segment-aware adaLN on packed rows, C++ with OpenMP (fp32). No torch headers: the glue
// (adaln_op.h) checks arguments and converts; CMake builds and unit-tests this file alone.
//
// Row r of x [N, D] belongs to segment seg[r]; shift, scale, gate are [n, D] per segment.
//   forward:  h = x + gate[seg] * y            (when y is given: the gated residual)
//             out = norm(h or x) * weight * (1 + scale[seg]) + shift[seg]
//             (LayerNorm without bias when layer, else RMSNorm; no modulation when scale
//              is null, no weight when weight is null)
//   backward: gradients of x (and y, gate), shift, scale, weight; the per-segment ones are
//             summed over the segment's rows.
#pragma once

#include <cstdint>

namespace sora_kernels {
namespace dit {

struct AdaLNArgs {
  const float* x;      // [N, D] the input (backward: what was normalised, h for the residual form)
  const float* y;      // [N, D] residual branch, or null
  const float* gate;   // [n, D], or null (with y)
  const float* shift;  // [n, D], or null (no modulation)
  const float* scale;  // [n, D], or null (no modulation)
  const float* weight; // [D], or null
  const int32_t* seg;  // [N] segment of each row, or null (no modulation, no residual)
  int64_t rows;        // N
  int64_t dim;         // D
  float eps;
  bool layer;          // LayerNorm (else RMSNorm)
};

// h [N, D] (with y), out [N, D], mean [N] (layer), rstd [N].
void adaln_forward_cpu(const AdaLNArgs& a, float* h, float* out, float* mean, float* rstd);

struct AdaLNGrads {
  float* dx;      // [N, D]
  float* dy;      // [N, D] (with y)
  float* dgate;   // [n, D] (with y), zeroed by the caller
  float* dshift;  // [n, D] (with scale), zeroed by the caller
  float* dscale;  // [n, D] (with scale), zeroed by the caller
  float* dweight; // [D] (with weight), zeroed by the caller
};

// dout [N, D] gradient of out; dh [N, D] gradient of h from its other uses (with y).
void adaln_backward_cpu(const AdaLNArgs& a, const float* dout, const float* dh, const float* mean,
                        const float* rstd, int64_t segments, const AdaLNGrads& g);

}  // namespace dit
}  // namespace sora_kernels
