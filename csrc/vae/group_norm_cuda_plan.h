// How the per-frame GroupNorm CUDA kernels (group_norm_cuda.cu) cut a call into blocks, which
// elements each block and thread visit, and where each block's partial sums go in the
// workspace. No CUDA or torch headers: the launcher, the kernels and a C++ unit test
// (csrc/tests/test_group_norm_cuda_plan.cpp, run by ctest without a GPU) share this index math.
//
// x is [B, C, T, S] (S = H * W) through element strides, in one of two dense layouts:
//   contiguous     each (b, c, t) plane is S contiguous positions (stride_s == 1).
//                  A block takes one piece (a run of positions) of one plane.
//   channels-last  each (b, t) frame is S rows of C contiguous channels (stride_c == 1).
//                  A block takes one piece (a run of rows) of one frame, every channel; its
//                  threads form a [tr, tc] grid: tc vector columns of channels, tr rows at a
//                  time (more than tc * vec channels: the block walks column blocks of tc).
// Either way a block's partial sums are per channel, in part[b * T + t, c, piece, 2] (float),
// so one finalize kernel serves both layouts and no sum needs an atomic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#ifndef SK_HOST_DEVICE
#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif
#endif

namespace sora_kernels {
namespace vae {

constexpr int kGnThreads = 256;       // threads per block of the streaming kernels
constexpr int kGnMaxPerThread = 256;  // most elements of one channel a thread sums in float before the
                                      // block's tree (the CPU kernels' float block); double beyond
constexpr int kGnBlocksPerSm = 16;    // blocks the plan aims at per SM: two waves of 8 resident blocks

// x (and y, dy, dx, which share its strides) as [B, C, T, S] by element strides.
struct GnShape {
  int64_t batch, channels, frames, positions, groups;  // B, C, T, S, G
  int64_t stride_b, stride_c, stride_t, stride_s;
  bool channels_last;
};

struct GnPlan {
  int vec;         // elements per global access: gn_vector_elements, or 1
  int tc, tr;      // channels-last: vector columns per block row (<= kGnThreads) and rows per pass
  int64_t pieces;  // pieces per plane (contiguous) or per frame (channels-last)
  int64_t span;    // positions per piece (the last may be shorter); contiguous: a multiple of vec
  int64_t blocks;  // blocks of each streaming kernel
};

SK_HOST_DEVICE int64_t gn_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The piece a block works on.
struct GnPiece {
  int64_t bt;          // frame b * T + t
  int64_t c;           // contiguous: the plane's channel; channels-last: 0
  int64_t piece;       // index of the piece in its plane / frame
  int64_t base;        // element offset of the plane (contiguous) or of the frame (channels-last)
  int64_t begin, end;  // the piece's positions [begin, end)
};

// block = (bt * C + c) * pieces + piece (contiguous), bt * pieces + piece (channels-last).
SK_HOST_DEVICE GnPiece gn_piece(const GnShape& s, const GnPlan& p, int64_t block) {
  GnPiece q;
  q.piece = block % p.pieces;
  const int64_t rest = block / p.pieces;
  q.c = s.channels_last ? 0 : rest % s.channels;
  q.bt = s.channels_last ? rest : rest / s.channels;
  const int64_t t = q.bt % s.frames, b = q.bt / s.frames;
  q.base = b * s.stride_b + t * s.stride_t + q.c * s.stride_c;
  q.begin = q.piece * p.span;
  q.end = q.begin + p.span < s.positions ? q.begin + p.span : s.positions;
  return q;
}

// Element offset of vector j of a contiguous piece (positions begin + j * vec ...).
SK_HOST_DEVICE int64_t gn_contiguous_offset(const GnPiece& q, int64_t j, int vec) { return q.base + q.begin + j * vec; }

// Element offset of vector column col (channels col * vec ...) at position (row) r of a channels-last frame.
SK_HOST_DEVICE int64_t gn_channels_last_offset(const GnShape& s, const GnPiece& q, int64_t r, int64_t col, int vec) {
  return q.base + r * s.stride_s + col * vec;
}

// Float offset of the (sum, sum) pair of (frame bt, channel c, piece) in the workspace. The pairs
// of one group of one frame are contiguous: channel-major, then piece.
SK_HOST_DEVICE int64_t gn_part_index(const GnShape& s, const GnPlan& p, int64_t bt, int64_t c, int64_t piece) {
  return ((bt * s.channels + c) * p.pieces + piece) * 2;
}

// Workspace (float32): part [B*T, C, pieces, 2], then pair [B*T, G, 2] (the backward's m1, m2).
inline int64_t gn_part_floats(const GnShape& s, const GnPlan& p) {
  return s.batch * s.frames * s.channels * p.pieces * 2;
}
inline int64_t gn_workspace_floats(const GnShape& s, const GnPlan& p) {
  return gn_part_floats(s, p) + s.batch * s.frames * s.groups * 2;
}

// Whether every access of vec elements can be one aligned access: each address is aligned to
// vec elements, the unit-stride axis (S contiguous, C channels-last) is a multiple of vec long,
// and every other stride of a dimension longer than 1 is a multiple of vec. Then no vector
// straddles two planes or two rows.
inline bool gn_can_vectorize(const GnShape& s, int vec, int elem_bytes, std::initializer_list<uintptr_t> addresses) {
  for (const uintptr_t a : addresses)
    if (a % (static_cast<uintptr_t>(vec) * elem_bytes) != 0) return false;
  const auto ok = [vec](int64_t size, int64_t stride) { return size <= 1 || stride % vec == 0; };
  const bool outer = ok(s.frames, s.stride_t) && ok(s.batch, s.stride_b);
  if (s.channels_last) return s.channels % vec == 0 && ok(s.positions, s.stride_s) && outer;
  return s.positions % vec == 0 && ok(s.channels, s.stride_c) && outer;
}

// Elements per access when every access can be aligned: 16 bytes along the positions
// (contiguous); 4 channels along the channels (channels-last: 8 bytes of half / bfloat16, 16 of
// float), which keeps each thread's per-channel constants and sums few.
constexpr int gn_vector_elements(bool channels_last, int elem_bytes) { return channels_last ? 4 : 16 / elem_bytes; }

// The kernels' vector width for this call: gn_vector_elements if every access of x, y, dy, dx
// (`addresses`) can be one aligned access, else 1.
inline int gn_vector_width(const GnShape& s, int elem_bytes, std::initializer_list<uintptr_t> addresses) {
  const int vec = gn_vector_elements(s.channels_last, elem_bytes);
  return gn_can_vectorize(s, vec, elem_bytes, addresses) ? vec : 1;
}

// Cuts the call into pieces: about kGnBlocksPerSm blocks per SM when there are few planes or
// frames (B * T * G small: the frames are split), never so many that a thread has no vector /
// row, never so few that a thread sums more than kGnMaxPerThread elements of a channel.
inline GnPlan gn_plan(const GnShape& s, int vec, int sm_count) {
  GnPlan p{};
  p.vec = vec;
  const int64_t frames = s.batch * s.frames, S = s.positions;
  if (frames <= 0 || S <= 0 || s.channels <= 0) return p;  // nothing to launch (the caller returns early)
  const int64_t target = int64_t{kGnBlocksPerSm} * std::max(sm_count, 1);
  if (s.channels_last) {
    const int64_t cvec = s.channels / vec;
    p.tc = static_cast<int>(std::min<int64_t>(cvec, kGnThreads));
    p.tr = kGnThreads / p.tc;
    const int64_t fewest = gn_ceil_div(S, int64_t{kGnMaxPerThread} * p.tr);
    const int64_t most = gn_ceil_div(S, p.tr);
    const int64_t pieces = std::max(fewest, std::min(gn_ceil_div(target, frames), most));
    p.span = gn_ceil_div(S, pieces);
    p.pieces = gn_ceil_div(S, p.span);
    p.blocks = frames * p.pieces;
  } else {
    p.tc = kGnThreads;
    p.tr = 1;
    const int64_t planes = frames * s.channels;
    const int64_t fewest = gn_ceil_div(S, int64_t{kGnMaxPerThread} * kGnThreads);
    const int64_t most = gn_ceil_div(S, int64_t{kGnThreads} * vec);
    const int64_t pieces = std::max(fewest, std::min(gn_ceil_div(target, planes), most));
    p.span = gn_ceil_div(gn_ceil_div(S, pieces), vec) * vec;  // <= kGnMaxPerThread * kGnThreads, a multiple of vec
    p.pieces = gn_ceil_div(S, p.span);
    p.blocks = planes * p.pieces;
  }
  return p;
}

// ---- the single-read forward (sm_90 thread-block clusters, contiguous layout) --------------
// One cluster of `blocks` blocks per (frame, group): block r copies elements [r * span, (r + 1)
// * span) of the group's Cg * S elements (channel-major, so a vector never leaves its plane when
// S is a multiple of vec) into its shared memory, sums them, reads its peers' partial statistics
// through distributed shared memory, merges them in rank order and writes y from shared memory:
// x is read once, where the three-pass kernels read it twice.

constexpr int kGnClusterThreads = 512;
constexpr int kGnClusterMaxBlocks = 8;                   // the portable cluster size
constexpr int64_t kGnClusterSmemBytes = 200 * 1024;      // most per block: the tile and 2 floats per channel

struct GnClusterPlan {
  int blocks;    // per cluster (one cluster per frame-group); 0: the call does not fit
  int64_t span;  // elements per block, a multiple of vec
};

// The smallest cluster whose blocks' tiles (span elements) and per-channel constants fit in
// `smem_budget` bytes (at most kGnClusterSmemBytes; less where the device allows less), grown up
// to kGnClusterMaxBlocks while the grid has fewer than two blocks per SM, but never past one
// vector per thread per block (no empty blocks); blocks = 0 for channels-last or strided
// positions, unvectorised calls (vec == 1), or groups too large.
inline GnClusterPlan gn_cluster_plan(const GnShape& s, int vec, int elem_bytes, int sm_count,
                                     int64_t smem_budget = kGnClusterSmemBytes) {
  GnClusterPlan p{0, 0};
  if (s.channels_last || s.stride_s != 1 || vec <= 1 || s.groups <= 0) return p;
  const int64_t cg = s.channels / s.groups, n = cg * s.positions;
  const int64_t frame_groups = s.batch * s.frames * s.groups;
  if (n <= 0 || frame_groups <= 0 || n > (int64_t{1} << 31) - 1) return p;
  const int64_t budget = std::min(smem_budget, kGnClusterSmemBytes);
  const auto span_of = [&](int k) { return gn_ceil_div(gn_ceil_div(n, k), vec) * vec; };
  const auto bytes_of = [&](int k) { return span_of(k) * elem_bytes + 2 * cg * int64_t{sizeof(float)}; };
  int k = 1;
  while (k <= kGnClusterMaxBlocks && bytes_of(k) > budget) ++k;
  if (k > kGnClusterMaxBlocks) return p;
  const int64_t most = std::max<int64_t>(k, gn_ceil_div(n, int64_t{kGnClusterThreads} * vec));
  while (k < kGnClusterMaxBlocks && k < most && frame_groups * k < 2 * int64_t{std::max(sm_count, 1)}) ++k;
  p.blocks = k;
  p.span = span_of(k);
  return p;
}

// Element offset of the first element of frame-group fg = bt * G + g (channel g * Cg, position 0).
SK_HOST_DEVICE int64_t gn_cluster_base(const GnShape& s, int64_t fg) {
  const int64_t bt = fg / s.groups, g = fg % s.groups;
  return (bt / s.frames) * s.stride_b + (bt % s.frames) * s.stride_t + g * (s.channels / s.groups) * s.stride_c;
}

// Element offset of element i (< Cg * S, channel-major) of the frame-group at `base`.
SK_HOST_DEVICE int64_t gn_cluster_offset(const GnShape& s, int64_t base, int64_t i) {
  return base + (i / s.positions) * s.stride_c + (i % s.positions) * s.stride_s;
}

// Dynamic shared memory of one block of the plan.
inline int64_t gn_cluster_smem_bytes(const GnShape& s, const GnClusterPlan& p, int elem_bytes) {
  return p.span * elem_bytes + 2 * (s.channels / s.groups) * int64_t{sizeof(float)};
}

}  // namespace vae
}  // namespace sora_kernels
