// CUDA kernels for patchify / unpatchify and variable-size packing: one launch
// for a whole list of videos. Torch-free (raw pointers and a stream), so the
// .cu compiles without parsing torch headers and CMake builds it without Python.
#pragma once

#include <cstdint>

#include "patchify_index.h"

namespace sora_kernels {
namespace patchify {

// How a call is cut into tiles. The kernels move "units" of unit_bytes bytes
// (1, 2 or 4: a whole number of units per patch run, per video row and per
// token, and every pointer aligned to it) with global accesses of vec units.
struct CudaPlan {
  int64_t unit_bytes;       // bytes per unit
  int64_t vec;              // units per global load / store (unit_bytes * vec <= 16)
  int64_t max_tile_tokens;  // most tokens of one grid row in a tile (0: a token is too large)
  int64_t smem_bytes;       // dynamic shared memory per block (the largest tile of the call)
};

// Largest size in bytes, at most 16 and a power of two, that divides `value`.
inline int64_t pow2_divisor(int64_t value) {
  int64_t b = 16;
  while (b > 1 && value % b != 0) b /= 2;
  return b;
}

// Chooses units, vector width and the widest tile row. `align` is the largest
// power of two (<= 16) dividing every video row and data pointer and the
// tokens pointer, in bytes. `p` is in elements.
CudaPlan plan_cuda(const PatchDims& p, int64_t elem_size, int64_t align);

// Cuts each video into tiles: tile_tokens tokens of one grid row when a row is
// wider than a tile, else whole rows, tile_rows of them (~kTileBytes of data).
// Fills the slots' tile fields and plan.smem_bytes, rescales `p` and the
// slots' W from elements to units, and returns the total number of tiles.
int64_t assign_cuda_tiles(VideoSlot* slots, int64_t n, PatchDims& p, int64_t elem_size, CudaPlan& plan);

// pack = true: videos -> tokens; false: tokens -> videos. d_slots is the
// device copy of the slots from assign_cuda_tiles, p the rescaled dims.
// positions (int32 [N, 3], or nullptr) receives each token's (t, h, w) grid
// index when packing. Returns a cudaError_t as int (0 on success).
int launch_patchify_copy_cuda(bool pack, const VideoSlot* d_slots, int64_t n, int64_t total_tiles,
                              const PatchDims& p, const CudaPlan& plan, void* tokens, int32_t* positions,
                              void* stream);

}  // namespace patchify
}  // namespace sora_kernels
