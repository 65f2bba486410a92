// C++ unit test of the CUDA GroupNorm kernels' index math (group_norm_cuda_plan.h), without a
// GPU (run by ctest): for awkward shapes in both layouts, with and without vectors, and several
// SM counts, it walks every block and thread of the reduce and map kernels the way
// group_norm_cuda.cu does, through the same functions, and checks that
//   - every element of x is visited exactly once per pass, and nothing outside x;
//   - a thread sums at most kGnMaxPerThread elements of a channel;
//   - every workspace pair is written exactly once, inside the workspace, and the pairs of one
//     (frame, group) are contiguous (the finalize kernels read them so);
//   - with vectors, every access is aligned and inside one plane (contiguous) or row (channels-last);
//   - the single-read forward's cluster plan (check_cluster) likewise.
#include <cstdio>
#include <vector>

#include "vae/group_norm_cuda_plan.h"

using sora_kernels::vae::GnPiece;
using sora_kernels::vae::GnPlan;
using sora_kernels::vae::GnShape;
namespace vae = sora_kernels::vae;

namespace {

int failures = 0;
int cluster_plans = 0;  // plans check_cluster walked

void expect(bool ok, const char* what, const GnShape& s, const GnPlan& p) {
  if (ok) return;
  if (++failures <= 20) {
    std::printf("FAIL %s: B=%lld C=%lld T=%lld S=%lld G=%lld %s vec=%d pieces=%lld span=%lld tc=%d tr=%d\n", what,
                (long long)s.batch, (long long)s.channels, (long long)s.frames, (long long)s.positions,
                (long long)s.groups, s.channels_last ? "channels-last" : "contiguous", p.vec, (long long)p.pieces,
                (long long)p.span, p.tc, p.tr);
  }
}

GnShape dense(int64_t B, int64_t C, int64_t T, int64_t S, int64_t G, bool channels_last) {
  GnShape s{B, C, T, S, G, 0, 0, 0, 0, channels_last};
  if (channels_last) {  // [B, T, S, C] in memory
    s.stride_c = 1;
    s.stride_s = C;
    s.stride_t = S * C;
    s.stride_b = T * S * C;
  } else {  // [B, C, T, S]
    s.stride_s = 1;
    s.stride_t = S;
    s.stride_c = T * S;
    s.stride_b = C * T * S;
  }
  return s;
}

// Calls visit(block, thread, offset) for every access of the reduce / map kernels, in their
// loop order, and checks the per-thread bound on the way.
template <class Visit>
void walk(const GnShape& s, const GnPlan& p, Visit visit) {
  const int V = p.vec;
  for (int64_t block = 0; block < p.blocks; ++block) {
    const GnPiece q = vae::gn_piece(s, p, block);
    if (!s.channels_last) {
      const int64_t nv = (q.end - q.begin) / V;
      expect((q.end - q.begin) % V == 0, "piece length a multiple of vec", s, p);
      for (int thread = 0; thread < vae::kGnThreads; ++thread) {
        int64_t count = 0;
        for (int64_t j = thread; j < nv; j += vae::kGnThreads, ++count)
          visit(block, thread, vae::gn_contiguous_offset(q, j, V));
        expect(count * V <= vae::kGnMaxPerThread, "contiguous: elements per thread", s, p);
      }
    } else {
      const int cvec = static_cast<int>(s.channels / V);
      for (int thread = 0; thread < vae::kGnThreads; ++thread) {
        const int tc = thread % p.tc, tr = thread / p.tc;
        if (tr >= p.tr) continue;
        for (int col = tc; col < cvec; col += p.tc) {
          int64_t rows = 0;
          for (int64_t r = q.begin + tr; r < q.end; r += p.tr, ++rows) {
            visit(block, thread, vae::gn_channels_last_offset(s, q, r, col, V));
          }
          expect(rows <= vae::kGnMaxPerThread, "channels-last: rows per thread", s, p);
        }
      }
    }
  }
}

void check(const GnShape& s, int vec, int sms) {
  const GnPlan p = vae::gn_plan(s, vec, sms);
  const int64_t frames = s.batch * s.frames, S = s.positions, C = s.channels;
  expect(p.pieces >= 1 && p.span >= 1 && (s.channels_last || p.span % vec == 0), "pieces and span", s, p);
  expect((p.pieces - 1) * p.span < S && p.pieces * p.span >= S, "pieces cover the positions", s, p);
  expect(p.blocks == frames * (s.channels_last ? 1 : C) * p.pieces, "blocks", s, p);
  if (s.channels_last) {
    expect(p.tc >= 1 && p.tr >= 1 && p.tc * p.tr <= vae::kGnThreads, "thread grid", s, p);
  }

  // Every element once; with vectors, aligned and inside one plane / row.
  const int64_t numel = s.batch * C * s.frames * S;
  std::vector<int> seen(numel, 0);
  walk(s, p, [&](int64_t, int, int64_t o) {
    expect(o >= 0 && o + vec <= numel, "access inside x", s, p);
    if (o < 0 || o + vec > numel) return;
    expect(o % vec == 0, "access aligned", s, p);
    if (s.channels_last) expect(o % C + vec <= C, "vector inside a row", s, p);
    else expect(o % S + vec <= S, "vector inside a plane", s, p);
    for (int e = 0; e < vec; ++e) ++seen[o + e];
  });
  for (int64_t i = 0; i < numel; ++i) expect(seen[i] == 1, "every element visited once", s, p);

  // Workspace pairs: each written once, inside part; a (frame, group)'s pairs contiguous.
  const int64_t part = vae::gn_part_floats(s, p);
  expect(vae::gn_workspace_floats(s, p) == part + frames * s.groups * 2, "workspace size", s, p);
  std::vector<int> written(part / 2, 0);
  const auto write = [&](int64_t index) {
    expect(index >= 0 && index + 2 <= part && index % 2 == 0, "pair inside part", s, p);
    if (index >= 0 && index + 2 <= part) ++written[index / 2];
  };
  for (int64_t block = 0; block < p.blocks; ++block) {
    const GnPiece q = vae::gn_piece(s, p, block);
    if (!s.channels_last) {
      write(vae::gn_part_index(s, p, q.bt, q.c, q.piece));  // thread 0
    } else {
      const int cvec = static_cast<int>(C / vec);
      for (int cb = 0; cb < cvec; cb += p.tc) {
        const int width = std::min(p.tc, cvec - cb) * vec;
        for (int i = 0; i < width; ++i) write(vae::gn_part_index(s, p, q.bt, int64_t{cb} * vec + i, q.piece));
      }
    }
  }
  for (const int w : written) expect(w == 1, "every pair written once", s, p);
  const int64_t Cg = C / s.groups;
  for (int64_t bt = 0; bt < frames; ++bt)
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t first = vae::gn_part_index(s, p, bt, g * Cg, 0);
      for (int64_t i = 0; i < Cg * p.pieces; i += 7) {
        const int64_t got = vae::gn_part_index(s, p, bt, g * Cg + i / p.pieces, i % p.pieces);
        expect(got == first + 2 * i, "a group's pairs are contiguous", s, p);
      }
    }
}

// The single-read forward's plan, where it applies: clusters of at most kGnClusterMaxBlocks
// blocks whose tiles fit the shared-memory budget; walking every (frame-group, rank, vector) as
// gn_cluster_forward_kernel does visits every element of x once, aligned and inside one plane.
void check_cluster(const GnShape& s, int vec, int elem_bytes, int sms) {
  const vae::GnClusterPlan c = vae::gn_cluster_plan(s, vec, elem_bytes, sms);
  const GnPlan none{};
  if (s.channels_last || vec == 1) {
    expect(c.blocks == 0, "cluster: channels-last and unvectorised calls use the three passes", s, none);
    return;
  }
  const int64_t cg = s.channels / s.groups, n = cg * s.positions, S = s.positions;
  if (c.blocks == 0) {  // only when the group does not fit the largest cluster
    expect(vae::gn_ceil_div(n, vae::kGnClusterMaxBlocks) * elem_bytes > vae::kGnClusterSmemBytes / 2,
           "cluster: refused only for large groups", s, none);
    return;
  }
  expect(c.blocks >= 1 && c.blocks <= vae::kGnClusterMaxBlocks, "cluster: size", s, none);
  // A smaller device budget (99 KB: sm_120's opt-in limit) gives a plan within it, or none.
  const vae::GnClusterPlan small = vae::gn_cluster_plan(s, vec, elem_bytes, sms, 99 * 1024);
  expect(small.blocks == 0 || vae::gn_cluster_smem_bytes(s, small, elem_bytes) <= 99 * 1024, "cluster: budget", s,
         none);
  expect(c.span % vec == 0 && (c.blocks - 1) * c.span < n && c.blocks * c.span >= n, "cluster: spans cover the group",
         s, none);
  expect(vae::gn_cluster_smem_bytes(s, c, elem_bytes) <= vae::kGnClusterSmemBytes, "cluster: shared memory", s, none);
  ++cluster_plans;
  const int64_t numel = s.batch * s.channels * s.frames * S;
  std::vector<int> seen(numel, 0);
  for (int64_t fg = 0; fg < s.batch * s.frames * s.groups; ++fg) {
    const int64_t base = vae::gn_cluster_base(s, fg);
    for (int rank = 0; rank < c.blocks; ++rank) {
      const int64_t begin = rank * c.span, end = std::min(begin + c.span, n);
      for (int64_t i = begin; i < end; i += vec) {
        const int64_t o = vae::gn_cluster_offset(s, base, i);
        expect(o >= 0 && o + vec <= numel && o % vec == 0 && o % S + vec <= S, "cluster: access aligned in a plane",
               s, none);
        if (o < 0 || o + vec > numel) continue;
        for (int e = 0; e < vec; ++e) ++seen[o + e];
      }
    }
  }
  for (int64_t i = 0; i < numel; ++i) expect(seen[i] == 1, "cluster: every element visited once", s, none);
}

}  // namespace

int main() {
  // (B, C, T, S, G): C=96 / 32 groups, odd S, S=1, T=1, B=2, one channel per group, odd channels
  // per group (151), more channels than a block's columns (2048 / 4 = 512 > 256; 302 at one
  // element per access), frames longer than a piece (90300 > kGnThreads * kGnMaxPerThread), one
  // row of 6 channels (no vectors: 6 is no multiple of 4); and two that the per-thread bound
  // limits on one SM (140000 positions per plane, 1024 channels x 6000 rows per frame); and
  // three for the single-read cluster plan: groups of 16 and of 256 elements (fewer vectors than
  // a grown cluster has blocks) and 48 frame-groups of 16384.
  const int64_t shapes[][5] = {{2, 96, 3, 63, 32},   {1, 96, 1, 1, 32},     {2, 16, 1, 25, 16},  {1, 8, 2, 4096, 2},
                               {1, 2048, 1, 15, 32}, {1, 302, 2, 30, 2},    {1, 512, 2, 144, 32}, {1, 4, 1, 90300, 2},
                               {2, 6, 2, 15, 3},     {1, 256, 2, 1440, 32}, {3, 12, 1, 7, 4},     {1, 6, 1, 1, 2},
                               {1, 64, 1, 140000, 2}, {1, 1024, 1, 6000, 8}, {1, 4, 1, 16, 4},
                               {1, 8, 2, 64, 2},      {2, 32, 3, 4096, 8}};
  int checked = 0;
  for (const auto& sh : shapes)
    for (const bool channels_last : {false, true})
      for (const int elem_bytes : {2, 4})
        for (const int sms : {1, 132}) {
          const GnShape s = dense(sh[0], sh[1], sh[2], sh[3], sh[4], channels_last);
          const int vec = vae::gn_vector_elements(channels_last, elem_bytes);
          // vectors when the layout allows them (aligned base), and one element per access always
          if (vae::gn_can_vectorize(s, vec, elem_bytes, {uintptr_t{0}, uintptr_t{4096}})) {
            check(s, vec, sms);
            check_cluster(s, vec, elem_bytes, sms);
            ++checked;
          }
          check_cluster(s, 1, elem_bytes, sms);
          check(s, 1, sms);
          ++checked;
          // an address off by one element forbids vectors
          expect(!vae::gn_can_vectorize(s, vec, elem_bytes, {uintptr_t(elem_bytes)}) || vec == 1,
                 "misaligned address refused", s, vae::gn_plan(s, 1, sms));
        }
  expect(cluster_plans > 0, "some shapes take the single-read forward", GnShape{}, GnPlan{});
  std::printf("%s: %d plans checked (%d single-read cluster plans walked), %d failures\n", failures ? "FAIL" : "ok",
              checked, cluster_plans, failures);
  return failures ? 1 : 0;
}
