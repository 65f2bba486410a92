// The packed attention's blocks, included twice by varlen_attention_cpu.cpp: for the baseline
// x86-64 target (4-lane vectors) and under `#pragma GCC target("avx2,fma")` (8 lanes), each copy
// inside its own namespace (so no include guard, no #includes but the exp).
//
// FlashAttention-2 on the CPU. The forward takes QB query rows of one (segment, head) and, for
// each block of KB keys, computes scores S = (scale q) k^T, an online softmax (running max m and
// sum l per row; the output rescaled by e^(m_old - m_new)) and O += P V; at the end out = O / l
// and lse = m + log l. The backward takes one (segment, kv head) and, for each query block of
// each of its query heads and each key block, recomputes S with the same code, bit for bit
// (P = e^(S - lse) then differs from the forward's e^(S - m) / l by rounding only), then
//   dV += P^T dO,  dP = dO V^T,  dS = P (dP - delta) with delta = rowsum(dO * out),
//   dQ += dS K (times scale),  dK += dS^T (scale q).
// Every product is one of two register-tiled kernels of R rows x 2 vectors:
//   dot_tiles:  C = A B^T, A in panels of R rows, B packed transposed in column tiles
//   add_tiles:  C = alpha C + P V, V row-major or packed in column tiles
// A work item packs its segment's keys and values of its kv head (kt, v; the backward also k,
// vt) into its thread's workspace, zero-padded to whole tiles; all blocks are 64-byte aligned
// with rows a multiple of 16 floats.
//
// Causal is bottom-right: query i of a segment (Lq queries, Lk keys) sees keys j <= i + Lk - Lq.
// Keys a row does not see get probability exactly 0 (not e^-87, where the exp clamps).
#include "common/fast_exp_impl.h"

constexpr int64_t kQB = 48;   // query rows of a block; a multiple of R
constexpr int64_t kKB = 128;  // keys of a block; a multiple of TILE
constexpr int64_t kDotChunk = 16;  // terms of a dot product's FMA chain (dot_tiles)
constexpr int W = SORA_KERNELS_AVX2_INTRINSICS ? 8 : 4;  // floats per vector
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(sizeof(float))));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_unaligned*>(p) = x; }

constexpr int64_t R = 6;         // rows of a register tile: 2R accumulators, 2 loads, 1 broadcast
constexpr int64_t TILE = 2 * W;  // columns of a register tile (keys, or head dims)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// -----------------------------------------------------------------------------
// The two products
// -----------------------------------------------------------------------------

// C[r][0:cols) = A[r][0:D) . Bt[0:D)[0:cols) for rows [0, rows) (a multiple of R), cols a multiple
// of TILE. A is packed in panels of R rows ([rows / R][D][R], pack_panels), so that a tile's
// broadcasts are one pointer plus constant offsets (with 6 row pointers GCC ran out of
// registers and reloaded them from the stack every iteration); Bt is one packed block, in
// column tiles [D][TILE] (pack_transposed); C has row stride ldc. The dot products add chunks
// of kDotChunk terms (one FMA chain each) instead of one chain of D: the rounding error of a
// chain grows with its length, and at D = 64 one chain gave scores, and the lse and dq that
// follow, up to 2.6x PyTorch's float32 error (chunks of 16: 1.5x). A tile of R / 2 rows keeps
// both its chunk sums and their totals in registers (R rows added each chunk to C in memory,
// in the same order). Both products are functions of their own (noinline): inlined into the
// work loop, GCC kept their pointers on the stack, a load and a store in each iteration's
// dependency chain, and they ran at half the rate they reach alone (84 and 97 GFLOP/s on one
// core at D = 64). As functions of their own their inner loops keep every pointer in a
// register with no help (the empty asm statements that had pinned them are gone).
[[gnu::noinline]] inline void dot_tiles(const float* A, const float* Bt, int64_t D, int64_t rows, int64_t cols,
                                        float* C, int64_t ldc) {
  constexpr int64_t RH = R / 2;  // rows of a sub-tile: RH x 2 chunk sums and RH x 2 totals in registers
  for (int64_t c = 0; c < cols; c += TILE) {  // one column tile of B ([D][TILE], 4 KB at D = 64) at a time
    const float* tile = Bt + c * D;
    for (int64_t r0 = 0; r0 < rows; r0 += RH) {
      const float* panel = A + r0 / R * R * D + r0 % R;  // the sub-tile's rows in their panel
      vf total[RH][2] = {};
      for (int64_t d0 = 0; d0 < D; d0 += kDotChunk) {
        vf acc[RH][2] = {};
        const float* a = panel + d0 * R;
        const float* b = tile + d0 * TILE;
        const float* const b_end = tile + std::min(D, d0 + kDotChunk) * TILE;
        for (; b < b_end; a += R, b += TILE) {
          const vf b0 = load(b), b1 = load(b + W);
#pragma GCC unroll 6
          for (int64_t i = 0; i < RH; ++i) {
            acc[i][0] += b0 * a[i];  // vector * scalar: a broadcast
            acc[i][1] += b1 * a[i];
          }
        }
#pragma GCC unroll 6
        for (int64_t i = 0; i < RH; ++i) {
          total[i][0] += acc[i][0];  // as the chunks were added to C: 0 + x is x
          total[i][1] += acc[i][1];
        }
      }
#pragma GCC unroll 6
      for (int64_t i = 0; i < RH; ++i) {
        store(C + (r0 + i) * ldc + c, total[i][0]);
        store(C + (r0 + i) * ldc + c + W, total[i][1]);
      }
    }
  }
}

// C[r][0:cols) = alpha[r] C[r] + P[r][0:n) V[0:n)[0:cols) for rows [0, rows) (a multiple of R),
// cols a multiple of TILE; alpha null for 1. P's row stride LDP is a constant, so that its R
// rows are one pointer plus constant offsets. V's column tile t (TILE columns) starts at
// V + t * vtile, its rows LDV apart (ldv when LDV is 0): row-major V has vtile = TILE, V packed
// in column tiles (pack_rows) LDV = TILE and vtile = kKB * TILE. The block's products are
// summed from zero and added to C at the end: C gathers one partial sum per block, so that a
// sum over a long segment (O over its keys, dV and dK over its queries, dQ over its keys) is
// not one FMA chain as long as the segment (at 1025 queries one chain gave dV 3.6x the float32
// error of PyTorch's matrix product; rounding grows with a chain's length).
template <int64_t LDP, int64_t LDV = 0>
[[gnu::noinline]] inline void add_tiles(float* C, int64_t ldc, const float* alpha, const float* P, int64_t n,
                                        const float* V, int64_t ldv, int64_t vtile, int64_t rows, int64_t cols) {
  const int64_t step = LDV ? LDV : ldv;
  for (int64_t c = 0; c < cols; c += TILE) {  // one column tile of V (n x 64 bytes) at a time, kept in L1
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
      vf acc[R][2] = {};
      const float* pj = P + r0 * LDP;  // P[r0][j]: the tile's R probabilities at constant offsets
      const float* vj = V + c / TILE * vtile;  // V[j][c]
      for (int64_t j = 0; j < n; ++j, ++pj, vj += step) {
        const vf v0 = load(vj), v1 = load(vj + W);
#pragma GCC unroll 6
        for (int64_t i = 0; i < R; ++i) {
          const float p = pj[i * LDP];
          acc[i][0] += v0 * p;
          acc[i][1] += v1 * p;
        }
      }
#pragma GCC unroll 6
      for (int64_t i = 0; i < R; ++i) {
        float* out = C + (r0 + i) * ldc + c;
        if (alpha) {
          const float a = alpha[r0 + i];
          store(out, load(out) * a + acc[i][0]);
          store(out + W, load(out + W) * a + acc[i][1]);
        } else {
          store(out, load(out) + acc[i][0]);
          store(out + W, load(out + W) + acc[i][1]);
        }
      }
    }
  }
}

// -----------------------------------------------------------------------------
// Packing
// -----------------------------------------------------------------------------

// Both layouts keep each TILE-wide strip that a product's inner loop walks in one contiguous
// run (4-8 KB). Strips of a plain row-major block are 64 bytes every 256-512 bytes (every
// 1 KB in the packed tensors), lines that share a few of L1's 64 sets and evicted each other.
// The packed rows are read ahead of time (prefetch_row; kPrefetchRows rows, or the next tile's
// when transposing): rows of one head are H * D floats apart and the hardware prefetcher left
// each row's first load waiting for L3; that wait, and scalar copies, made packing 10% of a
// forward.

constexpr int64_t kPrefetchRows = 4;  // rows read ahead

inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(row + d);
}

// Rows x[0:n) (row stride `stride`, D values) by blocks of KB rows, each block [Dp / TILE][KB][TILE]
// (V of add_tiles): column tile t of block b at out + b * KB * Dp + t * KB * TILE, head dims past
// D zero. Rows past n in the last block are not written (the products read rows < n).
inline void pack_rows(const float* x, int64_t stride, int64_t n, int64_t D, float* out) {
  const int64_t Dp = round_up(D, TILE), full = D / TILE * TILE;
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetchRows < n) prefetch_row(x + (j + kPrefetchRows) * stride, D);
    const float* row = x + j * stride;
    float* first = out + j / kKB * kKB * Dp + j % kKB * TILE;
    for (int64_t d0 = 0; d0 < full; d0 += TILE) {
      store(first + d0 * kKB, load(row + d0));
      store(first + d0 * kKB + W, load(row + d0 + W));
    }
    for (int64_t d = full; d < Dp; ++d) first[full * kKB + d - full] = d < D ? row[d] : 0.f;
  }
}

#if SORA_KERNELS_AVX2_INTRINSICS
// Rows [r, r + 8) x columns [d, d + 8) of x (row stride `stride`) transposed into
// out[i * ldo + 0:8) = x[r:r + 8][d + i]: the standard unpack / shuffle / permute 8 x 8.
inline void transpose8x8(const float* x, int64_t stride, float* out, int64_t ldo) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + i * stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// Rows x[0:n) transposed by blocks of KB rows, in column tiles (Bt of dot_tiles): the tile of
// rows [c, c + TILE) at out + c * D holds [D][TILE] (so block b starts at out + b * KB * D);
// columns past n zero up to the next TILE.
inline void pack_transposed(const float* x, int64_t stride, int64_t n, int64_t D, float* out) {
  for (int64_t c = 0; c < n; c += TILE) {
    for (int64_t jj = c + TILE; jj < std::min(n, c + 2 * TILE); ++jj) prefetch_row(x + jj * stride, D);  // next tile's
    float* tile = out + c * D;
    int64_t d0 = 0;
#if SORA_KERNELS_AVX2_INTRINSICS
    if (c + TILE <= n) {  // whole tiles: 8 x 8 blocks, then the head dims past a multiple of 8
      for (; d0 + 8 <= D; d0 += 8) {
        for (int64_t jj = 0; jj < TILE; jj += 8) {
          transpose8x8(x + (c + jj) * stride + d0, stride, tile + d0 * TILE + jj, TILE);
        }
      }
    }
#endif
    for (int64_t jj = 0; jj < TILE; ++jj) {
      const float* row = x + (c + jj) * stride;
      for (int64_t d = d0; d < D; ++d) tile[d * TILE + jj] = c + jj < n ? row[d] : 0.f;
    }
  }
}

inline int64_t transposed_floats(int64_t n, int64_t D) { return (n + kKB - 1) / kKB * D * kKB; }
inline int64_t rows_floats(int64_t n, int64_t D) { return (n + kKB - 1) / kKB * kKB * round_up(D, TILE); }

// One segment's keys and values of one kv head, packed for all its query blocks and heads: kt
// (transposed blocks, for S) and v (rows, for O += P V); the backward also k (rows, for dQ) and
// vt (transposed blocks, for dP).
struct PackedKV {
  const float* kt;
  const float* v;
  const float* k;
  const float* vt;
  PackedKV(const float* base, int64_t Lk, int64_t D, bool backward)
      : kt(base),
        v(kt + transposed_floats(Lk, D)),
        k(backward ? v + rows_floats(Lk, D) : nullptr),
        vt(backward ? k + rows_floats(Lk, D) : nullptr) {}
  static int64_t floats(int64_t Lk, int64_t D, bool backward) {
    return (transposed_floats(Lk, D) + rows_floats(Lk, D)) * (backward ? 2 : 1);
  }
};

inline void pack_kv(const float* keys, const float* values, int64_t kv_stride, int64_t Lk, int64_t D, bool backward,
                    float* base) {
  const PackedKV p(base, Lk, D, backward);
  pack_transposed(keys, kv_stride, Lk, D, const_cast<float*>(p.kt));
  pack_rows(values, kv_stride, Lk, D, const_cast<float*>(p.v));
  if (backward) {
    pack_rows(keys, kv_stride, Lk, D, const_cast<float*>(p.k));
    pack_transposed(values, kv_stride, Lk, D, const_cast<float*>(p.vt));
  }
}

// -----------------------------------------------------------------------------
// Forward
// -----------------------------------------------------------------------------

// Thread-local buffers of the forward, for head dim D (Dp = D rounded up to TILE).
struct Scratch {
  int64_t D, Dp;
  float *q, *s, *o, *m, *l, *alpha;
  Scratch(float* base, int64_t D_) : D(D_), Dp(round_up(D_, TILE)) {
    q = base;           // scale * q in panels (pack_panels; rows past the block zero), [QB][Dp] room
    s = q + kQB * Dp;   // [QB][KB] scores, then probabilities
    o = s + kQB * kKB;  // [QB][Dp]
    m = o + kQB * Dp;   // [QB]
    l = m + kQB;        // [QB]
    alpha = l + kQB;    // [QB]
  }
  static int64_t floats(int64_t D) { return 2 * kQB * round_up(D, TILE) + kQB * kKB + 3 * kQB; }
};

// The keys query i of a segment sees.
inline int64_t visible_keys(int64_t i, int64_t Lq, int64_t Lk, bool causal) {
  return causal ? std::min(Lk, i + Lk - Lq + 1) : Lk;
}

// panels[r / R][d][r % R] = scale * x[i0 + r][d] for r < qb, zero for qb <= r < rows (A of
// dot_tiles).
inline void pack_panels(const float* x, int64_t stride, int64_t i0, int64_t qb, int64_t rows, int64_t D, float scale,
                        float* panels) {
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t i = 0; i < R; ++i) {
        panels[r0 * D + d * R + i] = r0 + i < qb ? scale * x[(i0 + r0 + i) * stride + d] : 0.f;
      }
    }
  }
}

// sq[r][0:Dp) = scale * x[i0 + r] for r < qb, zero for qb <= r < rows (V of add_tiles).
inline void load_rows(const float* x, int64_t stride, int64_t i0, int64_t qb, int64_t rows, int64_t D, float scale,
                      float* sq) {
  const int64_t Dp = round_up(D, TILE), full = D / W * W;
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = sq + r * Dp;
    const float* src = x + (i0 + r) * stride;
    int64_t d = 0;
    if (r < qb) {
      for (; d < full; d += W) store(dst + d, load(src + d) * scale);
      for (; d < D; ++d) dst[d] = scale * src[d];
    }
    for (; d < Dp; ++d) dst[d] = 0.f;
  }
}

// How many of keys [j0, j0 + kb) block row r (query i0 + r) sees.
inline int64_t seen_in_block(int64_t r, int64_t qb, int64_t i0, int64_t j0, int64_t kb, int64_t Lq, int64_t Lk,
                             bool causal) {
  return r < qb ? std::max<int64_t>(0, std::min(kb, visible_keys(i0 + r, Lq, Lk, causal) - j0)) : 0;
}

// Rows [i0, i0 + qb) of one (segment, head) against the segment's packed keys and values:
// q_rows / out_rows point at the segment's first query row of this head (row strides
// q_stride / out_stride floats), lse_row at lse[head][the segment's first query row]. Every
// row must see at least one key.
inline void attend_block(const Scratch& sc, const float* q_rows, int64_t q_stride, const PackedKV& kv, int64_t Lq,
                         int64_t Lk, bool causal, int64_t i0, int64_t qb, float scale, float* out_rows,
                         int64_t out_stride, float* lse_row) {
  const int64_t D = sc.D, Dp = sc.Dp;
  const int64_t rows = round_up(qb, R);  // rows the tiles compute: qb and up to R - 1 zero rows
  pack_panels(q_rows, q_stride, i0, qb, rows, D, scale, sc.q);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < Dp; ++d) sc.o[r * Dp + d] = 0.f;
    sc.m[r] = -INFINITY;
    sc.l[r] = 0.f;
  }
  const int64_t kend = visible_keys(i0 + qb - 1, Lq, Lk, causal);
  for (int64_t j0 = 0; j0 < kend; j0 += kKB) {
    const int64_t kb = std::min(kKB, kend - j0), cols = round_up(kb, TILE);
    dot_tiles(sc.q, kv.kt + j0 * D, D, rows, cols, sc.s, kKB);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = sc.s + r * kKB;
      const int64_t seen = seen_in_block(r, qb, i0, j0, kb, Lq, Lk, causal);
      float mx = sc.m[r];
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < seen; ++j) mx = s[j] > mx ? s[j] : mx;
      sc.alpha[r] = seen == 0 ? 1.f : (sc.m[r] == -INFINITY ? 0.f : exp_approx(sc.m[r] - mx));
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < cols; ++j) {
        const float p = j < seen ? exp_approx(s[j] - mx) : 0.f;
        s[j] = p;
        sum += p;
      }
      if (seen > 0) {
        sc.l[r] = sc.l[r] * sc.alpha[r] + sum;
        sc.m[r] = mx;
      }
    }
    add_tiles<kKB, TILE>(sc.o, Dp, sc.alpha, sc.s, kb, kv.v + j0 * Dp, 0, kKB * TILE, rows, Dp);
  }
  for (int64_t r = 0; r < qb; ++r) {
    const float inv = 1.f / sc.l[r];
    for (int64_t d = 0; d < D; ++d) out_rows[(i0 + r) * out_stride + d] = sc.o[r * Dp + d] * inv;
    lse_row[i0 + r] = sc.m[r] + std::log(sc.l[r]);
  }
}

// -----------------------------------------------------------------------------
// Backward
// -----------------------------------------------------------------------------

// Thread-local buffers of the backward, for head dim D and a segment of up to Lk keys.
struct BackwardScratch {
  int64_t D, Dp;
  float *q, *dout, *q_panels, *dout_panels, *p, *dp, *t, *dq, *delta, *lse, *dk, *dv;
  BackwardScratch(float* base, int64_t D_, int64_t Lk) : D(D_), Dp(round_up(D_, TILE)) {
    q = base;                        // [QB][Dp] scale * q
    dout = q + kQB * Dp;             // [QB][Dp]
    q_panels = dout + kQB * Dp;      // q and dout again, in panels (pack_panels)
    dout_panels = q_panels + kQB * Dp;
    p = dout_panels + kQB * Dp;      // [QB][KB] S, then P
    dp = p + kQB * kKB;       // [QB][KB] dP, then dS
    t = dp + kQB * kKB;       // [KB + R][QB] P^T or dS^T (rows past the block zero)
    dq = t + (kKB + R) * kQB;  // [QB][Dp]
    delta = dq + kQB * Dp;    // [QB]
    lse = delta + kQB;        // [QB]
    dk = lse + kQB;           // [Lk + KB][Dp] (rows past Lk only ever get zeros added)
    dv = dk + (Lk + kKB) * Dp;  // [Lk + KB][Dp]
  }
  static int64_t floats(int64_t D, int64_t Lk) {
    const int64_t Dp = round_up(D, TILE);
    return 5 * kQB * Dp + 2 * kQB * kKB + (kKB + R) * kQB + 2 * kQB + 2 * (Lk + kKB) * Dp;
  }
};

// t[j][0:qb) = x[0:qb)[j] for j < kb, and rows kb..kbr of t zero (kbr = kb rounded up to R).
inline void transpose_block(const float* x, int64_t qb, int64_t kb, float* t) {
  const int64_t kbr = round_up(kb, R);
  int64_t r8 = 0, j8 = 0;  // rows and columns done in 8 x 8 blocks
#if SORA_KERNELS_AVX2_INTRINSICS
  r8 = qb / 8 * 8;
  j8 = kb / 8 * 8;
  for (int64_t j = 0; j < j8; j += 8) {
    for (int64_t r = 0; r < r8; r += 8) transpose8x8(x + r * kKB + j, kKB, t + j * kQB + r, kQB);
  }
#endif
  for (int64_t j = 0; j < kbr; ++j) {
    for (int64_t r = j < j8 ? r8 : 0; r < qb; ++r) t[j * kQB + r] = j < kb ? x[r * kKB + j] : 0.f;
  }
}

// Query rows [i0, i0 + qb) of one head of a segment: adds to sc.dk / sc.dv (the segment's kv
// head) and writes dq rows. Pointers at the segment's first row of this head (row strides
// `stride` for q / out / dout / dq), lse_row at lse[head][the segment's first query row].
inline void attend_block_backward(const BackwardScratch& sc, const float* q_rows, const float* out_rows,
                                  const float* dout_rows, int64_t stride, const float* lse_row, const PackedKV& kv,
                                  int64_t Lq, int64_t Lk, bool causal, int64_t i0, int64_t qb, float scale,
                                  float* dq_rows, int64_t dq_stride) {
  const int64_t D = sc.D, Dp = sc.Dp;
  const int64_t rows = round_up(qb, R);
  load_rows(q_rows, stride, i0, qb, rows, D, scale, sc.q);
  load_rows(dout_rows, stride, i0, qb, rows, D, 1.f, sc.dout);
  pack_panels(q_rows, stride, i0, qb, rows, D, scale, sc.q_panels);
  pack_panels(dout_rows, stride, i0, qb, rows, D, 1.f, sc.dout_panels);
  for (int64_t r = 0; r < rows; ++r) {
    float delta = 0.f;
    if (r < qb) {
#pragma omp simd reduction(+ : delta)
      for (int64_t d = 0; d < D; ++d) delta += sc.dout[r * Dp + d] * out_rows[(i0 + r) * stride + d];
    }
    sc.delta[r] = delta;
    sc.lse[r] = r < qb ? lse_row[i0 + r] : 0.f;
    for (int64_t d = 0; d < Dp; ++d) sc.dq[r * Dp + d] = 0.f;
  }
  const int64_t kend = visible_keys(i0 + qb - 1, Lq, Lk, causal);
  for (int64_t j0 = 0; j0 < kend; j0 += kKB) {
    const int64_t kb = std::min(kKB, kend - j0), cols = round_up(kb, TILE), kbr = round_up(kb, R);
    dot_tiles(sc.q_panels, kv.kt + j0 * D, D, rows, cols, sc.p, kKB);      // S, as the forward's
    dot_tiles(sc.dout_panels, kv.vt + j0 * D, D, rows, cols, sc.dp, kKB);  // dP = dO V^T
    for (int64_t r = 0; r < rows; ++r) {
      float* p = sc.p + r * kKB;
      float* ds = sc.dp + r * kKB;
      const int64_t seen = seen_in_block(r, qb, i0, j0, kb, Lq, Lk, causal);
      const float lse = sc.lse[r], delta = sc.delta[r];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const float pj = j < seen ? exp_approx(p[j] - lse) : 0.f;
        p[j] = pj;
        ds[j] = pj * (ds[j] - delta);
      }
    }
    transpose_block(sc.p, qb, kb, sc.t);  // dV += P^T dO
    add_tiles<kQB>(sc.dv + j0 * Dp, Dp, nullptr, sc.t, qb, sc.dout, Dp, TILE, kbr, Dp);
    transpose_block(sc.dp, qb, kb, sc.t);  // dK += dS^T (scale q)
    add_tiles<kQB>(sc.dk + j0 * Dp, Dp, nullptr, sc.t, qb, sc.q, Dp, TILE, kbr, Dp);
    add_tiles<kKB, TILE>(sc.dq, Dp, nullptr, sc.dp, kb, kv.k + j0 * Dp, 0, kKB * TILE, rows, Dp);  // dQ += dS K
  }
  for (int64_t r = 0; r < qb; ++r) {
    for (int64_t d = 0; d < D; ++d) dq_rows[(i0 + r) * dq_stride + d] = scale * sc.dq[r * Dp + d];
  }
}

// -----------------------------------------------------------------------------
// Every segment and head, in one parallel region each
// -----------------------------------------------------------------------------

// Work is claimed one query block at a time (kQB queries of every query head of a kv head), but
// each thread stays on one (segment, kv head) while it has blocks left, so that its keys and
// values are packed about once: threads start spread over the (segment, kv head) groups, claim
// their group's next block from its counter and, when it has none left, move on to the next
// group that has. (A shared `omp for` over chunks handed neighbouring chunks of one group to
// different threads, and each packed the group again: packing was 13% of a 4 x 512 forward.)
// Each block computes the same rows the same way whichever thread claims it: results do not
// depend on the schedule.
inline void forward_all(const std::vector<int64_t>& first, const float* q, const float* k, const float* v,
                        const int32_t* cu_q, const int32_t* cu_k, int64_t segments, int64_t H, int64_t Hkv, int64_t D,
                        float scale, bool causal, float* out, float* lse) {
  const int64_t Nq = cu_q[segments], group = H / Hkv;
  int64_t max_lk = 0;
  struct Group {
    int64_t b, g, blocks;
  };
  std::vector<Group> groups;
  for (int64_t b = 0; b < segments; ++b) {
    const int64_t Lq = cu_q[b + 1] - cu_q[b];
    max_lk = std::max<int64_t>(max_lk, cu_k[b + 1] - cu_k[b]);
    if (first[b] == Lq) continue;  // no query of the segment sees a key
    for (int64_t g = 0; g < Hkv; ++g) groups.push_back({b, g, (Lq - first[b] + kQB - 1) / kQB});
  }
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  if (n_groups == 0) return;
  std::vector<std::atomic<int64_t>> claimed(n_groups);  // blocks of each group handed out
  for (auto& c : claimed) c.store(0, std::memory_order_relaxed);
  const int64_t pack_floats = round_up(PackedKV::floats(max_lk, D, false), 16);
  parallel_with_workspace(pack_floats + Scratch::floats(D), [&](float* packs) {
    const Scratch sc(packs + pack_floats, D);
    int64_t packed = -1;  // the group `packs` holds
    int64_t at = n_groups * omp_get_thread_num() / omp_get_num_threads();
    for (int64_t exhausted = 0; exhausted < n_groups;) {  // consecutive groups found with no block left
      const Group& gr = groups[at];
      const int64_t block = claimed[at].fetch_add(1, std::memory_order_relaxed);
      if (block >= gr.blocks) {
        at = (at + 1) % n_groups;
        ++exhausted;
        continue;
      }
      exhausted = 0;
      const int64_t Lq = cu_q[gr.b + 1] - cu_q[gr.b], Lk = cu_k[gr.b + 1] - cu_k[gr.b];
      if (packed != at) {
        pack_kv(k + (cu_k[gr.b] * Hkv + gr.g) * D, v + (cu_k[gr.b] * Hkv + gr.g) * D, Hkv * D, Lk, D, false, packs);
        packed = at;
      }
      const PackedKV kv(packs, Lk, D, false);
      const int64_t i0 = first[gr.b] + block * kQB;
      for (int64_t h = gr.g * group; h < (gr.g + 1) * group; ++h) {
        attend_block(sc, q + (cu_q[gr.b] * H + h) * D, H * D, kv, Lq, Lk, causal, i0, std::min(kQB, Lq - i0), scale,
                     out + (cu_q[gr.b] * H + h) * D, H * D, lse + h * Nq + cu_q[gr.b]);
      }
    }
  });
}

// One work item a (segment, kv head): its keys and values packed, then every query block of its
// query heads, adding to the segment's dk / dv, which are written at the end (one thread owns
// them: no atomics). dq, dk, dv zeroed by the caller.
inline void backward_all(const std::vector<int64_t>& first, const float* dout, const float* q, const float* k,
                         const float* v, const float* out, const float* lse, const int32_t* cu_q, const int32_t* cu_k,
                         int64_t segments, int64_t H, int64_t Hkv, int64_t D, float scale, bool causal, float* dq,
                         float* dk, float* dv) {
  const int64_t Nq = cu_q[segments], group = H / Hkv, Dp = round_up(D, TILE);
  int64_t max_lk = 0;
  for (int64_t b = 0; b < segments; ++b) max_lk = std::max<int64_t>(max_lk, cu_k[b + 1] - cu_k[b]);
  const int64_t pack_floats = round_up(PackedKV::floats(max_lk, D, true), 16);
  parallel_with_workspace(pack_floats + BackwardScratch::floats(D, max_lk), [&](float* packs) {
    const BackwardScratch sc(packs + pack_floats, D, max_lk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < segments * Hkv; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      const int64_t Lq = cu_q[b + 1] - cu_q[b], Lk = cu_k[b + 1] - cu_k[b];
      if (first[b] == Lq) continue;  // no query of the segment sees a key
      pack_kv(k + (cu_k[b] * Hkv + g) * D, v + (cu_k[b] * Hkv + g) * D, Hkv * D, Lk, D, true, packs);
      const PackedKV kv(packs, Lk, D, true);
      for (int64_t j = 0; j < (Lk + kKB) * Dp; ++j) sc.dk[j] = sc.dv[j] = 0.f;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const int64_t row = (cu_q[b] * H + h) * D;
        for (int64_t i0 = first[b]; i0 < Lq; i0 += kQB) {
          attend_block_backward(sc, q + row, out + row, dout + row, H * D, lse + h * Nq + cu_q[b], kv, Lq, Lk, causal,
                                i0, std::min(kQB, Lq - i0), scale, dq + row, H * D);
        }
      }
      for (int64_t j = 0; j < Lk; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          dk[((cu_k[b] + j) * Hkv + g) * D + d] = sc.dk[j * Dp + d];
          dv[((cu_k[b] + j) * Hkv + g) * D + d] = sc.dv[j * Dp + d];
        }
      }
    }
  });
}
