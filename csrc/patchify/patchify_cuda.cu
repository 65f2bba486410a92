// CUDA kernels for patchify / unpatchify and variable-size packing.
//
// One block moves one tile: TW tokens of TH grid rows (hh0 ..) of frame patch
// tt of one video (TH > 1 only when TW is a whole row). Those tokens are R*TH
// lines of TW*pw contiguous elements in the video (R = C*pt*ph) and TH*TW*D
// contiguous elements in the tokens, so both sides are read and written with
// coalesced 16-byte accesses; the transpose between them happens in shared
// memory (lines padded to an odd stride against bank conflicts).
#include <cuda_runtime.h>

#include <algorithm>

#include "patchify_cuda.h"

namespace sora_kernels {
namespace patchify {
namespace {

// Tuning knobs (macros so that benchmarks/cuda/bench_patchify_kernel.cu can build variants).
// Defaults from a sweep on an H100 (docs/NOTES-patchify.md): full occupancy (16 blocks of
// 128 threads, 32 registers) mattered most; tile size and loads in flight hardly at all.
#ifndef SK_PATCHIFY_THREADS
#define SK_PATCHIFY_THREADS 128
#endif
#ifndef SK_PATCHIFY_MIN_BLOCKS
#define SK_PATCHIFY_MIN_BLOCKS 16
#endif
#ifndef SK_PATCHIFY_TILE_BYTES
#define SK_PATCHIFY_TILE_BYTES (12 * 1024)
#endif
#ifndef SK_PATCHIFY_ILP
#define SK_PATCHIFY_ILP 2
#endif
constexpr int kThreads = SK_PATCHIFY_THREADS;
constexpr int kIlp = SK_PATCHIFY_ILP;  // global loads a thread issues before it waits on the first
constexpr int64_t kTileBytes = SK_PATCHIFY_TILE_BYTES;  // target payload of one tile
constexpr int64_t kSmemLimit = 46 * 1024;  // dynamic shared memory per block, under the 48 KB default

template <typename Unit, int V>
struct alignas(sizeof(Unit) * V) Vec {
  Unit u[V];
};

// Shared-memory bytes of a tile of `rows` grid rows of `tokens` tokens: the
// int64 offset of each of its R*rows video lines, then the lines themselves
// at an odd stride (in units) against bank conflicts.
SK_HOST_DEVICE int64_t line_stride(int64_t tokens, int64_t pwu) { return (tokens * pwu) | 1; }
inline int64_t tile_smem_bytes(int64_t runs, int64_t rows, int64_t tokens, int64_t pwu, int64_t unit_bytes) {
  const int64_t lines = runs * rows;
  const int64_t offsets = (lines * static_cast<int64_t>(sizeof(int64_t)) + 15) / 16 * 16;
  return offsets + lines * line_stride(tokens, pwu) * unit_bytes;
}

// Tile geometry, computed once per block. A tile is th grid rows (hh0 ..) of
// tw tokens (w0 ..) of frame patch tt; its th*tw tokens are contiguous in the
// packed tokens (th > 1 only when a tile spans whole rows).
struct Tile {
  const VideoSlot* slot;
  int64_t tt, hh0, w0;
  int th, tw;
  int64_t tok0;  // first token of the tile in the packed tokens
};

__device__ __forceinline__ Tile locate_tile(const VideoSlot* slots, int64_t n, const PatchDims& p) {
  // Per-video tile counts fit in 32 bits (the launcher checks the grid size).
  Tile t;
  const int64_t tile = blockIdx.x;
  t.slot = slots + find_video(slots, n, tile);
  const int32_t Hg = static_cast<int32_t>(t.slot->H / p.ph), Wg = static_cast<int32_t>(t.slot->W / p.pw);
  const int32_t TH = static_cast<int32_t>(t.slot->tile_rows), TW = static_cast<int32_t>(t.slot->tile_tokens);
  const int32_t wtiles = (Wg + TW - 1) / TW, htiles = (Hg + TH - 1) / TH;
  int32_t local = static_cast<int32_t>(tile - t.slot->tile_offset);
  const int32_t wt = local % wtiles;
  local /= wtiles;
  const int32_t ht = local % htiles;
  t.tt = local / htiles;
  t.hh0 = static_cast<int64_t>(ht) * TH;
  t.w0 = static_cast<int64_t>(wt) * TW;
  t.th = min(TH, Hg - ht * TH);
  t.tw = min(TW, Wg - wt * TW);
  t.tok0 = t.slot->token_offset + (t.tt * Hg + t.hh0) * Wg + t.w0;
  return t;
}

// PACK: video lines -> shared memory -> contiguous tokens.
// !PACK: contiguous tokens -> shared memory -> video lines.
// Line l = dh * R + r holds run r of grid row hh0 + dh for the tile's tw tokens.
template <typename Unit, int V, bool PACK>
__global__ void __launch_bounds__(kThreads, SK_PATCHIFY_MIN_BLOCKS)
patchify_tile_kernel(const VideoSlot* __restrict__ slots, int64_t n, PatchDims p, Unit* __restrict__ tokens,
                     int32_t* __restrict__ positions) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Tile t = locate_tile(slots, n, p);
  const int R = static_cast<int>(p.runs());
  const int pwu = static_cast<int>(p.pw);
  const int D = static_cast<int>(p.dim());
  const int lines = R * t.th;
  const int stride = static_cast<int>(line_stride(t.slot->tile_tokens, pwu));
  int64_t* line_off = reinterpret_cast<int64_t*>(smem_raw);  // [lines] offsets in the video
  Unit* buf = reinterpret_cast<Unit*>(smem_raw + (lines * sizeof(int64_t) + 15) / 16 * 16);  // [lines, stride]

  Unit* video = reinterpret_cast<Unit*>(t.slot->data);
  Unit* tok = tokens + t.tok0 * D;
  if (PACK && positions != nullptr) {  // (t, h, w) grid index of each token of the tile
    for (int q = threadIdx.x; q < t.th * t.tw; q += kThreads) {
      const int dh = q / t.tw;
      int32_t* pos = positions + (t.tok0 + q) * 3;
      pos[0] = static_cast<int32_t>(t.tt);
      pos[1] = static_cast<int32_t>(t.hh0 + dh);
      pos[2] = static_cast<int32_t>(t.w0 + q - dh * t.tw);
    }
  }
  for (int l = threadIdx.x; l < lines; l += kThreads) {
    const int dh = l / R, r = l - dh * R;
    line_off[l] = run_offset(p, t.slot->T, t.slot->H, t.slot->W, r, t.tt, t.hh0 + dh, t.w0);
  }
  __syncthreads();

  const int line_len = t.tw * pwu;  // units per video line in this tile
  const int line_vecs = line_len / V;
  const int line_tail = line_len - line_vecs * V;
  const int tok_vecs = t.th * t.tw * D / V;  // D % V == 0 by the plan

  if (PACK) {
    // kIlp loads in flight per thread, then their shared-memory stores.
    for (int base = threadIdx.x; base < lines * line_vecs; base += kThreads * kIlp) {
      Vec<Unit, V> x[kIlp];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int idx = base + u * kThreads;
        if (idx < lines * line_vecs) {
          const int l = idx / line_vecs, e = (idx - l * line_vecs) * V;
          x[u] = *reinterpret_cast<const Vec<Unit, V>*>(video + line_off[l] + e);
        }
      }
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int idx = base + u * kThreads;
        if (idx < lines * line_vecs) {
          const int l = idx / line_vecs, e = (idx - l * line_vecs) * V;
#pragma unroll
          for (int m = 0; m < V; ++m) buf[l * stride + e + m] = x[u].u[m];
        }
      }
    }
    for (int idx = threadIdx.x; idx < lines * line_tail; idx += kThreads) {
      const int l = idx / line_tail, e = line_vecs * V + (idx - l * line_tail);
      buf[l * stride + e] = video[line_off[l] + e];
    }
  } else {
    for (int base = threadIdx.x; base < tok_vecs; base += kThreads * kIlp) {
      Vec<Unit, V> x[kIlp];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int q = base + u * kThreads;
        if (q < tok_vecs) x[u] = *reinterpret_cast<const Vec<Unit, V>*>(tok + q * V);
      }
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int q = base + u * kThreads;
        if (q < tok_vecs) {
          const int token = q * V / D, f0 = q * V - token * D;
          const int dh = token / t.tw, w = token - dh * t.tw;
          int r = f0 / pwu, k = f0 - r * pwu;
#pragma unroll
          for (int m = 0; m < V; ++m) {
            buf[(dh * R + r) * stride + w * pwu + k] = x[u].u[m];
            if (++k == pwu) { k = 0; ++r; }
          }
        }
      }
    }
  }
  __syncthreads();
  if (PACK) {
    for (int q = threadIdx.x; q < tok_vecs; q += kThreads) {
      Vec<Unit, V> x;
      const int token = q * V / D, f0 = q * V - token * D;
      const int dh = token / t.tw, w = token - dh * t.tw;
      int r = f0 / pwu, k = f0 - r * pwu;
#pragma unroll
      for (int m = 0; m < V; ++m) {
        x.u[m] = buf[(dh * R + r) * stride + w * pwu + k];
        if (++k == pwu) { k = 0; ++r; }
      }
      *reinterpret_cast<Vec<Unit, V>*>(tok + q * V) = x;
    }
  } else {
    for (int idx = threadIdx.x; idx < lines * line_vecs; idx += kThreads) {
      const int l = idx / line_vecs, e = (idx - l * line_vecs) * V;
      Vec<Unit, V> x;
#pragma unroll
      for (int m = 0; m < V; ++m) x.u[m] = buf[l * stride + e + m];
      *reinterpret_cast<Vec<Unit, V>*>(video + line_off[l] + e) = x;
    }
    for (int idx = threadIdx.x; idx < lines * line_tail; idx += kThreads) {
      const int l = idx / line_tail, e = line_vecs * V + (idx - l * line_tail);
      video[line_off[l] + e] = buf[l * stride + e];
    }
  }
}

template <typename Unit, int V>
cudaError_t launch_typed(bool pack, const VideoSlot* slots, int64_t n, int64_t tiles, const PatchDims& p,
                         const CudaPlan& plan, void* tokens, int32_t* positions, cudaStream_t stream) {
  Unit* tok = static_cast<Unit*>(tokens);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  if (pack)
    patchify_tile_kernel<Unit, V, true><<<tiles, kThreads, smem, stream>>>(slots, n, p, tok, positions);
  else
    patchify_tile_kernel<Unit, V, false><<<tiles, kThreads, smem, stream>>>(slots, n, p, tok, nullptr);
  return cudaGetLastError();
}

// Units of U bytes; only vector widths with vec * U <= 16 bytes are compiled.
template <typename Unit>
cudaError_t launch_unit(bool pack, const VideoSlot* slots, int64_t n, int64_t tiles, const PatchDims& p,
                        const CudaPlan& plan, void* tokens, int32_t* positions, cudaStream_t stream) {
  constexpr int kMaxVec = 16 / sizeof(Unit) < 4 ? 16 / sizeof(Unit) : 4;
  if (plan.vec >= 4 && kMaxVec >= 4)
    return launch_typed<Unit, kMaxVec>(pack, slots, n, tiles, p, plan, tokens, positions, stream);
  if (plan.vec >= 2) return launch_typed<Unit, 2>(pack, slots, n, tiles, p, plan, tokens, positions, stream);
  return launch_typed<Unit, 1>(pack, slots, n, tiles, p, plan, tokens, positions, stream);
}

}  // namespace

CudaPlan plan_cuda(const PatchDims& p, int64_t elem_size, int64_t align) {
  CudaPlan plan;
  const int64_t run_bytes = p.pw * elem_size;
  // Units: the largest power of two dividing a run, capped by alignment and 4 bytes
  // (wider units would turn the shared-memory transpose into bank conflicts).
  plan.unit_bytes = pow2_divisor(run_bytes);
  if (plan.unit_bytes > align) plan.unit_bytes = align;
  if (plan.unit_bytes > 4) plan.unit_bytes = 4;
  const int64_t pwu = run_bytes / plan.unit_bytes;
  // Vector accesses: every line, tile start and token tile start must be aligned.
  int64_t vec_bytes = std::min(align, pow2_divisor(p.dim() * elem_size));
  if (vec_bytes < plan.unit_bytes) vec_bytes = plan.unit_bytes;
  plan.vec = std::min<int64_t>(vec_bytes / plan.unit_bytes, 4);  // 16 bytes for 4-byte units
  // Widest tile row: ~kTileBytes of payload within the shared-memory limit, and a
  // multiple of vec units so that every tile of a cut row starts aligned.
  int64_t tw = std::max<int64_t>(1, kTileBytes / (p.runs() * run_bytes));
  while (tw > 0 && tile_smem_bytes(p.runs(), 1, tw, pwu, plan.unit_bytes) > kSmemLimit) --tw;
  while (tw > 1 && (tw * pwu) % plan.vec != 0) --tw;
  if (tw >= 1 && (tw * pwu) % plan.vec != 0) plan.vec = 1;
  plan.max_tile_tokens = tw;
  plan.smem_bytes = 0;
  return plan;
}

int64_t assign_cuda_tiles(VideoSlot* slots, int64_t n, PatchDims& p, int64_t elem_size, CudaPlan& plan) {
  const int64_t run_bytes = p.pw * elem_size, pwu = run_bytes / plan.unit_bytes;
  int64_t tiles = 0;
  for (int64_t v = 0; v < n; ++v) {
    VideoSlot& s = slots[v];
    const int64_t Tg = s.T / p.pt, Hg = s.H / p.ph, Wg = s.W / p.pw;
    if (Wg > plan.max_tile_tokens) {  // cut rows: one grid row per tile
      s.tile_tokens = plan.max_tile_tokens;
      s.tile_rows = 1;
    } else {                          // whole rows, as many as fit
      s.tile_tokens = Wg;
      s.tile_rows = std::min(Hg, std::max<int64_t>(1, kTileBytes / (p.runs() * Wg * run_bytes)));
      while (s.tile_rows > 1 && tile_smem_bytes(p.runs(), s.tile_rows, Wg, pwu, plan.unit_bytes) > kSmemLimit)
        --s.tile_rows;
    }
    plan.smem_bytes = std::max(plan.smem_bytes,
                               tile_smem_bytes(p.runs(), s.tile_rows, s.tile_tokens, pwu, plan.unit_bytes));
    s.tile_offset = tiles;
    tiles += Tg * ((Hg + s.tile_rows - 1) / s.tile_rows) * ((Wg + s.tile_tokens - 1) / s.tile_tokens);
    s.W = s.W * elem_size / plan.unit_bytes;
  }
  p.pw = pwu;
  return tiles;
}

int launch_patchify_copy_cuda(bool pack, const VideoSlot* d_slots, int64_t n, int64_t total_tiles,
                              const PatchDims& p, const CudaPlan& plan, void* tokens, int32_t* positions,
                              void* stream) {
  if (total_tiles == 0) return 0;
  if (total_tiles > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (plan.unit_bytes) {
    case 1: return launch_unit<unsigned char>(pack, d_slots, n, total_tiles, p, plan, tokens, positions, s);
    case 2: return launch_unit<unsigned short>(pack, d_slots, n, total_tiles, p, plan, tokens, positions, s);
    default: return launch_unit<unsigned int>(pack, d_slots, n, total_tiles, p, plan, tokens, positions, s);
  }
}

}  // namespace patchify
}  // namespace sora_kernels
