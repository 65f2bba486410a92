// The per-frame GroupNorm + SiLU kernels, included twice by group_norm_cpu.cpp: once for the
// baseline x86-64 / any target, once under `#pragma GCC target("avx2,fma")`; each copy
// inside its own namespace (so no include guard, and no #includes here but the other such
// header, the exp and sigmoid).

#include "common/fast_exp_impl.h"

inline float silu(float z) { return z * sigmoid(z); }

// d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
inline float silu_grad(float z) {
  const float s = sigmoid(z);
  return s * (1.f + z * (1.f - s));
}

#if SORA_KERNELS_AVX2_INTRINSICS
// 1 + e^-z of 8 lanes (this copy is compiled for AVX2 + FMA), e^-z as exp_approx computes it.
// The rounding constant also carries the exponent bias, so the bits of
// t = round(-z log2 e) + 127 + 1.5 * 2^23 shifted left by 23 are 2^k itself (t's low mantissa
// bits hold k + 127, in [1, 254] after the clamp; the shift drops the rest). The clamp keeps
// NaN (the constant goes first: min and max return their second operand when one is NaN).
inline __m256 one_plus_exp_neg8(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.f), magic = _mm256_set1_ps(kRoundMagic + 127.f);
  // m = -(the exponent), clamped so that -m is in [kExpMin, kExpMax]
  const __m256 m = _mm256_max_ps(_mm256_set1_ps(-kExpMax), _mm256_min_ps(_mm256_set1_ps(-kExpMin), z));
  const __m256 t = _mm256_fnmadd_ps(m, _mm256_set1_ps(kLog2e), magic);
  const __m256 k = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmsub_ps(k, _mm256_set1_ps(kLn2Hi), m);  // -m - k ln2, in two parts
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 q = _mm256_set1_ps(kExpPoly[0]);  // e^r = 1 + r + r^2 q(r), as exp_reduced
  for (int i = 1; i <= kExpDegree; ++i) q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256 p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(r, r), q, r), one);
  const __m256 two_k = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_fmadd_ps(p, two_k, one);  // 1 + e^-z
}

// Lanes below -kExpMax, where sigmoid() is 0 (an ordered compare: NaN lanes keep their NaN).
inline __m256 below_exp_range8(__m256 z) { return _mm256_cmp_ps(z, _mm256_set1_ps(-kExpMax), _CMP_LT_OQ); }

// sigmoid and SiLU of 8 lanes divide by 1 + e^-z (vdivps, correctly rounded). The loops are
// bound by the two FMA pipes (the affine and the exp are 11 of their operations), and the
// divider is a unit of its own: z / d is one operation where the reciprocal estimate refined
// by a Newton step and then times z was three on those pipes. The SiLU forward of
// group_norm_silu ran 12-15% faster (best of 8 alternating runs, channels-last and contiguous,
// 2026-12-06), the backward 2-3%.
inline __m256 sigmoid8(__m256 z) {
  return _mm256_andnot_ps(below_exp_range8(z), _mm256_div_ps(_mm256_set1_ps(1.f), one_plus_exp_neg8(z)));
}

inline __m256 silu8(__m256 z) {
  return _mm256_andnot_ps(below_exp_range8(z), _mm256_div_ps(z, one_plus_exp_neg8(z)));
}

// q = silu(q) in place.
inline void silu_inplace(float* q, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(q + i, silu8(_mm256_loadu_ps(q + i)));
  for (; i < n; ++i) q[i] = silu(q[i]);
}

// q = silu'(q) = s (1 + q (1 - s)) in place, s = sigmoid(q).
inline void silu_grad_inplace(float* q, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 z = _mm256_loadu_ps(q + i), sg = sigmoid8(z);
    _mm256_storeu_ps(q + i, _mm256_mul_ps(sg, _mm256_fmadd_ps(z, _mm256_sub_ps(one, sg), one)));
  }
  for (; i < n; ++i) q[i] = silu_grad(q[i]);
}

// y = silu(x * scale + shift) over n values, the affine and the SiLU in one pass of registers.
inline void affine_silu(const float* x, float* y, int64_t n, float scale, float shift) {
  const __m256 sc = _mm256_set1_ps(scale), sh = _mm256_set1_ps(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, silu8(_mm256_fmadd_ps(_mm256_loadu_ps(x + i), sc, sh)));
  for (; i < n; ++i) y[i] = silu(x[i] * scale + shift);
}

// y[c] = silu(x[c] * scale[c] + shift[c]) over one channels-last row of C values.
inline void affine_silu_row(const float* x, float* y, int64_t C, const float* scale, const float* shift) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 z = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(scale + c), _mm256_loadu_ps(shift + c));
    _mm256_storeu_ps(y + c, silu8(z));
  }
  for (; c < C; ++c) y[c] = silu(x[c] * scale[c] + shift[c]);
}
#else
inline void silu_inplace(float* q, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = silu(q[i]);
}

inline void silu_grad_inplace(float* q, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = silu_grad(q[i]);
}

inline void affine_silu(const float* x, float* y, int64_t n, float scale, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = silu(x[i] * scale + shift);
}

inline void affine_silu_row(const float* x, float* y, int64_t C, const float* scale, const float* shift) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) y[c] = silu(x[c] * scale[c] + shift[c]);
}
#endif

// y = act(x * scale + shift) over n contiguous values.
template <bool SILU>
inline void affine_activate(const float* x, float* y, int64_t n, float scale, float shift) {
  if constexpr (SILU) {
    affine_silu(x, y, n, scale, shift);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + shift;
  }
}

constexpr int64_t kBlock = 256;  // positions summed in float before a double accumulator

inline int64_t offset(const GroupNormArgs& a, int64_t b, int64_t c, int64_t t) {
  return b * a.stride_b + c * a.stride_c + t * a.stride_t;
}

// Per-channel affine of one frame: z = x * scale[c] + shift[c], from the group statistics.
inline void frame_affine(const GroupNormArgs& a, const float* mean, const float* rstd, float* scale, float* shift) {
  const int64_t Cg = a.channels / a.groups;
  for (int64_t c = 0; c < a.channels; ++c) {
    const float w = a.weight ? a.weight[c] : 1.f, bias = a.bias ? a.bias[c] : 0.f;
    scale[c] = rstd[c / Cg] * w;
    shift[c] = bias - mean[c / Cg] * scale[c];
  }
}

// ---- contiguous layout: each (b, c, t) plane is S contiguous positions --------------------

// Sums of d = p[s] - shift and of d * d over a plane (float within blocks, double across).
inline void plane_shifted_sums(const float* p, int64_t S, float shift, double& sum, double& sum_sq) {
  for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
    const int64_t s1 = s0 + kBlock < S ? s0 + kBlock : S;
    float acc = 0.f, acc_sq = 0.f;
#pragma omp simd reduction(+ : acc, acc_sq)
    for (int64_t s = s0; s < s1; ++s) {
      const float d = p[s] - shift;
      acc += d;
      acc_sq += d * d;
    }
    sum += acc;
    sum_sq += acc_sq;
  }
}

// y over one (b, t, group) of the contiguous layout from its statistics mu, r.
template <bool SILU>
inline void apply_group_contiguous(const GroupNormArgs& a, int64_t b, int64_t g, int64_t t, float mu, float r,
                                   float* y) {
  const int64_t Cg = a.channels / a.groups;
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    const float w = a.weight ? a.weight[c] : 1.f, bias = a.bias ? a.bias[c] : 0.f;
    const float scale = r * w, shift = bias - mu * scale;
    const int64_t o = offset(a, b, c, t);
    affine_activate<SILU>(a.x + o, y + o, a.positions, scale, shift);
  }
}

template <bool SILU>
void forward_contiguous(const GroupNormArgs& a, float* y, float* mean, float* rstd) {
  const int64_t G = a.groups, Cg = a.channels / G, S = a.positions;
  const double n = static_cast<double>(Cg * S);
  const int64_t tasks = a.batch * a.frames * G;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t g = task % G, bt = task / G, t = bt % a.frames, b = bt / a.frames;
    // One pass: sums of x - k and (x - k)^2 with k a value of the group (its first), so the
    // variance E[d^2] - E[d]^2 cancels only as much as k is off the mean (a sample is about
    // a standard deviation off), not as much as the mean is off zero.
    const float k = a.x[offset(a, b, g * Cg, t)];
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) plane_shifted_sums(a.x + offset(a, b, c, t), S, k, sum, sum_sq);
    const double dm = sum / n;
    const float mu = static_cast<float>(k + dm);
    const double var = sum_sq / n - dm * dm;
    const float r = static_cast<float>(1.0 / std::sqrt((var > 0.0 ? var : 0.0) + a.eps));
    mean[bt * G + g] = mu;
    rstd[bt * G + g] = r;
    apply_group_contiguous<SILU>(a, b, g, t, mu, r, y);
  }
}

template <bool SILU>
void apply_contiguous(const GroupNormArgs& a, const float* mean, const float* rstd, float* y) {
  const int64_t G = a.groups, tasks = a.batch * a.frames * G;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t g = task % G, bt = task / G, t = bt % a.frames, b = bt / a.frames;
    apply_group_contiguous<SILU>(a, b, g, t, mean[bt * G + g], rstd[bt * G + g], y);
  }
}

template <bool SILU>
void backward_contiguous(const GroupNormArgs& a, const float* dy, const float* mean, const float* rstd, float* dx,
                         float* dweight_rows, float* dbias_rows) {
  const int64_t G = a.groups, Cg = a.channels / G, S = a.positions, C = a.channels;
  const float inv_n = 1.f / static_cast<float>(Cg * S);
  const int64_t tasks = a.batch * a.frames * G;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t g = task % G, bt = task / G, t = bt % a.frames, b = bt / a.frames;
    const float mu = mean[bt * G + g], r = rstd[bt * G + g];
    double sum_dzw = 0.0, sum_dzw_xhat = 0.0;  // over the group: dz * w, dz * w * xhat
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      const float w = a.weight ? a.weight[c] : 1.f, bias = a.bias ? a.bias[c] : 0.f;
      const int64_t o = offset(a, b, c, t);
      const float* p = a.x + o;
      const float* d = dy + o;
      float* q = dx + o;  // holds dz until the second loop turns it into dx
      double sdz = 0.0, sdzx = 0.0;
      for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
        const int64_t s1 = s0 + kBlock < S ? s0 + kBlock : S;
        float acc = 0.f, accx = 0.f;
        if constexpr (SILU) {  // q = silu'(z) first, 8 lanes at a time
#pragma omp simd
          for (int64_t s = s0; s < s1; ++s) q[s] = ((p[s] - mu) * r) * w + bias;
          silu_grad_inplace(q + s0, s1 - s0);
        }
#pragma omp simd reduction(+ : acc, accx)
        for (int64_t s = s0; s < s1; ++s) {
          const float xhat = (p[s] - mu) * r;
          const float dz = SILU ? d[s] * q[s] : d[s];
          q[s] = dz;
          acc += dz;
          accx += dz * xhat;
        }
        sdz += acc;
        sdzx += accx;
      }
      dbias_rows[bt * C + c] = static_cast<float>(sdz);
      dweight_rows[bt * C + c] = static_cast<float>(sdzx);
      sum_dzw += sdz * w;
      sum_dzw_xhat += sdzx * w;
    }
    // given statistics are constants: dx = r * w * dz, without the group means of dz terms
    const float m1 = a.given ? 0.f : static_cast<float>(sum_dzw) * inv_n;
    const float m2 = a.given ? 0.f : static_cast<float>(sum_dzw_xhat) * inv_n;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      const float w = a.weight ? a.weight[c] : 1.f;
      const int64_t o = offset(a, b, c, t);
      const float* p = a.x + o;
      float* q = dx + o;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const float xhat = (p[s] - mu) * r;
        q[s] = r * (q[s] * w - m1 - xhat * m2);  // q[s] is dz from the first loop
      }
    }
  }
}

// ---- channels-last layout: each position of a frame is C contiguous channels ---------------

// Per channel, sums over positions [s_begin, s_end) of a frame of d = x[s, c] - k[c] and of
// d * d (float within blocks of positions, double across), added to sum and sum_sq.
inline void channel_shifted_sums(const GroupNormArgs& a, const float* frame, const float* k, int64_t s_begin,
                                 int64_t s_end, float* acc, float* acc_sq, double* sum, double* sum_sq) {
  const int64_t C = a.channels;
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kBlock) {
    const int64_t s1 = s0 + kBlock < s_end ? s0 + kBlock : s_end;
    std::fill(acc, acc + C, 0.f);
    std::fill(acc_sq, acc_sq + C, 0.f);
    for (int64_t s = s0; s < s1; ++s) {
      const float* row = frame + s * a.stride_s;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float d = row[c] - k[c];
        acc[c] += d;
        acc_sq[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum[c] += acc[c];
      sum_sq[c] += acc_sq[c];
    }
  }
}

// Positions per task of the channels-last forward: frames are split into chunks so that a
// few frames (a chunked decode's) still keep every thread busy.
constexpr int64_t kPositionChunk = 1024;

// y = act(x * scale[c] + shift[c]) over every frame, scale and shift [B * T, C]: (frame,
// chunk of positions) tasks.
template <bool SILU>
void apply_frames_channels_last(const GroupNormArgs& a, const float* scale, const float* shift, float* y) {
  const int64_t C = a.channels, S = a.positions;
  const int64_t frames = a.batch * a.frames, chunks = (S + kPositionChunk - 1) / kPositionChunk;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < frames * chunks; ++task) {
    const int64_t bt = task / chunks, chunk = task % chunks, t = bt % a.frames, b = bt / a.frames;
    const float* frame = a.x + offset(a, b, 0, t);
    float* out = y + offset(a, b, 0, t);
    const float* sc = scale + bt * C;
    const float* sh = shift + bt * C;
    const int64_t s_end = std::min(S, (chunk + 1) * kPositionChunk);
    for (int64_t s = chunk * kPositionChunk; s < s_end; ++s) {
      const float* row = frame + s * a.stride_s;
      float* q = out + s * a.stride_s;
      if constexpr (SILU) {
        affine_silu_row(row, q, C, sc, sh);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) q[c] = row[c] * sc[c] + sh[c];
      }
    }
  }
}

template <bool SILU>
void forward_channels_last(const GroupNormArgs& a, float* y, float* mean, float* rstd) {
  const int64_t G = a.groups, C = a.channels, Cg = C / G, S = a.positions;
  const double n = static_cast<double>(Cg * S);
  const int64_t frames = a.batch * a.frames, chunks = (S + kPositionChunk - 1) / kPositionChunk;
  // Pass 1, (frame, chunk) tasks: per-channel sums of x - k_c and (x - k_c)^2, with k_c the
  // frame's first value of the channel (shared by the frame's chunks, so the sums add up).
  std::vector<double> sums(frames * chunks * C), sums_sq(frames * chunks * C);
#pragma omp parallel
  {
    std::vector<float> acc(C), acc_sq(C);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < frames * chunks; ++task) {
      const int64_t bt = task / chunks, chunk = task % chunks, t = bt % a.frames, b = bt / a.frames;
      const float* frame = a.x + offset(a, b, 0, t);
      const int64_t s_begin = chunk * kPositionChunk, s_end = std::min(S, s_begin + kPositionChunk);
      channel_shifted_sums(a, frame, frame, s_begin, s_end, acc.data(), acc_sq.data(), &sums[task * C],
                           &sums_sq[task * C]);
    }
  }
  // The group statistics of each frame: mean, then the centred M2 from the shifted sums.
  std::vector<float> scale(frames * C), shift(frames * C);
  for (int64_t bt = 0; bt < frames; ++bt) {
    const int64_t t = bt % a.frames, b = bt / a.frames;
    const float* k = a.x + offset(a, b, 0, t);
    for (int64_t g = 0; g < G; ++g) {
      double s1 = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        s1 += S * static_cast<double>(k[c]);
        for (int64_t chunk = 0; chunk < chunks; ++chunk) s1 += sums[(bt * chunks + chunk) * C + c];
      }
      const double m = s1 / n;
      double m2 = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        double sd = 0.0, sd2 = 0.0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          sd += sums[(bt * chunks + chunk) * C + c];
          sd2 += sums_sq[(bt * chunks + chunk) * C + c];
        }
        const double off = k[c] - m;  // sum of (x - m)^2 = sum d^2 + 2 off sum d + S off^2
        m2 += sd2 + 2.0 * off * sd + S * off * off;
      }
      mean[bt * G + g] = static_cast<float>(m);
      rstd[bt * G + g] = static_cast<float>(1.0 / std::sqrt((m2 > 0.0 ? m2 : 0.0) / n + a.eps));
    }
    frame_affine(a, mean + bt * G, rstd + bt * G, &scale[bt * C], &shift[bt * C]);
  }
  apply_frames_channels_last<SILU>(a, scale.data(), shift.data(), y);
}

template <bool SILU>
void apply_channels_last(const GroupNormArgs& a, const float* mean, const float* rstd, float* y) {
  const int64_t G = a.groups, C = a.channels, frames = a.batch * a.frames;
  std::vector<float> scale(frames * C), shift(frames * C);
  for (int64_t bt = 0; bt < frames; ++bt) frame_affine(a, mean + bt * G, rstd + bt * G, &scale[bt * C], &shift[bt * C]);
  apply_frames_channels_last<SILU>(a, scale.data(), shift.data(), y);
}

template <bool SILU>
void backward_channels_last(const GroupNormArgs& a, const float* dy, const float* mean, const float* rstd, float* dx,
                            float* dweight_rows, float* dbias_rows) {
  const int64_t G = a.groups, C = a.channels, Cg = C / G, S = a.positions;
  const float inv_n = 1.f / static_cast<float>(Cg * S);
  const int64_t frames = a.batch * a.frames;
#pragma omp parallel
  {
    std::vector<float> mc(C), rc(C), w(C), bias(C), m1c(C), m2c(C), block(C), blockx(C);
    std::vector<double> sdz(C), sdzx(C);
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < frames; ++bt) {
      const int64_t t = bt % a.frames, b = bt / a.frames;
      const int64_t o = offset(a, b, 0, t);
      for (int64_t c = 0; c < C; ++c) {
        mc[c] = mean[bt * G + c / Cg];
        rc[c] = rstd[bt * G + c / Cg];
        w[c] = a.weight ? a.weight[c] : 1.f;
        bias[c] = a.bias ? a.bias[c] : 0.f;
        sdz[c] = sdzx[c] = 0.0;
      }
      const float *m = mc.data(), *r = rc.data(), *wp = w.data(), *bp = bias.data();
      for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
        const int64_t s1 = s0 + kBlock < S ? s0 + kBlock : S;
        std::fill(block.begin(), block.end(), 0.f);
        std::fill(blockx.begin(), blockx.end(), 0.f);
        float *acc = block.data(), *accx = blockx.data();
        for (int64_t s = s0; s < s1; ++s) {
          const float* row = a.x + o + s * a.stride_s;
          const float* d = dy + o + s * a.stride_s;
          float* q = dx + o + s * a.stride_s;  // holds dz until the last loop turns it into dx
          if constexpr (SILU) {  // q = silu'(z) first, 8 lanes at a time
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) q[c] = ((row[c] - m[c]) * r[c]) * wp[c] + bp[c];
            silu_grad_inplace(q, C);
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float xhat = (row[c] - m[c]) * r[c];
            const float dz = SILU ? d[c] * q[c] : d[c];
            q[c] = dz;
            acc[c] += dz;
            accx[c] += dz * xhat;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          sdz[c] += acc[c];
          sdzx[c] += accx[c];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          s1 += sdz[c] * wp[c];
          s2 += sdzx[c] * wp[c];
        }
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {  // given statistics: no group means (as above)
          m1c[c] = a.given ? 0.f : static_cast<float>(s1) * inv_n;
          m2c[c] = a.given ? 0.f : static_cast<float>(s2) * inv_n;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        dbias_rows[bt * C + c] = static_cast<float>(sdz[c]);
        dweight_rows[bt * C + c] = static_cast<float>(sdzx[c]);
      }
      const float *m1 = m1c.data(), *m2 = m2c.data();
      for (int64_t s = 0; s < S; ++s) {
        const float* row = a.x + o + s * a.stride_s;
        float* q = dx + o + s * a.stride_s;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float xhat = (row[c] - m[c]) * r[c];
          q[c] = r[c] * (q[c] * wp[c] - m1[c] - xhat * m2[c]);  // q[c] is dz from the first loop
        }
      }
    }
  }
}

// Channels-last when the channels are the unit-stride axis (C > 1); otherwise the positions
// of a plane are (the glue makes x one of the two).
inline bool channels_last(const GroupNormArgs& a) { return a.stride_c == 1 && a.channels > 1; }


inline void forward(const GroupNormArgs& a, float* y, float* mean, float* rstd) {
  if (channels_last(a)) {
    a.silu ? forward_channels_last<true>(a, y, mean, rstd) : forward_channels_last<false>(a, y, mean, rstd);
  } else {
    a.silu ? forward_contiguous<true>(a, y, mean, rstd) : forward_contiguous<false>(a, y, mean, rstd);
  }
}

inline void backward(const GroupNormArgs& a, const float* dy, const float* mean, const float* rstd,
                             float* dx, float* dweight_rows, float* dbias_rows) {
  if (channels_last(a)) {
    a.silu ? backward_channels_last<true>(a, dy, mean, rstd, dx, dweight_rows, dbias_rows)
           : backward_channels_last<false>(a, dy, mean, rstd, dx, dweight_rows, dbias_rows);
  } else {
    a.silu ? backward_contiguous<true>(a, dy, mean, rstd, dx, dweight_rows, dbias_rows)
           : backward_contiguous<false>(a, dy, mean, rstd, dx, dweight_rows, dbias_rows);
  }
}


inline void apply(const GroupNormArgs& a, const float* mean, const float* rstd, float* y) {
  if (channels_last(a)) {
    a.silu ? apply_channels_last<true>(a, mean, rstd, y) : apply_channels_last<false>(a, mean, rstd, y);
  } else {
    a.silu ? apply_contiguous<true>(a, mean, rstd, y) : apply_contiguous<false>(a, mean, rstd, y);
  }
}

// ---- moments of a strided view: a tiled decode's statistics passes -------------------------

// Per (b, t, group): shifted sums (k the group's first value, as the forward's) over rows of W
// positions, float within blocks of a row and double across; then mean = k + sum / n and
// m2 = sum_sq - sum^2 / n.
inline void moments(const MomentsArgs& a, double* mean, double* m2) {
  const int64_t G = a.groups, Cg = a.channels / G, H = a.height, W = a.width;
  const int64_t n = Cg * H * W, tasks = a.batch * a.frames * G;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t g = task % G, bt = task / G, t = bt % a.frames, b = bt / a.frames;
    if (n == 0) {
      mean[task] = m2[task] = 0.0;
      continue;
    }
    const float* frame = a.x + b * a.stride_b + t * a.stride_t;
    const float k = frame[g * Cg * a.stride_c];
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      for (int64_t h = 0; h < H; ++h) {
        const float* row = frame + c * a.stride_c + h * a.stride_h;
        if (a.stride_w == 1) {
          plane_shifted_sums(row, W, k, sum, sum_sq);
          continue;
        }
        for (int64_t w0 = 0; w0 < W; w0 += kBlock) {
          const int64_t w1 = w0 + kBlock < W ? w0 + kBlock : W;
          float acc = 0.f, acc_sq = 0.f;
          for (int64_t w = w0; w < w1; ++w) {
            const float d = row[w * a.stride_w] - k;
            acc += d;
            acc_sq += d * d;
          }
          sum += acc;
          sum_sq += acc_sq;
        }
      }
    }
    const double dm = sum / static_cast<double>(n), dev = sum_sq - sum * dm;
    mean[task] = k + dm;
    m2[task] = dev > 0.0 ? dev : 0.0;
  }
}
