// Vectorisable exp and sigmoid for the CPU kernels, included inside each kernel file's
// per-target namespaces (baseline x86-64, and AVX2 + FMA under `#pragma GCC target`): no include
// guard, no #includes (the including file includes <cstring> for std::memcpy).
//
// exp written so that `omp simd` loops vectorise it (libm's expf, nearbyintf and floorf are
// calls without -ffast-math / SSE4.1): e^z = 2^k * e^r with k = round(z / ln 2)
// (rounded by adding and subtracting 1.5 * 2^23), |r| <= ln2 / 2, and
// e^r = 1 + r + r^2 q(r), q of degree 4 fitted (weighted least squares on Chebyshev nodes)
// for least relative error on that interval (3e-9); 1 + r added last keeps the float rounding
// near half an ulp: 8.2e-8 maximum relative error over z in [-87, 0] and no bias (correct
// rounding: 6.0e-8). The earlier single degree-5 Horner polynomial erred by up to 2e-7 with a
// mean of +5e-8, which the attention backward, recomputing P = e^(S - lse) against the
// forward's out, amplified in dq to 3x PyTorch's float32 error. 2^k is built in the exponent
// bits. z is clamped to [-87, 88], where 2^k stays a normal float. group_norm's sigmoid8 is
// the same in 8 lanes.
constexpr float kExpMin = -87.f, kExpMax = 88.f;
constexpr float kLog2e = 1.44269504088896341f, kRoundMagic = 12582912.f;  // 1.5 * 2^23
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;  // ln 2 in two parts
// q(r) ~ sum kExpPoly[i] r^(4 - i), highest power first (Horner order); near 1/2, 1/6, 1/24, ...
constexpr int kExpDegree = 4;
constexpr float kExpPoly[kExpDegree + 1] = {0.0013815652346238494f, 0.008368710987269878f, 0.0416683666408062f,
                                             0.1666652113199234f, 0.4999999403953552f};

// e^r for |r| <= ln2 / 2.
inline float exp_reduced(float r) {
  float q = kExpPoly[0];
  for (int i = 1; i <= kExpDegree; ++i) q = q * r + kExpPoly[i];
  return ((r * r) * q + r) + 1.f;
}

inline float exp_approx(float z) {
  z = z < kExpMin ? kExpMin : (z > kExpMax ? kExpMax : z);
  const float k = (z * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (z - k * kLn2Hi) - k * kLn2Lo;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return exp_reduced(r) * two_k;
}

// 0 below -kExpMax, where e^-z would pass the clamp (1 / (1 + e^88) would stay ~6e-39, and a
// gelu derivative multiplies it by v^3); NaN stays NaN (the compare is false).
inline float sigmoid(float z) { return z < -kExpMax ? 0.f : 1.f / (1.f + exp_approx(-z)); }

