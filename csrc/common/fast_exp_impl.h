// Vectorisable exp and sigmoid for the CPU kernels, included inside each kernel file's
// per-target namespaces (baseline x86-64, and AVX2 + FMA under `#pragma GCC target`): no include
// guard, no #includes (the including file includes <cstring> for std::memcpy).
//
// exp written so that `omp simd` loops vectorise it (libm's expf, nearbyintf and floorf are
// calls without -ffast-math / SSE4.1): e^z = 2^k * e^r with k = round(z / ln 2)
// (rounded by adding and subtracting 1.5 * 2^23), |r| <= ln2 / 2, e^r by a degree-5
// polynomial fitted for least maximum relative error on that interval (7.5e-8; 2.1e-7 with
// float Horner rounding), 2^k built in the exponent bits. z is clamped to [-87, 88], where 2^k
// stays a normal float. group_norm's sigmoid8 is the same in 8 lanes.
constexpr float kExpMin = -87.f, kExpMax = 88.f;
constexpr float kLog2e = 1.44269504088896341f, kRoundMagic = 12582912.f;  // 1.5 * 2^23
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;  // ln 2 in two parts
// e^r ~ sum kExpPoly[i] r^(5 - i), highest power first (Horner order)
constexpr int kExpDegree = 5;
constexpr float kExpPoly[kExpDegree + 1] = {0.008297646418213844f, 0.04191538318991661f, 0.16667574644088745f,
                                             0.49998894333839417f, 0.9999997019767761f, 1.0000001192092896f};

inline float exp_approx(float z) {
  z = z < kExpMin ? kExpMin : (z > kExpMax ? kExpMax : z);
  const float k = (z * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (z - k * kLn2Hi) - k * kLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i <= kExpDegree; ++i) p = p * r + kExpPoly[i];
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return p * two_k;
}

// 0 below -kExpMax, where e^-z would pass the clamp (1 / (1 + e^88) would stay ~6e-39, and a
// gelu derivative multiplies it by v^3); NaN stays NaN (the compare is false).
inline float sigmoid(float z) { return z < -kExpMax ? 0.f : 1.f / (1.f + exp_approx(-z)); }

