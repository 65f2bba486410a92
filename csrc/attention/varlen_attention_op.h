// Torch glue for the packed attention on the CPU (varlen_attention_cpu.h): checks naming the
// argument, allocation, registration (included by csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "attention/varlen_attention_cpu.h"

namespace sora_kernels {
namespace attention {

// Offsets the kernel indexes with: int32 CPU, segments + 1 entries, from 0, non-decreasing, to `rows`.
inline void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t segments, int64_t rows) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.device().is_cpu(), name,
              ": expected an int32 CPU vector, got ", cu.scalar_type(), " ", cu.sizes(), " on ", cu.device());
  TORCH_CHECK(cu.size(0) == segments + 1, name, ": expected ", segments + 1, " entries (as cu_seqlens_q), got ",
              cu.size(0));
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0, name, ": expected to start at 0, got ", p[0]);
  for (int64_t b = 0; b < segments; ++b) {
    TORCH_CHECK(p[b + 1] >= p[b], name, ": expected non-decreasing, got ", p[b], " then ", p[b + 1], " at ", b);
  }
  TORCH_CHECK(p[segments] == rows, name, ": expected its last entry to be the row count ", rows, ", got ",
              p[segments]);
}

inline void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), name,
              ": the cpu kernels run float32 CPU tensors, got ", t.scalar_type(), " on ", t.device());
}

// Shapes, dtypes and offsets of q, k, v and the cu_seqlens; returns the segment count.
inline int64_t check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& cu_q, const at::Tensor& cu_k) {
  TORCH_CHECK(q.dim() == 3, "q: expected [Nq, H, D], got ", q.sizes());
  TORCH_CHECK(q.size(2) > 0, "q: expected a head dim of at least 1, got ", q.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(2) == q.size(2), "k: expected [Nk, Hkv, ", q.size(2), "], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "k: expected kv heads dividing the ", q.size(1),
              " query heads, got ", k.size(1));
  check_float_cpu(q, "q");
  check_float_cpu(k, "k");
  check_float_cpu(v, "v");
  TORCH_CHECK(cu_q.dim() == 1 && cu_q.size(0) >= 1, "cu_seqlens_q: expected [segments + 1], got ", cu_q.sizes());
  const int64_t segments = cu_q.size(0) - 1;
  check_cu_seqlens(cu_q, "cu_seqlens_q", segments, q.size(0));
  check_cu_seqlens(cu_k, "cu_seqlens_k", segments, k.size(0));
  return segments;
}

// (out [Nq, H, D], lse float32 [H, Nq])
inline std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v, const at::Tensor& cu_q,
                                                                   const at::Tensor& cu_k, double scale, bool causal) {
  const int64_t segments = check_attention_inputs(q, k, v, cu_q, cu_k);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options());
  varlen_attention_forward_cpu(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                               cq.data_ptr<int32_t>(), ck.data_ptr<int32_t>(), segments, q.size(1), k.size(1),
                               q.size(2), static_cast<float>(scale), causal, out.data_ptr<float>(),
                               lse.data_ptr<float>());
  return {out, lse};
}

// (dq [Nq, H, D], dk [Nk, Hkv, D], dv [Nk, Hkv, D])
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, double scale, bool causal) {
  const int64_t segments = check_attention_inputs(q, k, v, cu_q, cu_k);
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    check_float_cpu(*t, name);
    TORCH_CHECK(t->sizes() == q.sizes(), name, ": expected the shape of q ", q.sizes(), ", got ", t->sizes());
  }
  check_float_cpu(lse, "lse");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), "lse: expected [", q.size(1),
              ", ", q.size(0), "], got ", lse.sizes());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor dc = dout.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  varlen_attention_backward_cpu(dc.data_ptr<float>(), qc.data_ptr<float>(), kc.data_ptr<float>(),
                                vc.data_ptr<float>(), oc.data_ptr<float>(), lc.data_ptr<float>(),
                                cq.data_ptr<int32_t>(), ck.data_ptr<int32_t>(), segments, q.size(1), k.size(1),
                                q.size(2), static_cast<float>(scale), causal, dq.data_ptr<float>(),
                                dk.data_ptr<float>(), dv.data_ptr<float>());
  return {dq, dk, dv};
}

inline void define_varlen_attention(torch::Library& m) {
  // q [Nq, H, D], k / v [Nk, Hkv, D] (H % Hkv == 0), cu_seqlens int32 [B + 1]; causal aligned
  // bottom-right -> (out [Nq, H, D], lse float32 [H, Nq])
  m.def("varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "float scale, bool causal) -> (Tensor, Tensor)");
  // -> (dq, dk, dv)
  m.def("varlen_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale, bool causal) -> (Tensor, Tensor, Tensor)");
}

inline void register_varlen_attention_cpu(torch::Library& m) {
  m.impl("varlen_attention_forward", &varlen_attention_forward);
  m.impl("varlen_attention_backward", &varlen_attention_backward);
}

}  // namespace attention
}  // namespace sora_kernels
