// The adaLN CPU kernels (adaln_cpu.h), compiled once per target by common/per_target.h inside
// namespace sora_kernels::dit: for baseline x86-64 and for AVX2 + FMA (adaln_cpu.cpp picks).
// No include guard: included once per target.

// Row loops are written for the vectorizer: float sums with `omp simd` reductions (which
// allow the reassociation SIMD needs), and the optional weight / modulation replaced by
// vectors of ones / zeros instead of branches inside the loops.

inline void forward(const AdaLNArgs& a, float* h, float* out, float* mean, float* rstd) {
  const int64_t D = a.dim;
  const std::vector<float> ones(D, 1.f), zeros(D, 0.f);
  const float* w = a.weight ? a.weight : ones.data();
#pragma omp parallel
  {
    std::vector<float> v(static_cast<size_t>(D));
    float* vp = v.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const float* x = a.x + r * D;
      const int64_t s = a.seg ? a.seg[r] : 0;
      if (a.y) {  // gated residual, stored, then normalised as stored
        const float* y = a.y + r * D;
        const float* g = a.gate + s * D;
        float* hr = h + r * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) hr[c] = x[c] + g[c] * y[c];
        x = hr;
      }
      float mu = 0.f;
      if (a.layer) {
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < D; ++c) sum += x[c];
        mu = sum / static_cast<float>(D);
        mean[r] = mu;
      }
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < D; ++c) {
        vp[c] = x[c] - mu;
        sq += vp[c] * vp[c];
      }
      const float rs = 1.f / std::sqrt(sq / static_cast<float>(D) + a.eps);
      rstd[r] = rs;
      float* o = out + r * D;
      const float* sh = a.shift ? a.shift + s * D : zeros.data();
      const float* sc = a.scale ? a.scale + s * D : zeros.data();
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) o[c] = vp[c] * rs * w[c] * (1.f + sc[c]) + sh[c];
    }
  }
}


inline void backward(const AdaLNArgs& a, const float* dout, const float* dh, const float* mean,
                     const float* rstd, const AdaLNGrads& g) {
  const int64_t D = a.dim, N = a.rows;
  const bool modulated = a.scale != nullptr, residual = a.y != nullptr;
  // Per-segment outputs, in the order of the parts of SegmentSums: dshift, dscale, dgate.
  float* outputs[3] = {g.dshift, g.dscale, g.dgate};
  const int64_t parts = modulated ? (residual ? 3 : 2) : 0;
  const std::vector<float> ones(D, 1.f), zeros(D, 0.f);
  const float* w = a.weight ? a.weight : ones.data();
  const int threads = omp_get_max_threads();
  std::vector<SegmentSums> boundary;
  boundary.reserve(threads);
  for (int t = 0; t < threads; ++t) boundary.emplace_back(D, 3);
  std::vector<float> dweight_parts(static_cast<size_t>(threads) * D, 0.f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t r0 = N * t / T, r1 = N * (t + 1) / T;
    SegmentSums& sums = boundary[t];
    sums.parts = parts;
    if (modulated && r1 > r0) {
      sums.first_seg = a.seg[r0];
      sums.last_seg = a.seg[r1 - 1];
    }
    float* dw = dweight_parts.data() + static_cast<size_t>(t) * D;
    std::vector<float> xhat_v(D), gx_v(D);
    float* xhat = xhat_v.data();
    float* gx = gx_v.data();
    float* ds = sums.cur.data();          // dshift of the current segment
    float* dsc = sums.cur.data() + D;     // dscale
    float* dg = sums.cur.data() + 2 * D;  // dgate
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = a.seg ? a.seg[r] : 0;
      if (modulated && s != sums.cur_seg) {
        sums.flush(outputs);
        sums.cur_seg = s;
      }
      const float* x = a.x + r * D;
      const float* go = dout + r * D;
      const float mu = a.layer ? mean[r] : 0.f, rs = rstd[r];
      const float* sc = modulated ? a.scale + s * D : zeros.data();
      float sum_g = 0.f, sum_gx = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t c = 0; c < D; ++c) {
        xhat[c] = (x[c] - mu) * rs;
        ds[c] += go[c];
        dsc[c] += go[c] * xhat[c] * w[c];
        const float gr = go[c] * (1.f + sc[c]);
        dw[c] += gr * xhat[c];
        gx[c] = gr * w[c];
        sum_g += gx[c];
        sum_gx += gx[c] * xhat[c];
      }
      const float c1 = a.layer ? sum_g / static_cast<float>(D) : 0.f, c2 = sum_gx / static_cast<float>(D);
      float* dx = g.dx + r * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) dx[c] = rs * (gx[c] - c1 - xhat[c] * c2);
      if (residual) {  // h = x + gate * y
        const float* y = a.y + r * D;
        const float* gate = a.gate + s * D;
        const float* dhr = dh + r * D;
        float* dy = g.dy + r * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) {
          dx[c] += dhr[c];
          dy[c] = dx[c] * gate[c];
          dg[c] += dx[c] * y[c];
        }
      }
    }
    if (modulated) sums.flush(outputs);
  }
  for (auto& sums : boundary) sums.add_boundary(outputs);
  if (a.weight) {  // (computed unconditionally above, against a weight of ones)
    for (int t = 0; t < threads; ++t)
      for (int64_t c = 0; c < D; ++c) g.dweight[c] += dweight_parts[static_cast<size_t>(t) * D + c];
  }
}
