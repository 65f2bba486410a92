// C++ CPU kernels (OpenMP) for patchify / unpatchify and variable-size packing.
// Torch-free: they move raw bytes, so every dtype of 1, 2, 4 or 8 bytes is
// handled and results are bitwise equal to the reference by construction.
#pragma once

#include <cstdint>

#include "patchify_index.h"

namespace sora_kernels {
namespace patchify {

// Fills slots[v].tile_offset with the index of each video's first grid row
// (Tg * Hg rows per video) and returns the total number of rows.
int64_t assign_cpu_rows(VideoSlot* slots, int64_t n, const PatchDims& p);

// pack = true:  videos -> tokens [N, D] (patchify)
// pack = false: tokens -> videos        (unpatchify)
// slots must come from assign_cpu_rows; elem_size is the dtype's size in bytes.
// positions (int32 [N, 3], or nullptr) receives each token's (t, h, w) grid
// index when packing.
void patchify_copy_cpu(bool pack, const VideoSlot* slots, int64_t n, int64_t total_rows,
                       const PatchDims& p, int64_t elem_size, void* tokens, int32_t* positions = nullptr);

}  // namespace patchify
}  // namespace sora_kernels
