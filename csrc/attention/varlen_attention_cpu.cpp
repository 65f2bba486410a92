#include "attention/varlen_attention_cpu.h"

#include <omp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace sora_kernels {
namespace attention {

namespace {

// n floats, 64-byte aligned (every vector load of the blocks is then aligned: their rows are
// multiples of 16 floats).
struct AlignedBuffer {
  float* p = nullptr;
  int64_t n = 0;
  void reset(int64_t size) {
    operator delete[](p, std::align_val_t(64));
    p = nullptr;
    n = 0;
    p = new (std::align_val_t(64)) float[size];
    n = size;
  }
  ~AlignedBuffer() { operator delete[](p, std::align_val_t(64)); }
};

// A thread's workspace of at least n floats. Up to kKeptFloats (64 MB) it is the thread's own
// buffer, grown on demand and kept across calls (OpenMP's threads persist), so that a call does
// not fault in fresh pages for its packed keys and values (10-40% of the time with megabytes of
// packs); a larger one is this call's alone.
class Workspace {
 public:
  static constexpr int64_t kKeptFloats = int64_t{16} << 20;
  explicit Workspace(int64_t n) {
    static thread_local AlignedBuffer kept;
    AlignedBuffer& buffer = n <= kKeptFloats ? kept : own_;
    if (buffer.n < n) buffer.reset(n);
    p_ = buffer.p;
  }
  float* data() const { return p_; }

 private:
  AlignedBuffer own_;
  float* p_ = nullptr;
};

// Runs body(workspace of `floats`) on every thread of one parallel region (body shares out the
// work: an `omp for`, or counters of its own). A thread that cannot allocate makes every
// thread skip the body, and the call throws std::bad_alloc after the region (an exception may
// not leave it: std::terminate).
template <typename Body>
void parallel_with_workspace(int64_t floats, Body body) {
  bool failed = false;
#pragma omp parallel
  {
    std::unique_ptr<Workspace> workspace;
    try {
      workspace = std::make_unique<Workspace>(floats);
    } catch (const std::bad_alloc&) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp barrier
    bool skip;
#pragma omp atomic read
    skip = failed;
    if (!skip) body(workspace->data());
  }
  if (failed) throw std::bad_alloc();
}

// The blocks for baseline x86-64 and for AVX2 + FMA, picked at run time.
#define SORA_KERNELS_PER_TARGET "attention/varlen_attention_cpu_impl.h"
#include "common/per_target.h"

// Per segment, its first query that sees a key (Lq when none does). With out / lse, the rows
// before it get 0 and -inf.
std::vector<int64_t> first_queries(const int32_t* cu_q, const int32_t* cu_k, int64_t segments, int64_t H, int64_t D,
                                   bool causal, float* out, float* lse) {
  const int64_t Nq = cu_q[segments];
  std::vector<int64_t> first(segments);
  for (int64_t b = 0; b < segments; ++b) {
    const int64_t Lq = cu_q[b + 1] - cu_q[b], Lk = cu_k[b + 1] - cu_k[b];
    first[b] = Lk == 0 ? Lq : (causal && Lq > Lk ? Lq - Lk : 0);
    for (int64_t i = 0; out && i < first[b]; ++i) {
      std::memset(out + (cu_q[b] + i) * H * D, 0, sizeof(float) * H * D);
      for (int64_t h = 0; h < H; ++h) lse[h * Nq + cu_q[b] + i] = -INFINITY;
    }
  }
  return first;
}

}  // namespace

void varlen_attention_forward_cpu(const float* q, const float* k, const float* v, const int32_t* cu_q,
                                  const int32_t* cu_k, int64_t segments, int64_t H, int64_t Hkv, int64_t D,
                                  float scale, bool causal, float* out, float* lse) {
  const std::vector<int64_t> first = first_queries(cu_q, cu_k, segments, H, D, causal, out, lse);
#ifdef SORA_KERNELS_AVX2
  if (cpu_has_avx2_fma()) {
    avx2::forward_all(first, q, k, v, cu_q, cu_k, segments, H, Hkv, D, scale, causal, out, lse);
    return;
  }
#endif
  generic::forward_all(first, q, k, v, cu_q, cu_k, segments, H, Hkv, D, scale, causal, out, lse);
}

void varlen_attention_backward_cpu(const float* dout, const float* q, const float* k, const float* v,
                                   const float* out, const float* lse, const int32_t* cu_q, const int32_t* cu_k,
                                   int64_t segments, int64_t H, int64_t Hkv, int64_t D, float scale, bool causal,
                                   float* dq, float* dk, float* dv) {
  const std::vector<int64_t> first = first_queries(cu_q, cu_k, segments, H, D, causal, nullptr, nullptr);
#ifdef SORA_KERNELS_AVX2
  if (cpu_has_avx2_fma()) {
    avx2::backward_all(first, dout, q, k, v, out, lse, cu_q, cu_k, segments, H, Hkv, D, scale, causal, dq, dk, dv);
    return;
  }
#endif
  generic::backward_all(first, dout, q, k, v, out, lse, cu_q, cu_k, segments, H, Hkv, D, scale, causal, dq, dk, dv);
}

}  // namespace attention
}  // namespace sora_kernels
