"""Reference variable-length attention: per-segment math, pure PyTorch."""
from __future__ import annotations

import torch


def _segment(q, k, v, rows: slice, keys: slice, group: int, dtype: torch.dtype, softmax_scale: float, causal: bool):
    """One segment's q, k and v [H, L, D] in dtype (k and v repeated over each group of query
    heads), its masked scores [H, Lq, Lk] (fp32 or wider; -inf where causal forbids) and
    probabilities: rows with no keys are a softmax of zeros, then zeroed, so that no NaN
    reaches the gradients."""
    wide = torch.promote_types(dtype, torch.float32)
    qs = q[rows].to(dtype).transpose(0, 1)                                                  # [H, Lq, D]
    ks = k[keys].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)                  # [H, Lk, D]
    vs = v[keys].to(dtype).transpose(0, 1).repeat_interleave(group, dim=0)                  # [H, Lk, D]
    Lq, Lk = qs.shape[1], ks.shape[1]
    scores = (qs @ ks.transpose(1, 2)).to(wide) * softmax_scale                             # [H, Lq, Lk]
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    allowed = (j <= i + (Lk - Lq)) if causal else torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    has_keys = allowed.any(dim=1)                                                             # [Lq]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(torch.where(has_keys[:, None], scores, 0.0), dim=-1) * has_keys[:, None]
    return qs, ks, vs, scores, p


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, softmax_scale: float, causal: bool = False,
                     upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal attention over packed segments, one segment at a time.

    q [Nq, H, D], k and v [Nk, Hkv, D] (H % Hkv == 0); segment b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v.
    Causal is aligned bottom-right: query i of a segment sees keys j <= i + Lk - Lq.
    Math in fp32 or wider (upcast=True; float64 inputs stay float64) or in the inputs' dtype
    (upcast=False: what plain PyTorch computes in low precision, the yardstick of the tests;
    the softmax is in fp32 either way). Differentiable.

    Returns (out [Nq, H, D] in q.dtype, lse fp32 [H, Nq]); a query with no keys gets out 0
    and lse -inf.
    """
    Nq, H, D = q.shape
    group = H // k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    dtype = wide if upcast else q.dtype
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        Lq, Lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if Lq == 0:
            continue
        _, _, vs, scores, p = _segment(q, k, v, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]), group, dtype,
                                       softmax_scale, causal)
        lse = torch.logsumexp(scores, dim=-1).detach()                                        # [H, Lq]
        outs.append((p.to(dtype) @ vs).transpose(0, 1))                                      # [Lq, H, D]
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape), torch.full((H, Nq), float("-inf"), device=q.device)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1).float()


def varlen_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, softmax_scale: float,
                              causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (dq, dk, dv) of varlen_attention's out (upcast) for dout [Nq, H, D], by the
    formulas instead of autograd (so that it runs inside a custom op), per segment in fp32 or
    wider: with P = softmax(S), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K s,
    dK = dS^T Q s, the heads of a group summed into their key head. Keys no query sees get 0."""
    Nq, H, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    wide = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros(x.shape, dtype=wide, device=x.device) for x in (q, k, v))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        Lq, Lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if Lq == 0 or Lk == 0:
            continue
        qs, ks, vs, _, p = _segment(q, k, v, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]), group, wide,
                                    softmax_scale, causal)
        do = dout[cq[b]:cq[b + 1]].to(wide).transpose(0, 1)                                 # [H, Lq, D]
        o = p @ vs
        ds = p * (do @ vs.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq[cq[b]:cq[b + 1]] = (ds @ ks * softmax_scale).transpose(0, 1)
        dk[ck[b]:ck[b + 1]] = (ds.transpose(1, 2) @ qs * softmax_scale).unflatten(0, (Hkv, group)).sum(1) \
            .transpose(0, 1)
        dv[ck[b]:ck[b + 1]] = (p.transpose(1, 2) @ do).unflatten(0, (Hkv, group)).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
