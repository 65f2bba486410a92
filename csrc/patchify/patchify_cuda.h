// CUDA kernels for patchify / unpatchify and variable-size packing: one launch
// for a whole list of videos. Torch-free (raw pointers and a stream), so the
// .cu compiles without parsing torch headers and CMake builds it without Python.
#pragma once

#include <cstdint>

#include "patchify_index.h"

namespace sora_kernels {
namespace patchify {

// How a call is cut into tiles. The kernels move "units" of unit_bytes bytes
// (1, 2, 4, 8 or 16: a whole number of units per patch run, per video row and
// per token, and every pointer aligned to it) and global accesses of vec units.
struct CudaPlan {
  int64_t unit_bytes;   // bytes per unit
  int64_t vec;          // units per global load / store (unit_bytes * vec <= 16)
  int64_t tile_tokens;  // TW: tokens of one grid row handled by one block
  int64_t smem_bytes;   // dynamic shared memory per block
};

// Largest size in bytes, at most 16 and a power of two, that divides `value`.
inline int64_t pow2_divisor(int64_t value) {
  int64_t b = 16;
  while (b > 1 && value % b != 0) b /= 2;
  return b;
}

// Chooses units, vector width and tile size. `align` is the largest power of
// two (<= 16) dividing every video row and data pointer and the tokens pointer,
// in bytes; `max_wg` is the widest grid row. `p` is in elements.
CudaPlan plan_cuda(const PatchDims& p, int64_t elem_size, int64_t align, int64_t max_wg);

// Rescales `p` and the slots' W from elements to units, fills
// slots[v].tile_offset and returns the total number of tiles (blocks).
int64_t assign_cuda_tiles(VideoSlot* slots, int64_t n, PatchDims& p, int64_t elem_size,
                          const CudaPlan& plan);

// pack = true: videos -> tokens; false: tokens -> videos. d_slots is the
// device copy of the slots from assign_cuda_tiles, p the rescaled dims.
// Returns a cudaError_t as int (0 on success).
int launch_patchify_copy_cuda(bool pack, const VideoSlot* d_slots, int64_t n, int64_t total_tiles,
                              const PatchDims& p, const CudaPlan& plan, void* tokens, void* stream);

}  // namespace patchify
}  // namespace sora_kernels
