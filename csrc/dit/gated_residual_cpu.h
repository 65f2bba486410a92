// Gated residual and MLP activations on the CPU (fp32, OpenMP), no torch headers.
#pragma once

#include <cstdint>

namespace sora_kernels {
namespace dit {

// out = x + gate[seg] * y for rows x, y [N, D], gate [n, D].
void gated_residual_forward_cpu(const float* x, const float* y, const float* gate, const int32_t* seg, int64_t rows,
                                int64_t dim, float* out);
// dy = dout * gate[seg]; dgate[s] += sum over the rows of s of dout * y (dgate zeroed by the caller).
void gated_residual_backward_cpu(const float* dout, const float* y, const float* gate, const int32_t* seg,
                                 int64_t rows, int64_t dim, float* dy, float* dgate);

// kind 0: gelu_tanh(a); kind 1: silu(a) * b. With dout: da (and db for kind 1) instead.
void activation_cpu(int kind, const float* a, const float* b, const float* dout, int64_t n, float* out, float* db);

}  // namespace dit
}  // namespace sora_kernels
