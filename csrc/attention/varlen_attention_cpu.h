// Packed variable-length attention on the CPU (fp32, OpenMP), no torch headers.
#pragma once

#include <cstdint>

namespace sora_kernels {
namespace attention {

// out [Nq, H, D] and lse [H, Nq] of softmax(scale q k^T) v within each segment: queries
// [cu_q[b], cu_q[b + 1]) attend to keys [cu_k[b], cu_k[b + 1]) of q [Nq, H, D], k / v
// [Nk, Hkv, D] (query head h reads kv head h / (H / Hkv)). Causal is aligned bottom-right.
// Rows that see no key (an empty key segment; with causal, the first Lq - Lk queries) get
// out 0 and lse -inf. cu_q, cu_k: `segments + 1` offsets, checked by the caller.
void varlen_attention_forward_cpu(const float* q, const float* k, const float* v, const int32_t* cu_q,
                                  const int32_t* cu_k, int64_t segments, int64_t H, int64_t Hkv, int64_t D,
                                  float scale, bool causal, float* out, float* lse);

// dq [Nq, H, D], dk / dv [Nk, Hkv, D] (zeroed by the caller) of the forward above, given its out
// and lse and dout [Nq, H, D]. Recomputes the probabilities with the forward's code.
void varlen_attention_backward_cpu(const float* dout, const float* q, const float* k, const float* v,
                                   const float* out, const float* lse, const int32_t* cu_q, const int32_t* cu_k,
                                   int64_t segments, int64_t H, int64_t Hkv, int64_t D, float scale, bool causal,
                                   float* dq, float* dk, float* dv);

}  // namespace attention
}  // namespace sora_kernels
