// The MLP activations' loops, included twice by gated_residual_cpu.cpp: once for the baseline
// x86-64 / any target, once under `#pragma GCC target("avx2,fma")`; each copy inside its own
// namespace (so no include guard, and no #includes here but the exp and sigmoid). Every loop
// is one `omp parallel for simd` over contiguous values, each op and direction its own loop so
// that nothing branches inside it: the exp is common/fast_exp_impl.h's polynomial (std::tanh
// and std::exp are library calls that do not vectorise; the old single loop ran 7x slower than
// PyTorch's eager gelu).
//
// gelu_tanh(v) = 0.5 v (1 + tanh(u)), u = k0 (v + k1 v^3), computed as v * sigmoid(2u) (since
// 0.5 (1 + tanh(u)) = sigmoid(2u)), which also spares the cancellation of 1 + tanh(u) for
// negative v. Its derivative: s + v * 2 s (1 - s) * k0 (1 + 3 k1 v^2), s = sigmoid(2u)
// (0.5 (1 - tanh^2) = 2 s (1 - s)).
#include "common/fast_exp_impl.h"

constexpr float kGeluK0 = 0.7978845608028654f, kGeluK1 = 0.044715f;  // sqrt(2 / pi), the cubic's

inline float gelu_sigmoid(float v) { return sigmoid(2.f * kGeluK0 * (v + kGeluK1 * v * v * v)); }

inline void gelu_tanh_forward(const float* a, int64_t n, float* out) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * gelu_sigmoid(a[i]);
}

inline void gelu_tanh_backward(const float* a, const float* dout, int64_t n, float* da) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = a[i], s = gelu_sigmoid(v);
    da[i] = dout[i] * (s + v * 2.f * s * (1.f - s) * kGeluK0 * (1.f + 3.f * kGeluK1 * v * v));
  }
}

// swiglu(a, b) = silu(a) * b
inline void swiglu_forward(const float* a, const float* b, int64_t n, float* out) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * sigmoid(a[i]) * b[i];
}

// da = dout * b * s (1 + a (1 - s)), db = dout * silu(a), s = sigmoid(a)
inline void swiglu_backward(const float* a, const float* b, const float* dout, int64_t n, float* da, float* db) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = a[i], s = sigmoid(v);
    da[i] = dout[i] * b[i] * s * (1.f + v * (1.f - s));
    db[i] = dout[i] * v * s;
  }
}

inline void activation(int kind, const float* a, const float* b, const float* dout, int64_t n, float* out, float* db) {
  if (kind == 0) {
    if (dout) gelu_tanh_backward(a, dout, n, out);
    else gelu_tanh_forward(a, n, out);
  } else {
    if (dout) swiglu_backward(a, b, dout, n, out, db);
    else swiglu_forward(a, b, n, out);
  }
}
