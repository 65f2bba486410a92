// Per-frame GroupNorm (+ SiLU) of [B, C, T, H, W] on CUDA (group_norm_cuda.h): the CPU kernels'
// math (group_norm_cpu_impl.h) for float32, float16 and bfloat16, in fp32.
//
// Each pass is one of two skeletons over the pieces of group_norm_cuda_plan.h:
//   reduce  a block sums two values per channel over its piece and writes them to
//           part[b * T + t, c, piece] (a butterfly and fixed-order tree in the block);
//   map     a block rewrites its piece element by element from per-channel constants.
// forward:  reduce StatsOp (sums of d = x - k_c and d^2, k_c the frame's first value of
//           channel c) -> finalize (per (b, t, group), in double: the mean, then the centred M2
//           from the shifted sums, as the CPU's channels-last kernel) -> map ApplyOp
//           (y = act(x * scale_c + shift_c)).
// backward: reduce GradSumsOp (sums of dz and dz * xhat) -> finalize (m1, m2: the group means of
//           dz * w and dz * w * xhat) -> map GradApplyOp (dx = rstd * (dz * w - m1 - xhat * m2));
//           the glue sums part over frames and pieces into dbias / dweight.
// No atomics: every sum has a fixed order, so two runs give the same bits.
// On sm_90 a contiguous, vectorised forward whose frame-groups fit a cluster's shared memory
// runs gn_cluster_forward_kernel instead (x read once; gn_cluster_plan in the plan header).
//
// Accesses are vectors when gn_can_vectorize says every one is aligned and inside one plane /
// row, else one element: 16 bytes along the positions (contiguous), 4 channels along the
// channels (channels-last; 8 or 16 bytes, so a thread keeps 4 channels' constants and sums).
// A map pass walks the blocks in reverse: the reduce pass read the last pieces last, so they
// are the likeliest to be still in L2; it reads and writes with evict-first hints (the call's
// last use of x).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cooperative_groups.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>

#include "vae/group_norm_cuda.h"

namespace sora_kernels {
namespace vae {
namespace {

constexpr int kThreads = kGnThreads;
constexpr int kFinalizeThreads = 128;

// ---- elements --------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}

// V consecutive elements: one 16- or 8-byte access, or one element.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T e[V];
};

template <int kBytes>
struct Word;  // the unsigned vector type of one access
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};

// kStream: the call's last read of this data (evict first); else a read-only load that keeps
// the line in L2 for the map pass.
template <bool kStream, typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  if constexpr (sizeof(Pack<T, V>) >= 8) {
    using W = typename Word<sizeof(Pack<T, V>)>::type;
    const W* q = reinterpret_cast<const W*>(p);
    W u;
    if constexpr (kStream) u = __ldcs(q);
    else u = __ldg(q);
    Pack<T, V> out;
    memcpy(&out, &u, sizeof(u));
    return out;
  } else {
    static_assert(V == 1, "one element");
    return *reinterpret_cast<const Pack<T, V>*>(p);
  }
}

// Rounds to T (to nearest even, as torch) and stores, with an evict-first hint when a vector.
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&v)[V]) {
  Pack<T, V> out;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int e = 0; e < V; ++e) out.e[e] = v[e];
  } else if constexpr (V % 2 == 0) {  // pairs: one conversion instruction each
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      if constexpr (std::is_same_v<T, __half>) {
        const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&out.e[2 * i], &h, sizeof(h));
      } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&out.e[2 * i], &h, sizeof(h));
      }
    }
  } else {
    static_assert(V == 1, "one element");
    if constexpr (std::is_same_v<T, __half>) out.e[0] = __float2half_rn(v[0]);
    else out.e[0] = __float2bfloat16_rn(v[0]);
  }
  if constexpr (sizeof(Pack<T, V>) >= 8) {
    using W = typename Word<sizeof(Pack<T, V>)>::type;
    W u;
    memcpy(&u, &out, sizeof(u));
    __stcs(reinterpret_cast<W*>(p), u);
  } else {
    *reinterpret_cast<Pack<T, V>*>(p) = out;
  }
}

// silu(z) = z / (1 + e^-z), with e^-z clamped at e^80 (as the Triton kernels) so the fast
// division stays in its range (it returns 0 for divisors above 2^126).
template <bool SILU>
__device__ __forceinline__ float activate(float z) {
  if constexpr (SILU) return __fdividef(z, 1.f + __expf(fminf(-z, 80.f)));
  else return z;
}

// d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
template <bool SILU>
__device__ __forceinline__ float activation_grad(float z) {
  if constexpr (SILU) {
    const float s = __fdividef(1.f, 1.f + __expf(fminf(-z, 80.f)));
    return s * (1.f + z * (1.f - s));
  } else {
    return 1.f;
  }
}

// The forward's shift for channel c of frame bt: the frame's first value of the channel.
template <typename T>
__device__ __forceinline__ float frame_shift(const T* x, const GnShape& s, int64_t bt, int64_t c) {
  const int64_t t = bt % s.frames, b = bt / s.frames;
  return to_float(x[b * s.stride_b + t * s.stride_t + c * s.stride_c]);
}

// Sum of v over the block (kBlock threads, a multiple of 32), returned to every thread: a
// butterfly in each warp (every lane ends with the same bits), then one over the warps' sums.
// A fixed order, so the same bits on every run. smem: kBlock / 32 + 1 elements, free again on return.
template <int kBlock, typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
  constexpr int kWarps = kBlock / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A w = lane < kWarps ? smem[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
    if (lane == 0) smem[kWarps] = w;
  }
  __syncthreads();
  const A total = smem[kWarps];
  __syncthreads();
  return total;
}

// ---- the four passes ---------------------------------------------------------------------
// An op has kInputs (1: x; 2: x and dy), Consts (per-channel constants), channel(bt, c) -> Consts,
// and element(k, x, dy, a, b) (reduce: adds to the channel's two sums) or map(k, x, dy) (map).

// Forward statistics: sums of d = x - k_c and d^2. The variance from these sums cancels only as
// much as k_c is off the channel's mean (a sample is about a standard deviation off), not as
// much as the mean is off zero.
template <typename T>
struct StatsOp {
  static constexpr int kInputs = 1;
  using Consts = float;
  const T* x;
  GnShape s;
  __device__ __forceinline__ float channel(int64_t bt, int64_t c) const { return frame_shift(x, s, bt, c); }
  __device__ __forceinline__ void element(float k, float v, float, float& a, float& b) const {
    const float d = v - k;
    a += d;
    b += d * d;
  }
};

struct Affine {
  float scale, shift;
};

// y = act(x * scale_c + shift_c), scale_c = rstd * w_c, shift_c = b_c - mean * scale_c.
template <bool SILU>
struct ApplyOp {
  static constexpr int kInputs = 1;
  using Consts = Affine;
  GnShape s;
  const float *mean, *rstd, *weight, *bias;  // [B*T*G], [B*T*G], [C] or null, [C] or null
  __device__ __forceinline__ Affine channel(int64_t bt, int64_t c) const {
    const int64_t i = bt * s.groups + c / (s.channels / s.groups);
    const float scale = rstd[i] * (weight ? weight[c] : 1.f);
    return {scale, (bias ? bias[c] : 0.f) - mean[i] * scale};
  }
  __device__ __forceinline__ float map(const Affine& k, float v, float) const {
    return activate<SILU>(v * k.scale + k.shift);
  }
};

struct Normalised {
  float mean, rstd, w, b;
};

// Backward sums per channel: dz and dz * xhat, with xhat = (x - mean) * rstd and dz the
// gradient of z = xhat * w + b (through the SiLU).
template <bool SILU>
struct GradSumsOp {
  static constexpr int kInputs = 2;
  using Consts = Normalised;
  GnShape s;
  const float *mean, *rstd, *weight, *bias;
  __device__ __forceinline__ Normalised channel(int64_t bt, int64_t c) const {
    const int64_t i = bt * s.groups + c / (s.channels / s.groups);
    return {mean[i], rstd[i], weight ? weight[c] : 1.f, bias ? bias[c] : 0.f};
  }
  __device__ __forceinline__ void element(const Normalised& k, float v, float d, float& a, float& b) const {
    const float xhat = (v - k.mean) * k.rstd;
    const float dz = d * activation_grad<SILU>(xhat * k.w + k.b);
    a += dz;
    b += dz * xhat;
  }
};

struct GradConsts {
  float mean, rstd, w, b, m1, m2;
};

// dx = rstd * (dz * w - m1 - xhat * m2), m1 / m2 the group means of dz * w and dz * w * xhat.
template <bool SILU>
struct GradApplyOp {
  static constexpr int kInputs = 2;
  using Consts = GradConsts;
  GnShape s;
  const float *mean, *rstd, *weight, *bias;
  const float* pair;  // [B*T*G, 2]: m1, m2
  __device__ __forceinline__ GradConsts channel(int64_t bt, int64_t c) const {
    const int64_t i = bt * s.groups + c / (s.channels / s.groups);
    return {mean[i], rstd[i], weight ? weight[c] : 1.f, bias ? bias[c] : 0.f, pair[2 * i], pair[2 * i + 1]};
  }
  __device__ __forceinline__ float map(const GradConsts& k, float v, float d) const {
    const float xhat = (v - k.mean) * k.rstd;
    const float dz = d * activation_grad<SILU>(xhat * k.w + k.b);
    return k.rstd * (dz * k.w - k.m1 - xhat * k.m2);
  }
};

// ---- the two skeletons -------------------------------------------------------------------

// Each block: the op's two sums per channel over its piece -> part (gn_part_index).
//   contiguous: the block's threads stride over the piece's vectors; one channel.
//   channels-last: thread (tr, tc) sums vector column tc of rows tr, tr + p.tr, ... per
//   channel; the rows' sums meet in shared memory and are added in row order.
template <class Op, bool kChannelsLast, typename T, int V>
__global__ void __launch_bounds__(kThreads)
gn_reduce_kernel(Op op, const T* __restrict__ x,   // [B, C, T, S] with the strides of s
                 const T* __restrict__ dy,         // like x (Op::kInputs == 2), else unused
                 GnShape s, GnPlan p,
                 float* __restrict__ part) {       // [B*T, C, pieces, 2]
  constexpr int kU = Op::kInputs == 1 ? 4 : 2;  // accesses in flight per thread: 64 bytes
  const GnPiece q = gn_piece(s, p, blockIdx.x);
  if constexpr (!kChannelsLast) {
    __shared__ float red[kThreads / 32 + 1];
    const typename Op::Consts k = op.channel(q.bt, q.c);
    float a = 0.f, b = 0.f;
    const int64_t nv = (q.end - q.begin) / V;
    for (int64_t j0 = threadIdx.x; j0 < nv; j0 += int64_t{kThreads} * kU) {
      Pack<T, V> xv[kU], dv[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = j0 + u * kThreads;
        if (j < nv) {
          const int64_t o = gn_contiguous_offset(q, j, V);
          xv[u] = load<false, T, V>(x + o);
          if constexpr (Op::kInputs == 2) dv[u] = load<false, T, V>(dy + o);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (j0 + u * kThreads < nv) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            op.element(k, to_float(xv[u].e[e]), Op::kInputs == 2 ? to_float(dv[u].e[e]) : 0.f, a, b);
          }
        }
      }
    }
    a = block_sum<kThreads>(a, red);
    b = block_sum<kThreads>(b, red);
    if (threadIdx.x == 0) {
      float* out = part + gn_part_index(s, p, q.bt, q.c, q.piece);
      out[0] = a;
      out[1] = b;
    }
  } else {
    __shared__ float red[2][kThreads * V];  // [2][tr][tc * V + e]: each thread's channel sums
    const int cvec = static_cast<int>(s.channels / V);
    const int tc = threadIdx.x % p.tc, tr = threadIdx.x / p.tc;
    for (int cb = 0; cb < cvec; cb += p.tc) {  // column blocks of p.tc vectors (one unless C > kThreads * V)
      const int col = cb + tc;
      if (tr < p.tr && col < cvec) {
        typename Op::Consts k[V];
        float a[V], b[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          k[e] = op.channel(q.bt, int64_t{col} * V + e);
          a[e] = b[e] = 0.f;
        }
        for (int64_t r0 = q.begin + tr; r0 < q.end; r0 += int64_t{p.tr} * kU) {
          Pack<T, V> xv[kU], dv[kU];
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            const int64_t r = r0 + int64_t{u} * p.tr;
            if (r < q.end) {
              const int64_t o = gn_channels_last_offset(s, q, r, col, V);
              xv[u] = load<false, T, V>(x + o);
              if constexpr (Op::kInputs == 2) dv[u] = load<false, T, V>(dy + o);
            }
          }
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            if (r0 + int64_t{u} * p.tr < q.end) {
#pragma unroll
              for (int e = 0; e < V; ++e) {
                op.element(k[e], to_float(xv[u].e[e]), Op::kInputs == 2 ? to_float(dv[u].e[e]) : 0.f, a[e], b[e]);
              }
            }
          }
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          red[0][(tr * p.tc + tc) * V + e] = a[e];
          red[1][(tr * p.tc + tc) * V + e] = b[e];
        }
      }
      __syncthreads();
      const int width = min(p.tc, cvec - cb) * V;  // channels of this column block
      for (int i = threadIdx.x; i < width; i += kThreads) {
        float a = 0.f, b = 0.f;
        for (int rr = 0; rr < p.tr; ++rr) {
          a += red[0][rr * p.tc * V + i];
          b += red[1][rr * p.tc * V + i];
        }
        float* out = part + gn_part_index(s, p, q.bt, int64_t{cb} * V + i, q.piece);
        out[0] = a;
        out[1] = b;
      }
      __syncthreads();  // red is rewritten by the next column block
    }
  }
}

// Each block: out = op.map(x, dy) over its piece, the blocks in reverse order (see the top).
template <class Op, bool kChannelsLast, typename T, int V>
__global__ void __launch_bounds__(kThreads)
gn_map_kernel(Op op, const T* __restrict__ x,   // [B, C, T, S] with the strides of s
              const T* __restrict__ dy,         // like x (Op::kInputs == 2), else unused
              T* __restrict__ out,              // like x
              GnShape s, GnPlan p) {
  constexpr int kU = Op::kInputs == 1 ? 4 : 2;  // accesses in flight per thread: 64 bytes
  const GnPiece q = gn_piece(s, p, static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x);
  if constexpr (!kChannelsLast) {
    const typename Op::Consts k = op.channel(q.bt, q.c);
    const int64_t nv = (q.end - q.begin) / V;
    for (int64_t j0 = threadIdx.x; j0 < nv; j0 += int64_t{kThreads} * kU) {
      Pack<T, V> xv[kU], dv[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = j0 + u * kThreads;
        if (j < nv) {
          const int64_t o = gn_contiguous_offset(q, j, V);
          xv[u] = load<true, T, V>(x + o);
          if constexpr (Op::kInputs == 2) dv[u] = load<true, T, V>(dy + o);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t j = j0 + u * kThreads;
        if (j < nv) {
          float v[V];
#pragma unroll
          for (int e = 0; e < V; ++e)
            v[e] = op.map(k, to_float(xv[u].e[e]), Op::kInputs == 2 ? to_float(dv[u].e[e]) : 0.f);
          store<T, V>(out + gn_contiguous_offset(q, j, V), v);
        }
      }
    }
  } else {
    const int cvec = static_cast<int>(s.channels / V);
    const int tc = threadIdx.x % p.tc, tr = threadIdx.x / p.tc;
    if (tr >= p.tr) return;  // no barrier in this kernel
    for (int col = tc; col < cvec; col += p.tc) {  // column blocks of p.tc vectors
      typename Op::Consts k[V];
#pragma unroll
      for (int e = 0; e < V; ++e) k[e] = op.channel(q.bt, int64_t{col} * V + e);
      for (int64_t r0 = q.begin + tr; r0 < q.end; r0 += int64_t{p.tr} * kU) {
        Pack<T, V> xv[kU], dv[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t r = r0 + int64_t{u} * p.tr;
          if (r < q.end) {
            const int64_t o = gn_channels_last_offset(s, q, r, col, V);
            xv[u] = load<true, T, V>(x + o);
            if constexpr (Op::kInputs == 2) dv[u] = load<true, T, V>(dy + o);
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t r = r0 + int64_t{u} * p.tr;
          if (r < q.end) {
            float v[V];
#pragma unroll
            for (int e = 0; e < V; ++e)
              v[e] = op.map(k[e], to_float(xv[u].e[e]), Op::kInputs == 2 ? to_float(dv[u].e[e]) : 0.f);
            store<T, V>(out + gn_channels_last_offset(s, q, r, col, V), v);
          }
        }
      }
    }
  }
}

// ---- finalize: one block per (frame, group) --------------------------------------------------

// mean and rstd of group g of frame bt from its (channel, piece) pairs of shifted sums, in double:
// with d = x - k_c and off_c = k_c - mean, sum (x - mean)^2 = sum d^2 + 2 off_c sum d + S off_c^2
// per channel (the CPU channels-last kernel's formula).
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
gn_finalize_stats_kernel(const T* __restrict__ x,        // for the shifts k_c (frame_shift)
                         const float* __restrict__ part,  // [B*T, C, pieces, 2]: sums of d, d^2
                         GnShape s, GnPlan p, float eps,
                         float* __restrict__ mean,        // [B*T*G]
                         float* __restrict__ rstd) {      // [B*T*G]
  __shared__ double red[kFinalizeThreads / 32 + 1];
  const int64_t frame_group = blockIdx.x;  // bt * G + g
  const int64_t bt = frame_group / s.groups, g = frame_group % s.groups;
  const int64_t c0 = g * (s.channels / s.groups);
  // 32-bit counts: the launcher checks that the whole workspace has fewer than 2^31 floats.
  const int Cg = static_cast<int>(s.channels / s.groups), pieces = static_cast<int>(p.pieces), pairs = Cg * pieces;
  const float* pp = part + gn_part_index(s, p, bt, c0, 0);  // the group's pairs are contiguous
  const double S = static_cast<double>(s.positions), n = static_cast<double>(Cg) * S;
  double sum = 0.0;
  for (int i = threadIdx.x; i < pairs; i += kFinalizeThreads) sum += pp[2 * i];
  for (int c = threadIdx.x; c < Cg; c += kFinalizeThreads) sum += S * frame_shift(x, s, bt, c0 + c);
  const double m = block_sum<kFinalizeThreads>(sum, red) / n;
  double m2 = 0.0;
  for (int i = threadIdx.x; i < pairs; i += kFinalizeThreads) {
    const double off = frame_shift(x, s, bt, c0 + i / pieces) - m;
    m2 += pp[2 * i + 1] + 2.0 * off * pp[2 * i];
  }
  for (int c = threadIdx.x; c < Cg; c += kFinalizeThreads) {
    const double off = frame_shift(x, s, bt, c0 + c) - m;
    m2 += S * off * off;
  }
  m2 = block_sum<kFinalizeThreads>(m2, red);
  if (threadIdx.x == 0) {
    mean[frame_group] = static_cast<float>(m);
    rstd[frame_group] = static_cast<float>(1.0 / sqrt((m2 > 0.0 ? m2 : 0.0) / n + eps));
  }
}

// m1, m2 of group g of frame bt: sums over its (channel, piece) pairs of w_c * (sum dz) and
// w_c * (sum dz * xhat) in double, over the group's Cg * S elements.
__global__ void __launch_bounds__(kFinalizeThreads)
gn_finalize_grad_kernel(const float* __restrict__ part,    // [B*T, C, pieces, 2]: sums of dz, dz * xhat
                        GnShape s, GnPlan p,
                        const float* __restrict__ weight,  // [C] or null
                        float* __restrict__ pair) {        // [B*T*G, 2]: m1, m2
  __shared__ double red[kFinalizeThreads / 32 + 1];
  const int64_t frame_group = blockIdx.x;
  const int64_t bt = frame_group / s.groups, g = frame_group % s.groups;
  const int64_t c0 = g * (s.channels / s.groups);
  const int Cg = static_cast<int>(s.channels / s.groups), pieces = static_cast<int>(p.pieces), pairs = Cg * pieces;
  const float* pp = part + gn_part_index(s, p, bt, c0, 0);
  double a = 0.0, b = 0.0;
  for (int i = threadIdx.x; i < pairs; i += kFinalizeThreads) {
    const double w = weight ? weight[c0 + i / pieces] : 1.f;
    a += w * pp[2 * i];
    b += w * pp[2 * i + 1];
  }
  a = block_sum<kFinalizeThreads>(a, red);
  b = block_sum<kFinalizeThreads>(b, red);
  if (threadIdx.x == 0) {
    const double n = static_cast<double>(Cg) * static_cast<double>(s.positions);
    pair[2 * frame_group] = static_cast<float>(a / n);
    pair[2 * frame_group + 1] = static_cast<float>(b / n);
  }
}

// ---- the single-read forward: one thread-block cluster per (frame, group), sm_90 -------------

// Block `rank` of the cluster of frame-group fg = blockIdx.x / cp.blocks copies elements [rank *
// span, (rank + 1) * span) of the group (gn_cluster_offset) into shared memory, finds their
// count, mean and M2 (the sum of x - k as it loads, then the squares about the block's mean from
// shared memory; fp32 per thread, double across threads),
// publishes them, and after a cluster barrier merges every rank's in rank order (Chan, double):
// all blocks get the same bits. A second barrier keeps each block's statistics alive until its
// peers have read them. Then y = act(x * scale_c + shift_c) from shared memory. Rank 0 saves mean
// and rstd. Every thread of every block reaches both barriers.
template <typename T, int V, bool SILU>
__global__ void __launch_bounds__(kGnClusterThreads, 1)
gn_cluster_forward_kernel(const T* __restrict__ x, GnShape s, GnClusterPlan cp, const float* __restrict__ weight,
                          const float* __restrict__ bias, float eps, T* __restrict__ y, float* __restrict__ mean,
                          float* __restrict__ rstd) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char gn_cluster_smem[];
  T* tile = reinterpret_cast<T*>(gn_cluster_smem);                       // span elements
  const int64_t cgroup = s.channels / s.groups;
  float* consts = reinterpret_cast<float*>(gn_cluster_smem + cp.span * sizeof(T));  // [2, Cg]: scale, shift
  __shared__ double stats[3];       // this block's count, mean, M2: read by the cluster
  __shared__ double merged[2];      // the group's mean, rstd
  __shared__ double red[kGnClusterThreads / 32 + 1];
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t fg = blockIdx.x / cp.blocks;
  const int64_t n = cgroup * s.positions, begin = rank * cp.span;
  const int64_t len = begin < n ? (begin + cp.span < n ? cp.span : n - begin) : 0;
  const int64_t base = gn_cluster_base(s, fg);
  const int nv = static_cast<int>(len / V);
  constexpr int kU = 4;
  // gn_cluster_offset with 32-bit division (n < 2^31; the plan takes stride_s == 1 only)
  const uint32_t S32 = static_cast<uint32_t>(s.positions);
  const auto element = [&](int64_t i) {
    const uint32_t c = static_cast<uint32_t>(i) / S32;
    return base + int64_t{c} * s.stride_c + (static_cast<uint32_t>(i) - c * S32);
  };

  // Sums of x - k, k the block's first element: the fp32 partial sums stay small when the values
  // sit far from zero (the three-pass kernels shift by each channel's first value likewise).
  const float k = len > 0 ? to_float(x[element(begin)]) : 0.f;
  float sum = 0.f;
  for (int j0 = threadIdx.x; j0 < nv; j0 += kGnClusterThreads * kU) {
    Pack<T, V> v[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int j = j0 + u * kGnClusterThreads;
      if (j < nv) v[u] = load<true, T, V>(x + element(begin + int64_t{j} * V));
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int j = j0 + u * kGnClusterThreads;
      if (j < nv) {
        reinterpret_cast<Pack<T, V>*>(tile)[j] = v[u];
#pragma unroll
        for (int e = 0; e < V; ++e) sum += to_float(v[u].e[e]) - k;
      }
    }
  }
  const double count = static_cast<double>(len);
  const double total = block_sum<kGnClusterThreads>(static_cast<double>(sum), red);
  const double block_mean = len > 0 ? k + total / count : 0.0;
  float m2 = 0.f;
  const float bm = static_cast<float>(block_mean);
  for (int j = threadIdx.x; j < nv; j += kGnClusterThreads) {
    const Pack<T, V> v = reinterpret_cast<const Pack<T, V>*>(tile)[j];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float d = to_float(v.e[e]) - bm;
      m2 += d * d;
    }
  }
  const double block_m2 = block_sum<kGnClusterThreads>(static_cast<double>(m2), red);
  if (threadIdx.x == 0) {
    stats[0] = count;
    stats[1] = block_mean;
    stats[2] = block_m2;
  }
  cluster.sync();
  if (threadIdx.x == 0) {  // Chan's merge of the ranks' (count, mean, M2), in rank order
    double nt = 0.0, mt = 0.0, m2t = 0.0;
    for (int r = 0; r < cp.blocks; ++r) {
      const double* peer = cluster.map_shared_rank(stats, r);
      const double nb = peer[0];
      if (nb == 0.0) continue;
      const double delta = peer[1] - mt, total = nt + nb;
      mt += delta * nb / total;
      m2t += peer[2] + delta * delta * nt * nb / total;
      nt = total;
    }
    merged[0] = mt;
    merged[1] = 1.0 / sqrt((m2t > 0.0 ? m2t : 0.0) / nt + eps);
    if (rank == 0) {
      mean[fg] = static_cast<float>(mt);
      rstd[fg] = static_cast<float>(merged[1]);
    }
  }
  cluster.sync();  // every peer has read `stats`; `merged` is visible to the block
  const float mu = static_cast<float>(merged[0]), rs = static_cast<float>(merged[1]);
  const int64_t c0 = (fg % s.groups) * cgroup;
  for (int64_t c = threadIdx.x; c < cgroup; c += kGnClusterThreads) {  // as ApplyOp, from the float statistics
    const float scale = rs * (weight ? weight[c0 + c] : 1.f);
    consts[c] = scale;
    consts[cgroup + c] = (bias ? bias[c0 + c] : 0.f) - mu * scale;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < nv; j += kGnClusterThreads) {
    const int64_t i = begin + int64_t{j} * V;
    const uint32_t c = static_cast<uint32_t>(i) / S32;
    const float scale = consts[c], shift = consts[cgroup + c];
    const Pack<T, V> v = reinterpret_cast<const Pack<T, V>*>(tile)[j];
    float out[V];
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = activate<SILU>(to_float(v.e[e]) * scale + shift);
    store<T, V>(y + element(i), out);
  }
#else
  __trap();  // launched only on sm_90 and newer (cluster_forward)
#endif
}

// What a device allows the single-read kernel (asked once per device and kernel).
struct ClusterDevice {
  bool usable = false;   // code compiled for sm_90+ (ptxVersion: not compute_80 PTX the driver
                         // recompiled, whose body traps), and the dynamic shared memory attribute set
  int sms = 0;
  int64_t budget = 0;    // dynamic shared memory per block: kGnClusterSmemBytes or the device's opt-in
                         // limit less the kernel's static shared memory and 1 KB, the smaller
};

// Whether the single-read forward ran (*ran): SORA_KERNELS_GN_CLUSTER is not "0", the device has
// thread-block clusters and the build has the kernel's sm_90 code, the plan fits, a cluster of
// its size can be resident, and the launch succeeds. Anything else leaves *ran false with no
// error set, and the three passes run.
template <typename T, int V, bool SILU>
int cluster_forward(const GnShape& s, int vec, const T* x, const float* weight, const float* bias, float eps, T* y,
                    float* mean, float* rstd, cudaStream_t stream, bool* ran) {
  *ran = false;
  if (const char* env = std::getenv("SORA_KERNELS_GN_CLUSTER"); env && std::strcmp(env, "0") == 0) return 0;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return static_cast<int>(cudaGetLastError());
  const auto kernel = gn_cluster_forward_kernel<T, V, SILU>;
  static std::mutex mutex;
  static std::map<int, ClusterDevice> devices;
  static std::map<std::tuple<int, int, int>, bool> fits;  // (device, blocks, smem) -> a cluster can be resident
  std::lock_guard<std::mutex> lock(mutex);
  auto found = devices.find(device);
  if (found == devices.end()) {
    ClusterDevice d;
    int major = 0, optin = 0;
    cudaFuncAttributes attributes{};
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9 &&
        cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
        cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.ptxVersion >= 90 &&
        attributes.binaryVersion >= 90) {
      d.budget = std::min<int64_t>(kGnClusterSmemBytes, int64_t{optin} - int64_t(attributes.sharedSizeBytes) - 1024);
      d.usable = d.budget > 0 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      static_cast<int>(d.budget)) == cudaSuccess;
    }
    if (!d.usable) cudaGetLastError();  // clear whatever refused it: the three passes run
    found = devices.emplace(device, d).first;
  }
  const ClusterDevice& d = found->second;
  if (!d.usable) return 0;
  const GnClusterPlan cp = gn_cluster_plan(s, vec, sizeof(T), d.sms, d.budget);
  const int64_t grid = s.batch * s.frames * s.groups * cp.blocks;
  if (cp.blocks == 0 || grid > INT_MAX) return 0;
  const int smem = static_cast<int>(gn_cluster_smem_bytes(s, cp, sizeof(T)));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(kGnClusterThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cp.blocks);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  const auto key = std::make_tuple(device, cp.blocks, smem);
  auto fit = fits.find(key);
  if (fit == fits.end()) {
    int clusters = 0;
    const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters >= 1;
    if (!ok) cudaGetLastError();
    fit = fits.emplace(key, ok).first;
  }
  if (!fit->second) return 0;
  if (cudaLaunchKernelEx(&config, kernel, x, s, cp, weight, bias, eps, y, mean, rstd) != cudaSuccess) {
    cudaGetLastError();  // a launch error (not a fault in a kernel): forget the device's answers, run the three passes
    devices.erase(device);
    fits.erase(key);
    return 0;
  }
  *ran = true;
  return 0;
}

// ---- launchers -------------------------------------------------------------------------------

// Grids of at most 2^31 - 1 blocks, and a workspace of fewer than 2^31 floats (the finalize
// kernels count a group's pairs in 32 bits).
int check(const GnShape& s, const GnPlan& p) {
  const int64_t frame_groups = s.batch * s.frames * s.groups;
  if (p.blocks <= 0 || p.blocks > INT_MAX || frame_groups > INT_MAX || gn_workspace_floats(s, p) > INT_MAX) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  return 0;
}

template <typename T, int V, bool CL>
int forward(const GnShape& s, const GnPlan& p, const T* x, const float* weight, const float* bias, float eps,
            bool silu, T* y, float* mean, float* rstd, float* workspace, cudaStream_t stream) {
  if constexpr (!CL && V > 1) {  // x read once where the call fits (the three passes below read it twice)
    bool ran = false;
    const int err = silu ? cluster_forward<T, V, true>(s, V, x, weight, bias, eps, y, mean, rstd, stream, &ran)
                         : cluster_forward<T, V, false>(s, V, x, weight, bias, eps, y, mean, rstd, stream, &ran);
    if (err || ran) return err;
  }
  const unsigned blocks = static_cast<unsigned>(p.blocks);
  const unsigned frame_groups = static_cast<unsigned>(s.batch * s.frames * s.groups);
  gn_reduce_kernel<StatsOp<T>, CL, T, V><<<blocks, kThreads, 0, stream>>>(StatsOp<T>{x, s}, x, nullptr, s, p,
                                                                          workspace);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  gn_finalize_stats_kernel<T><<<frame_groups, kFinalizeThreads, 0, stream>>>(x, workspace, s, p, eps, mean, rstd);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  if (silu) {
    gn_map_kernel<ApplyOp<true>, CL, T, V><<<blocks, kThreads, 0, stream>>>(ApplyOp<true>{s, mean, rstd, weight, bias},
                                                                            x, nullptr, y, s, p);
  } else {
    gn_map_kernel<ApplyOp<false>, CL, T, V><<<blocks, kThreads, 0, stream>>>(
        ApplyOp<false>{s, mean, rstd, weight, bias}, x, nullptr, y, s, p);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int V, bool CL, bool SILU>
int backward(const GnShape& s, const GnPlan& p, const T* x, const T* dy, const float* weight, const float* bias,
             const float* mean, const float* rstd, T* dx, float* workspace, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.blocks);
  const unsigned frame_groups = static_cast<unsigned>(s.batch * s.frames * s.groups);
  float* pair = workspace + gn_part_floats(s, p);
  gn_reduce_kernel<GradSumsOp<SILU>, CL, T, V><<<blocks, kThreads, 0, stream>>>(
      GradSumsOp<SILU>{s, mean, rstd, weight, bias}, x, dy, s, p, workspace);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  gn_finalize_grad_kernel<<<frame_groups, kFinalizeThreads, 0, stream>>>(workspace, s, p, weight, pair);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  gn_map_kernel<GradApplyOp<SILU>, CL, T, V><<<blocks, kThreads, 0, stream>>>(
      GradApplyOp<SILU>{s, mean, rstd, weight, bias, pair}, x, dy, dx, s, p);
  return static_cast<int>(cudaGetLastError());
}

// The plan's vector width (gn_vector_elements, or 1) and layout as template arguments.
template <typename T, class F>
int with_layout(const GnShape& s, const GnPlan& p, F&& f) {
  constexpr int kCont = gn_vector_elements(false, sizeof(T)), kLast = gn_vector_elements(true, sizeof(T));
  if (s.channels_last) {
    if (p.vec == kLast) return f(std::integral_constant<int, kLast>{}, std::true_type{});
    if (p.vec == 1) return f(std::integral_constant<int, 1>{}, std::true_type{});
  } else {
    if (p.vec == kCont) return f(std::integral_constant<int, kCont>{}, std::false_type{});
    if (p.vec == 1) return f(std::integral_constant<int, 1>{}, std::false_type{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename T>
int forward_typed(const GnShape& s, const GnPlan& p, const void* x, const float* weight, const float* bias, float eps,
                  bool silu, void* y, float* mean, float* rstd, float* workspace, cudaStream_t stream) {
  return with_layout<T>(s, p, [&](auto vec, auto cl) {
    return forward<T, decltype(vec)::value, decltype(cl)::value>(s, p, static_cast<const T*>(x), weight, bias, eps,
                                                                 silu, static_cast<T*>(y), mean, rstd, workspace,
                                                                 stream);
  });
}

template <typename T>
int backward_typed(const GnShape& s, const GnPlan& p, const void* x, const void* dy, const float* weight,
                   const float* bias, const float* mean, const float* rstd, bool silu, void* dx, float* workspace,
                   cudaStream_t stream) {
  return with_layout<T>(s, p, [&](auto vec, auto cl) {
    constexpr int V = decltype(vec)::value;
    constexpr bool CL = decltype(cl)::value;
    const T* xt = static_cast<const T*>(x);
    const T* dyt = static_cast<const T*>(dy);
    T* dxt = static_cast<T*>(dx);
    return silu ? backward<T, V, CL, true>(s, p, xt, dyt, weight, bias, mean, rstd, dxt, workspace, stream)
                : backward<T, V, CL, false>(s, p, xt, dyt, weight, bias, mean, rstd, dxt, workspace, stream);
  });
}

}  // namespace

int launch_group_norm_forward_cuda(FloatType type, const GnShape& s, const GnPlan& p, const void* x,
                                   const float* weight, const float* bias, float eps, bool silu, void* y, float* mean,
                                   float* rstd, float* workspace, cudaStream_t stream) {
  if (const int err = check(s, p)) return err;
  switch (type) {
    case FloatType::kFloat32:
      return forward_typed<float>(s, p, x, weight, bias, eps, silu, y, mean, rstd, workspace, stream);
    case FloatType::kFloat16:
      return forward_typed<__half>(s, p, x, weight, bias, eps, silu, y, mean, rstd, workspace, stream);
    case FloatType::kBFloat16:
      return forward_typed<__nv_bfloat16>(s, p, x, weight, bias, eps, silu, y, mean, rstd, workspace, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_group_norm_backward_cuda(FloatType type, const GnShape& s, const GnPlan& p, const void* x, const void* dy,
                                    const float* weight, const float* bias, const float* mean, const float* rstd,
                                    bool silu, void* dx, float* workspace, cudaStream_t stream) {
  if (const int err = check(s, p)) return err;
  switch (type) {
    case FloatType::kFloat32:
      return backward_typed<float>(s, p, x, dy, weight, bias, mean, rstd, silu, dx, workspace, stream);
    case FloatType::kFloat16:
      return backward_typed<__half>(s, p, x, dy, weight, bias, mean, rstd, silu, dx, workspace, stream);
    case FloatType::kBFloat16:
      return backward_typed<__nv_bfloat16>(s, p, x, dy, weight, bias, mean, rstd, silu, dx, workspace, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace vae
}  // namespace sora_kernels
