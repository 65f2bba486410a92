// CUDA kernels for patchify / unpatchify and variable-size packing.
//
// One block moves one tile: TW tokens of one grid row (video v, tt, hh). Those
// tokens are R = C*pt*ph rows of TW*pw contiguous elements in the video and
// TW*D contiguous elements in the tokens, so both sides are read and written
// with coalesced 16-byte accesses; the transpose between them happens in
// shared memory (rows padded to an odd stride against bank conflicts).
#include <cuda_runtime.h>

#include "patchify_cuda.h"

namespace sora_kernels {
namespace patchify {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileBytes = 16 * 1024;  // target payload of one tile

template <typename Unit, int V>
struct alignas(sizeof(Unit) * V) Vec {
  Unit u[V];
};

// Tile geometry, computed once per block.
struct Tile {
  const VideoSlot* slot;
  int64_t tt, hh, w0;
  int tw;          // tokens in this tile (<= TW)
  int64_t tok0;    // first token of the tile in the packed tokens
};

__device__ __forceinline__ Tile locate_tile(const VideoSlot* slots, int64_t n, const PatchDims& p,
                                            int64_t tile_tokens) {
  // Per-video tile counts fit in 32 bits (the launcher checks the grid size),
  // so the divisions here are 32-bit.
  Tile t;
  const int64_t tile = blockIdx.x;
  t.slot = slots + find_video(slots, n, tile);
  const int32_t Hg = static_cast<int32_t>(t.slot->H / p.ph), Wg = static_cast<int32_t>(t.slot->W / p.pw);
  const int32_t TW = static_cast<int32_t>(tile_tokens);
  const int32_t wtiles = (Wg + TW - 1) / TW;
  const int32_t local = static_cast<int32_t>(tile - t.slot->tile_offset);
  const int32_t row = local / wtiles;
  t.w0 = (local - row * wtiles) * TW;
  t.hh = row % Hg;
  t.tt = row / Hg;
  t.tw = min(TW, Wg - static_cast<int32_t>(t.w0));
  t.tok0 = t.slot->token_offset + static_cast<int64_t>(row) * Wg + t.w0;
  return t;
}

// PACK: video rows -> shared memory -> contiguous tokens.
// !PACK: contiguous tokens -> shared memory -> video rows.
template <typename Unit, int V, bool PACK>
__global__ void __launch_bounds__(kThreads, 4)
patchify_tile_kernel(const VideoSlot* __restrict__ slots, int64_t n, PatchDims p, int64_t tile_tokens,
                     Unit* __restrict__ tokens) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int R = static_cast<int>(p.runs());
  const int pwu = static_cast<int>(p.pw);
  const int D = static_cast<int>(p.dim());
  const int stride = static_cast<int>(tile_tokens) * pwu | 1;  // odd row stride in units
  int64_t* row_off = reinterpret_cast<int64_t*>(smem_raw);      // [R] run offsets in the video
  Unit* buf = reinterpret_cast<Unit*>(row_off + R);              // [R, stride]

  const Tile t = locate_tile(slots, n, p, tile_tokens);
  Unit* video = reinterpret_cast<Unit*>(t.slot->data);
  Unit* tok = tokens + t.tok0 * D;
  for (int r = threadIdx.x; r < R; r += kThreads)
    row_off[r] = run_offset(p, t.slot->T, t.slot->H, t.slot->W, r, t.tt, t.hh, t.w0);
  __syncthreads();

  const int row_len = t.tw * pwu;  // units per video row in this tile
  const int row_vecs = row_len / V;
  const int row_tail = row_len - row_vecs * V;
  const int tok_vecs = t.tw * D / V;  // D % V == 0 by the plan

  if (PACK) {
    for (int idx = threadIdx.x; idx < R * row_vecs; idx += kThreads) {
      const int r = idx / row_vecs, e = (idx - r * row_vecs) * V;
      const Vec<Unit, V> x = *reinterpret_cast<const Vec<Unit, V>*>(video + row_off[r] + e);
#pragma unroll
      for (int m = 0; m < V; ++m) buf[r * stride + e + m] = x.u[m];
    }
    for (int idx = threadIdx.x; idx < R * row_tail; idx += kThreads) {
      const int r = idx / row_tail, e = row_vecs * V + (idx - r * row_tail);
      buf[r * stride + e] = video[row_off[r] + e];
    }
  } else {
    for (int q = threadIdx.x; q < tok_vecs; q += kThreads) {
      const Vec<Unit, V> x = *reinterpret_cast<const Vec<Unit, V>*>(tok + q * V);
      const int token = q * V / D;
      const int f0 = q * V - token * D;
      int r = f0 / pwu, k = f0 - r * pwu;
#pragma unroll
      for (int m = 0; m < V; ++m) {
        buf[r * stride + token * pwu + k] = x.u[m];
        if (++k == pwu) { k = 0; ++r; }
      }
    }
  }
  __syncthreads();
  if (PACK) {
    for (int q = threadIdx.x; q < tok_vecs; q += kThreads) {
      Vec<Unit, V> x;
      const int token = q * V / D;
      const int f0 = q * V - token * D;
      int r = f0 / pwu, k = f0 - r * pwu;
#pragma unroll
      for (int m = 0; m < V; ++m) {
        x.u[m] = buf[r * stride + token * pwu + k];
        if (++k == pwu) { k = 0; ++r; }
      }
      *reinterpret_cast<Vec<Unit, V>*>(tok + q * V) = x;
    }
  } else {
    for (int idx = threadIdx.x; idx < R * row_vecs; idx += kThreads) {
      const int r = idx / row_vecs, e = (idx - r * row_vecs) * V;
      Vec<Unit, V> x;
#pragma unroll
      for (int m = 0; m < V; ++m) x.u[m] = buf[r * stride + e + m];
      *reinterpret_cast<Vec<Unit, V>*>(video + row_off[r] + e) = x;
    }
    for (int idx = threadIdx.x; idx < R * row_tail; idx += kThreads) {
      const int r = idx / row_tail, e = row_vecs * V + (idx - r * row_tail);
      video[row_off[r] + e] = buf[r * stride + e];
    }
  }
}

template <typename Unit, int V>
cudaError_t launch_typed(bool pack, const VideoSlot* slots, int64_t n, int64_t tiles,
                         const PatchDims& p, const CudaPlan& plan, void* tokens, cudaStream_t stream) {
  Unit* tok = static_cast<Unit*>(tokens);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  if (pack)
    patchify_tile_kernel<Unit, V, true><<<tiles, kThreads, smem, stream>>>(slots, n, p, plan.tile_tokens, tok);
  else
    patchify_tile_kernel<Unit, V, false><<<tiles, kThreads, smem, stream>>>(slots, n, p, plan.tile_tokens, tok);
  return cudaGetLastError();
}

// Units of U bytes; only vector widths with vec * U <= 16 bytes are compiled.
template <typename Unit>
cudaError_t launch_unit(bool pack, const VideoSlot* slots, int64_t n, int64_t tiles, const PatchDims& p,
                        const CudaPlan& plan, void* tokens, cudaStream_t stream) {
  constexpr int kMaxVec = 16 / sizeof(Unit) < 4 ? 16 / sizeof(Unit) : 4;
  if (plan.vec >= 4 && kMaxVec >= 4) return launch_typed<Unit, kMaxVec>(pack, slots, n, tiles, p, plan, tokens, stream);
  if (plan.vec >= 2) return launch_typed<Unit, 2>(pack, slots, n, tiles, p, plan, tokens, stream);
  return launch_typed<Unit, 1>(pack, slots, n, tiles, p, plan, tokens, stream);
}

}  // namespace

CudaPlan plan_cuda(const PatchDims& p, int64_t elem_size, int64_t align, int64_t max_wg) {
  CudaPlan plan;
  const int64_t run_bytes = p.pw * elem_size;
  // Units: the largest power of two dividing a run, capped by alignment and 4 bytes
  // (wider units would turn the shared-memory transpose into bank conflicts).
  plan.unit_bytes = pow2_divisor(run_bytes);
  if (plan.unit_bytes > align) plan.unit_bytes = align;
  if (plan.unit_bytes > 4) plan.unit_bytes = 4;
  const int64_t pwu = run_bytes / plan.unit_bytes;
  const int64_t token_bytes = p.dim() * elem_size;
  // Vector accesses: every row, tile start and token tile start must be aligned.
  int64_t vec_bytes = align < pow2_divisor(token_bytes) ? align : pow2_divisor(token_bytes);
  if (vec_bytes < plan.unit_bytes) vec_bytes = plan.unit_bytes;
  plan.vec = vec_bytes / plan.unit_bytes;
  if (plan.vec > 4) plan.vec = 4;  // 16 bytes for 4-byte units; 1- and 2-byte units stay narrow
  // Tile: ~kTileBytes of payload, a multiple of vec in units along the row.
  int64_t tw = kTileBytes / (p.runs() * run_bytes);
  if (tw < 1) tw = 1;
  while (tw > 1 && (tw * pwu) % plan.vec != 0) --tw;
  if ((tw * pwu) % plan.vec != 0) {  // one token per tile cannot keep rows aligned
    plan.vec = 1;
  }
  if (tw >= max_wg) tw = max_wg;  // one tile per row: every tile starts at w0 = 0
  plan.tile_tokens = tw;
  const int64_t stride = (tw * pwu) | 1;
  plan.smem_bytes = p.runs() * static_cast<int64_t>(sizeof(int64_t)) + p.runs() * stride * plan.unit_bytes;
  return plan;
}

int64_t assign_cuda_tiles(VideoSlot* slots, int64_t n, PatchDims& p, int64_t elem_size, const CudaPlan& plan) {
  const int64_t scale = elem_size;  // element -> byte, then byte -> unit
  int64_t tiles = 0;
  const int64_t Wg_div = p.pw;
  for (int64_t v = 0; v < n; ++v) {
    const int64_t Wg = slots[v].W / Wg_div;
    slots[v].tile_offset = tiles;
    tiles += (slots[v].T / p.pt) * (slots[v].H / p.ph) * ((Wg + plan.tile_tokens - 1) / plan.tile_tokens);
    slots[v].W = slots[v].W * scale / plan.unit_bytes;
  }
  p.pw = p.pw * scale / plan.unit_bytes;
  return tiles;
}

int launch_patchify_copy_cuda(bool pack, const VideoSlot* d_slots, int64_t n, int64_t total_tiles,
                              const PatchDims& p, const CudaPlan& plan, void* tokens, void* stream) {
  if (total_tiles == 0) return 0;
  if (total_tiles > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (plan.unit_bytes) {
    case 1: return launch_unit<unsigned char>(pack, d_slots, n, total_tiles, p, plan, tokens, s);
    case 2: return launch_unit<unsigned short>(pack, d_slots, n, total_tiles, p, plan, tokens, s);
    default: return launch_unit<unsigned int>(pack, d_slots, n, total_tiles, p, plan, tokens, s);
  }
}

}  // namespace patchify
}  // namespace sora_kernels
