// Standalone timing of the CUDA patchify kernels, without Python or torch: for
// tuning tile size and occupancy (build variants with -DSK_PATCHIFY_*=...).
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Icsrc \
//        benchmarks/cuda/bench_patchify_kernel.cu -o bench_patchify_kernel && ./bench_patchify_kernel
// Workloads match benchmarks/harness.py: the mixed batch of 16-channel bf16 latents
// x16, and a batch of 8 clips of 16x13x90x160. Prints GB/s (bytes read + written)
// next to cudaMemcpy device-to-device of the same bytes, and checks the round trip.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <vector>

#include "patchify/patchify_cuda.cu"

using namespace sora_kernels::patchify;

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); std::exit(1); } } while (0)

struct Workload {
  const char* name;
  std::vector<std::array<int64_t, 3>> sizes;
};

static float time_ms(cudaEvent_t a, cudaEvent_t b) { float ms; cudaEventElapsedTime(&ms, a, b); return ms; }

static void run(const Workload& w) {
  const PatchDims dims{16, 1, 2, 2};
  const int64_t es = 2;
  std::vector<int64_t> offsets;
  int64_t total = 0, N = 0;
  for (auto& s : w.sizes) { offsets.push_back(total); total += dims.C * s[0] * s[1] * s[2]; }
  unsigned short *video, *back, *tokens;
  CHECK(cudaMalloc(&video, total * es));
  CHECK(cudaMalloc(&back, total * es));
  CHECK(cudaMalloc(&tokens, total * es));
  std::vector<unsigned short> host(total);
  for (int64_t i = 0; i < total; ++i) host[i] = static_cast<unsigned short>(i * 2654435761u >> 7);
  CHECK(cudaMemcpy(video, host.data(), total * es, cudaMemcpyHostToDevice));

  auto slots_for = [&](unsigned short* base) {
    std::vector<VideoSlot> slots;
    int64_t tok = 0;
    for (size_t v = 0; v < w.sizes.size(); ++v) {
      auto& s = w.sizes[v];
      slots.push_back({reinterpret_cast<int64_t>(base + offsets[v]), s[0], s[1], s[2], tok, 0, 1, 1});
      tok += (s[0] / dims.pt) * (s[1] / dims.ph) * (s[2] / dims.pw);
    }
    N = tok;
    return slots;
  };
  struct Launch { VideoSlot* d_slots; int64_t n, tiles; PatchDims p; CudaPlan plan; };
  auto prepare = [&](unsigned short* base) {  // plan the tiles and upload the slot table
    std::vector<VideoSlot> slots = slots_for(base);
    int64_t align = 16;
    for (auto& s : slots) align = std::min({align, pow2_divisor(s.data), pow2_divisor(s.W * es)});
    Launch l{nullptr, static_cast<int64_t>(slots.size()), 0, dims, plan_cuda(dims, es, align)};
    l.tiles = assign_cuda_tiles(slots.data(), l.n, l.p, es, l.plan);
    CHECK(cudaMalloc(&l.d_slots, slots.size() * sizeof(VideoSlot)));
    CHECK(cudaMemcpy(l.d_slots, slots.data(), slots.size() * sizeof(VideoSlot), cudaMemcpyHostToDevice));
    return l;
  };
  auto launch = [&](bool pack, const Launch& l) {
    CHECK(static_cast<cudaError_t>(
        launch_patchify_copy_cuda(pack, l.d_slots, l.n, l.tiles, l.p, l.plan, tokens, nullptr, nullptr)));
  };
  float pack_ms = 0, unpack_ms = 0, copy_ms = 0;
  const int reps = 50;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int pack = 1; pack >= 0; --pack) {
    const Launch l = prepare(pack ? video : back);
    std::vector<float> times;
    for (int r = 0; r < reps + 5; ++r) {
      cudaEventRecord(a);
      launch(pack, l);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      if (r >= 5) times.push_back(time_ms(a, b));
    }
    std::sort(times.begin(), times.end());
    (pack ? pack_ms : unpack_ms) = times[times.size() / 2];
    if (pack) std::printf("  plan: unit %lld B, vec %lld, max tile tokens %lld, smem %lld B, %lld tiles\n",
                          (long long)l.plan.unit_bytes, (long long)l.plan.vec, (long long)l.plan.max_tile_tokens,
                          (long long)l.plan.smem_bytes, (long long)l.tiles);
    cudaFree(l.d_slots);
  }
  std::vector<float> times;
  for (int r = 0; r < reps + 5; ++r) {
    cudaEventRecord(a);
    CHECK(cudaMemcpyAsync(back, video, total * es, cudaMemcpyDeviceToDevice));
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    if (r >= 5) times.push_back(time_ms(a, b));
  }
  std::sort(times.begin(), times.end());
  copy_ms = times[times.size() / 2];
  // Round trip check: pack then unpack into `back`.
  CHECK(cudaMemset(back, 0xff, total * es));
  for (int pack = 1; pack >= 0; --pack) {
    const Launch l = prepare(pack ? video : back);
    launch(pack, l);
    CHECK(cudaDeviceSynchronize());
    cudaFree(l.d_slots);
  }
  std::vector<unsigned short> got(total);
  CHECK(cudaMemcpy(got.data(), back, total * es, cudaMemcpyDeviceToHost));
  const bool ok = std::memcmp(got.data(), host.data(), total * es) == 0;
  const double gb = 2.0 * total * es / 1e9;
  std::printf("  %-10s %7.1f MB  pack %.4f ms %6.0f GB/s (%3.0f%% of memcpy) | unpack %.4f ms %6.0f GB/s (%3.0f%%) | "
              "memcpy %6.0f GB/s | round trip %s\n", w.name, total * es / 1e6, pack_ms, gb / pack_ms * 1e3,
              100 * copy_ms / pack_ms, unpack_ms, gb / unpack_ms * 1e3, 100 * copy_ms / unpack_ms,
              gb / copy_ms * 1e3, ok ? "ok" : "WRONG");
  cudaFree(video); cudaFree(back); cudaFree(tokens);
}

int main() {
  std::printf("threads %d, min blocks %d, tile bytes %lld\n", SK_PATCHIFY_THREADS, SK_PATCHIFY_MIN_BLOCKS,
              (long long)SK_PATCHIFY_TILE_BYTES);
  Workload mixed{"mixed_x16", {}};
  for (int r = 0; r < 16; ++r) {
    mixed.sizes.push_back({13, 90, 160});
    for (int i = 0; i < 4; ++i) mixed.sizes.push_back({5, 32, 32});
    for (auto s : std::vector<std::array<int64_t, 3>>{{1, 64, 64}, {1, 48, 80}, {1, 80, 48}, {1, 32, 96}, {1, 96, 32}})
      mixed.sizes.push_back(s);
  }
  Workload clips{"clips_x8", std::vector<std::array<int64_t, 3>>(8, {13, 90, 160})};
  run(mixed);
  run(clips);
  return 0;
}
