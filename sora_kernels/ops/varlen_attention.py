"""varlen_attention: attention over many packed sequences of different lengths, no padding.

Order: Triton kernels (forward, backward preprocess, dk/dv, dq) -> configs and launchers ->
custom ops and autograd (triton, cpu) -> checks -> backends -> public function.

The Triton kernels are FlashAttention-2: each program owns one block of queries (forward,
dq) or keys (dk/dv) of one segment and one head, streams the other side's blocks of the
same segment through an online softmax in fp32, and saves the log-sum-exp for a backward
that recomputes the probabilities. Segments come from cu_seqlens, so a batch of videos of
different sizes runs in one launch with no padding. With rope, the rope3d kernel rotates q
and k once before the attention kernels, and the backward kernels rotate dq and dk back
(ops/rope3d.py rotate_tile) as they store them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakIdKeyDictionary

from sora_kernels import backends as B
from sora_kernels.packed import check_cu_seqlens, check_offsets
from sora_kernels.ops.rope3d import (alignment, block_d, check_positions, check_sections, check_theta, fast_trig,
                                     launch_rope3d, rope3d_cpu, rope_table)
from sora_kernels.reference import attention as ref
from sora_kernels.reference import rope as ref_rope

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

    from sora_kernels.ops.rope3d import aligned, rotate_tile

    try:  # Triton >= 3.4 (host-side TMA descriptors)
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        TensorDescriptor = None
else:
    TensorDescriptor = None

MAX_HEAD_DIM = 256
HEAD_DIM_BLOCKS = (16, 32, 64, 128, 256)  # the padded head dims (block_d) the kernels are compiled for
MAX_GRID_YZ = 65535  # CUDA's limit on the grid's y and z sizes (segments, heads)
LOG2E = 1.4426950408889634

# -----------------------------------------------------------------------------
# Triton kernels
# -----------------------------------------------------------------------------

if B.TRITON_MISSING is None:

    @triton.jit
    def _load_rows(ptr, rows, row_mask, stride_n, head, stride_h, head_dim, BLOCK_D: tl.constexpr):
        """Tile [len(rows), BLOCK_D] of head `head` of tokens `rows` (int64), zeros outside."""
        d = tl.arange(0, BLOCK_D)
        return tl.load(ptr + rows[:, None] * stride_n + head * stride_h + d[None, :],
                       mask=row_mask[:, None] & (d < head_dim)[None, :], other=0.0)

    @triton.jit
    def _store_rows(ptr, x, rows, row_mask, stride_n, head, stride_h, head_dim, BLOCK_D: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        tl.store(ptr + rows[:, None] * stride_n + head * stride_h + d[None, :], x.to(ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (d < head_dim)[None, :])

    @triton.jit
    def _aligned_strides(stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, head_dim,
                         ALIGN: tl.constexpr):
        return (aligned(stride_qn, ALIGN), aligned(stride_qh, ALIGN), aligned(stride_kn, ALIGN),
                aligned(stride_kh, ALIGN), aligned(stride_vn, ALIGN), aligned(stride_vh, ALIGN),
                aligned(head_dim, ALIGN))

    @triton.jit
    def _segment(cu_ptr, seq):
        start = tl.load(cu_ptr + seq)
        return start, tl.load(cu_ptr + seq + 1) - start

    @triton.jit
    def _query_block(q_ptr, m_block, q_start, Lq, head, stride_qn, stride_qh, head_dim,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """(offs_m, row_mask, rows, q): a program's query block, its indices in the segment,
        which exist, their packed rows (int64), and the tile."""
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < Lq
        rows = (q_start + offs_m).to(tl.int64)
        q = _load_rows(q_ptr, rows, row_mask, stride_qn, head, stride_qh, head_dim, BLOCK_D)
        return offs_m, row_mask, rows, q

    @triton.jit
    def _row_stats(lse_ptr, delta_ptr, head, n_q, rows, row_mask):
        """(lse in log2 units, delta) of query rows for the backward; a row with no key (lse
        -inf) or past its segment gets lse +inf, so its probabilities are 0."""
        lse = tl.load(lse_ptr + head.to(tl.int64) * n_q + rows, mask=row_mask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_ptr + head.to(tl.int64) * n_q + rows, mask=row_mask, other=0.0)
        return lse, delta

    @triton.jit
    def _key_mask(cols, Lk, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
        """Which keys of a block exist: cols < Lk, or (a block without a mask, every key in the
        segment) a constant true, which drops a compare and a select per loaded chunk."""
        if MASK:
            return cols < Lk
        return tl.full([BLOCK_N], 1, tl.int1)

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, k_desc, v_desc, k_start, lo, hi, offs_m, Lk, diag,
                   kv_head, stride_kn, stride_kh, stride_vn, stride_vh, head_dim, scale_log2,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        """Online softmax over key blocks lo..hi of one segment; MASK: blocks that need the
        length / causal mask, else every (query, key) pair of the blocks is allowed. TMA: the
        blocks without a mask are loaded through the tensor descriptors k_desc, v_desc ([Nk,
        Hkv * D] views); a block's columns past D are the next head's (or zeros past the last),
        multiplied by q's zero columns in the scores and landing in accumulator columns that
        are never stored."""
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            col_mask = _key_mask(cols, Lk, MASK, BLOCK_N)
            rows = (k_start + cols).to(tl.int64)
            if TMA and not MASK:
                k = k_desc.load([k_start + start_n, kv_head * head_dim])
            else:
                k = _load_rows(k_ptr, rows, col_mask, stride_kn, kv_head, stride_kh, head_dim, BLOCK_D)
            qk = tl.dot(q, tl.trans(k))                 # [BLOCK_M, BLOCK_N], unscaled
            if MASK:
                allowed = col_mask[None, :]
                if CAUSAL:
                    allowed = allowed & (cols[None, :] <= offs_m[:, None] + diag)
                qk = tl.where(allowed, qk, float("-inf"))
            # The scale (log2 units) goes on the row maxima, and on the scores in one fma with
            # the subtraction: one instruction per score less than scaling the tile first.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_use = m_new
            if MASK:  # rows with no key yet: nothing to subtract (unmasked blocks have keys)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk * scale_log2 - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if TMA and not MASK:
                v = v_desc.load([k_start + start_n, kv_head * head_dim])
            else:
                v = _load_rows(v_ptr, rows, col_mask, stride_vn, kv_head, stride_vh, head_dim, BLOCK_D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _key_range(m_block, Lq, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(full, hi, diag) for query block m_block: key blocks [0, full) need no mask,
        [full, hi) need one; query i sees keys j <= i + diag when causal."""
        diag = Lk - Lq
        hi = Lk
        full = (Lk // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(Lk, tl.maximum(0, (m_block + 1) * BLOCK_M + diag))
            full = tl.minimum(full, tl.maximum(0, (m_block * BLOCK_M + diag + 1) // BLOCK_N * BLOCK_N))
        return full, hi, diag

    @triton.jit
    def attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr,   # q [Nq, H, D]; k, v [Nk, Hkv, D]; unit stride along D
        k_desc, v_desc,        # TMA: tensor descriptors of k, v as [Nk, Hkv * D], blocks [BLOCK_N, BLOCK_D]
        out_ptr,               # [Nq, H, D], contiguous
        lse_ptr,               # fp32 [H, Nq]: natural-log log-sum-exp per query (-inf: no keys)
        cu_q_ptr, cu_k_ptr,    # int32 [B+1] segment offsets
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        n_q,                   # Nq (row stride of lse)
        heads, group,          # H, H // Hkv
        head_dim,              # D
        scale_log2,            # softmax_scale * log2(e)
        CAUSAL: tl.constexpr,
        TMA: tl.constexpr,                         # unmasked key blocks through k_desc, v_desc
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ALIGN: tl.constexpr,                       # the head dim and strides are multiples of it (16, 8, 1)
    ):
        """Output and lse of BLOCK_M queries of one segment and one head (program_id: query
        block, segment, head)."""
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, head_dim = _aligned_strides(
            stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, head_dim, ALIGN)
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        q_start, Lq = _segment(cu_q_ptr, seq)
        if m_block * BLOCK_M >= Lq:
            return
        k_start, Lk = _segment(cu_k_ptr, seq)
        kv_head = head // group
        offs_m, row_mask, rows, q = _query_block(q_ptr, m_block, q_start, Lq, head, stride_qn, stride_qh, head_dim,
                                                 BLOCK_M, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        full, hi, diag = _key_range(m_block, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, k_desc, v_desc, k_start, 0, full, offs_m, Lk, diag,
                                   kv_head, stride_kn, stride_kh, stride_vn, stride_vh, head_dim, scale_log2,
                                   False, CAUSAL, TMA, BLOCK_N, BLOCK_D)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, k_desc, v_desc, k_start, full, hi, offs_m, Lk, diag,
                                   kv_head, stride_kn, stride_kh, stride_vn, stride_vh, head_dim, scale_log2,
                                   True, CAUSAL, TMA, BLOCK_N, BLOCK_D)
        empty = l_i == 0.0  # a query with no keys: output 0, lse -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        _store_rows(out_ptr, out, rows, row_mask, heads * head_dim, head, head_dim, head_dim, BLOCK_D)
        tl.store(lse_ptr + head.to(tl.int64) * n_q + rows, lse, mask=row_mask)

    @triton.jit
    def attn_bwd_preprocess_kernel(
        out_ptr, dout_ptr,   # [Nq, H, D] contiguous
        delta_ptr,           # fp32 [H, Nq]: rowsum(out * dout)
        n_rows, heads, head_dim,
        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
        ALIGN: tl.constexpr,  # head_dim is a multiple of it (16, 8, 1)
    ):
        """delta = sum_d out * dout for BLOCK_ROWS (token, head) rows."""
        head_dim = aligned(head_dim, ALIGN)
        r = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        d = tl.arange(0, BLOCK_D)
        mask = (r < n_rows)[:, None] & (d < head_dim)[None, :]
        o = tl.load(out_ptr + r[:, None] * head_dim + d[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + r[:, None] * head_dim + d[None, :], mask=mask, other=0.0).to(tl.float32)
        token = r // heads
        tl.store(delta_ptr + (r % heads) * (n_rows // heads) + token, tl.sum(o * do, 1), mask=r < n_rows)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, cols, k_rows, q_ptr, dout_ptr, lse_ptr, delta_ptr, dq_acc_ptr,
                    q_start, Lq, lo, mask_end, hi, head, stride_qn, stride_qh, n_q, heads, head_dim, diag,
                    scale_log2, MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """dk, dv of one key block summed over query blocks lo..hi (multiples of BLOCK_M, or
        hi = Lq) of one head; MASK (causal): the blocks before mask_end cross the causal
        diagonal and are masked (a branch inside the loop: one inlined copy of it, not two, which
        held more registers: 64 x 128, D=128, sm_90 spilled 320 bytes, now 96). Elsewhere no mask is needed:
        rows past the segment are loaded as zeros with lse +inf (probability 0), and columns
        past it are zero keys and values, so their dk, dv rows (never stored) are the only ones
        they touch. ATOMIC_DQ: also adds each block's unscaled dq = ds k into the fp32 buffer
        dq_acc [Nq, H, D] with atomics."""
        offs_m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        for start_m in range(lo, hi, BLOCK_M):
            qi = start_m + offs_m
            q_mask = qi < Lq
            rows = (q_start + qi).to(tl.int64)
            q = _load_rows(q_ptr, rows, q_mask, stride_qn, head, stride_qh, head_dim, BLOCK_D)
            do = _load_rows(dout_ptr, rows, q_mask, heads * head_dim, head, head_dim, head_dim, BLOCK_D)
            lse, delta = _row_stats(lse_ptr, delta_ptr, head, n_q, rows, q_mask)
            qkT = tl.dot(k, tl.trans(q)) * scale_log2   # [BLOCK_N, BLOCK_M]
            pT = tl.exp2(qkT - lse[None, :])
            if MASK:
                if start_m < mask_end:  # a block on the causal diagonal
                    pT = tl.where(cols[:, None] <= qi[None, :] + diag, pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))
            dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
            dk = tl.dot(dsT, q, dk)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(dsT), k)           # [BLOCK_M, BLOCK_D]
                tl.atomic_add(dq_acc_ptr + rows[:, None] * (heads * head_dim) + head * head_dim + d[None, :], dq,
                              mask=q_mask[:, None] & (d < head_dim)[None, :], sem="relaxed")
        return dk, dv

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["kv_heads"])
    def attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr,  # q, dout [Nq, H, D] (dout contiguous); k, v [Nk, Hkv, D]
        lse_ptr, delta_ptr,             # fp32 [H, Nq]
        dk_ptr, dv_ptr,                 # [Nk, Hkv, D] contiguous
        dq_acc_ptr,                     # fp32 [Nq, H, D] zeros with ATOMIC_DQ, else None
        cu_q_ptr, cu_k_ptr,
        pos_k_ptr, freq_ptr,            # ROPE: int32 [Nk, 3] key positions, fp32 [2, BLOCK_D/2] rope_table
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        n_q, heads, kv_heads, group, head_dim,
        scale_log2, softmax_scale,
        CAUSAL: tl.constexpr,
        ROPE: tl.constexpr,                        # rotate dk back (the kernel sees rotated keys)
        FAST: tl.constexpr,                        # approximate sin / cos (rope3d._sincos)
        ATOMIC_DQ: tl.constexpr,                   # also accumulate dq (DQ_MODE "atomic")
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ALIGN: tl.constexpr,                       # the head dim and strides are multiples of it (16, 8, 1)
    ):
        """dk and dv of BLOCK_N keys of one segment and one kv head, summed over the heads of
        its group and every query block (program_id: key block, segment, kv head); with
        ATOMIC_DQ also every query block's share of dq."""
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, head_dim = _aligned_strides(
            stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, head_dim, ALIGN)
        n_block = tl.program_id(0)
        seq = tl.program_id(1)
        kv_head = tl.program_id(2)
        k_start, Lk = _segment(cu_k_ptr, seq)
        if n_block * BLOCK_N >= Lk:
            return
        q_start, Lq = _segment(cu_q_ptr, seq)
        diag = Lk - Lq
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < Lk
        k_rows = (k_start + cols).to(tl.int64)
        k = _load_rows(k_ptr, k_rows, col_mask, stride_kn, kv_head, stride_kh, head_dim, BLOCK_D)
        v = _load_rows(v_ptr, k_rows, col_mask, stride_vn, kv_head, stride_vh, head_dim, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = 0
        mid = 0  # query blocks [lo, mid) cross the causal diagonal, [mid, Lq) see every key of the block
        if CAUSAL:  # key j is seen by queries i >= j - diag
            lo = tl.maximum(0, n_block * BLOCK_N - diag) // BLOCK_M * BLOCK_M
            last = (n_block + 1) * BLOCK_N - 1 - diag  # the first query that sees the whole block
            mid = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(last, 0), BLOCK_M) * BLOCK_M), Lq)
        for g in range(group):
            head = kv_head * group + g
            dk, dv = _dkdv_inner(dk, dv, k, v, cols, k_rows, q_ptr, dout_ptr, lse_ptr, delta_ptr, dq_acc_ptr,
                                 q_start, Lq, lo, mid, Lq, head, stride_qn, stride_qh, n_q, heads, head_dim, diag,
                                 scale_log2, CAUSAL, ATOMIC_DQ, BLOCK_M, BLOCK_D)
        # the stores' rows again, from a second load of the segment start: kept from the
        # prologue, ptxas spilled them across the loop (64 x 128 at D=128 on sm_90: 32 bytes)
        k_start = tl.load(cu_k_ptr + seq)
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < Lk
        k_rows = (k_start + cols).to(tl.int64)
        # dv first: its registers are free before dk's rotation needs its sin / cos tiles
        _store_rows(dv_ptr, dv, k_rows, col_mask, kv_heads * head_dim, kv_head, head_dim, head_dim, BLOCK_D)
        dk = dk * softmax_scale
        if ROPE:  # gradient of the rotated keys -> gradient of the keys
            dk = rotate_tile(dk, pos_k_ptr, k_rows, col_mask, freq_ptr, True, FAST, BLOCK_D)
        _store_rows(dk_ptr, dk, k_rows, col_mask, kv_heads * head_dim, kv_head, head_dim, head_dim, BLOCK_D)

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, k_start, lo, hi, offs_m, Lk, diag, kv_head,
                  stride_kn, stride_kh, stride_vn, stride_vh, head_dim, scale_log2,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dq of one query block summed over key blocks lo..hi; MASK: blocks that need the length
        / causal mask, else every key of the blocks exists and is seen (loads without a row mask)."""
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            col_mask = _key_mask(cols, Lk, MASK, BLOCK_N)
            k_rows = (k_start + cols).to(tl.int64)
            k = _load_rows(k_ptr, k_rows, col_mask, stride_kn, kv_head, stride_kh, head_dim, BLOCK_D)
            v = _load_rows(v_ptr, k_rows, col_mask, stride_vn, kv_head, stride_vh, head_dim, BLOCK_D)
            qk = tl.dot(q, tl.trans(k)) * scale_log2
            p = tl.exp2(qk - lse[:, None])
            if MASK:
                allowed = col_mask[None, :]
                if CAUSAL:
                    allowed = allowed & (cols[None, :] <= offs_m[:, None] + diag)
                p = tl.where(allowed, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)
        return dq

    @triton.jit
    def attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr,
        dq_ptr,                         # [Nq, H, D] contiguous
        cu_q_ptr, cu_k_ptr,
        pos_q_ptr, freq_ptr,            # ROPE: int32 [Nq, 3] query positions, fp32 [2, BLOCK_D/2] rope_table
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        n_q, heads, group, head_dim,
        scale_log2, softmax_scale,
        CAUSAL: tl.constexpr,
        ROPE: tl.constexpr,                        # rotate dq back (the kernel sees rotated queries)
        FAST: tl.constexpr,                        # approximate sin / cos (rope3d._sincos)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ALIGN: tl.constexpr,                       # the head dim and strides are multiples of it (16, 8, 1)
    ):
        """dq of BLOCK_M queries of one segment and one head (program_id: query block,
        segment, head)."""
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, head_dim = _aligned_strides(
            stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, head_dim, ALIGN)
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        q_start, Lq = _segment(cu_q_ptr, seq)
        if m_block * BLOCK_M >= Lq:
            return
        k_start, Lk = _segment(cu_k_ptr, seq)
        kv_head = head // group
        offs_m, q_mask, rows, q = _query_block(q_ptr, m_block, q_start, Lq, head, stride_qn, stride_qh, head_dim,
                                               BLOCK_M, BLOCK_D)
        do = _load_rows(dout_ptr, rows, q_mask, heads * head_dim, head, head_dim, head_dim, BLOCK_D)
        lse, delta = _row_stats(lse_ptr, delta_ptr, head, n_q, rows, q_mask)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        full, hi, diag = _key_range(m_block, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, k_start, 0, full, offs_m, Lk, diag, kv_head,
                       stride_kn, stride_kh, stride_vn, stride_vh, head_dim, scale_log2, False, CAUSAL,
                       BLOCK_N, BLOCK_D)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, k_start, full, hi, offs_m, Lk, diag, kv_head,
                       stride_kn, stride_kh, stride_vn, stride_vh, head_dim, scale_log2, True, CAUSAL,
                       BLOCK_N, BLOCK_D)
        q_start = tl.load(cu_q_ptr + seq)  # the stores' rows again, as in attn_bwd_dkdv_kernel
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        q_mask = offs_m < Lq
        rows = (q_start + offs_m).to(tl.int64)
        dq = dq * softmax_scale
        if ROPE:
            dq = rotate_tile(dq, pos_q_ptr, rows, q_mask, freq_ptr, True, FAST, BLOCK_D)
        _store_rows(dq_ptr, dq, rows, q_mask, heads * head_dim, head, head_dim, head_dim, BLOCK_D)


# -----------------------------------------------------------------------------
# Configs and launchers
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """One launch config of a kernel: block sizes, warps and software-pipelining stages."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


def _configs(*configs: tuple[int, int, int, int]) -> list[KernelConfig]:
    return [KernelConfig(*c) for c in configs]


# Launch configs per GPU family, kernel and padded head dim, best guess first. Family 80 is
# Ampere / Ada (mma.sync: a dot's second operand sits whole in every warp's registers, so the
# dk/dv kernel's q, q^T, do and do^T tiles cost BLOCK_M * BLOCK_D / 16 registers a thread),
# 90 is Hopper (wgmma reads it from shared memory). Each list holds the configs of the old
# single list (and smaller ones) that compile without spilling registers on that family, in
# the variants the launchers run with rope (testing/aot.py, Triton 3.8, 2026-12-06; the old
# lists' first dk/dv config spilled 5.9 KB a thread on sm_80 at D=128). Listed in
# tests/aot_spills.json: dk/dv 64 x 128 at D=128 on Hopper stays first, because the H200 timed
# it fastest (benchmarks/results/cuda-nvidia-h200.json); for multi-head attention (the DiT's;
# the JIT folds group == 1) it spills 0-8 bytes, for GQA 48-88 under Triton 3.8 and 184-248
# under 3.6 (the GPU machine's), ptxas's reloads around the loop over a group's heads.
# On a GPU the first AUTOTUNE_CANDIDATES are timed once per (kernel, head dim, causal, rope,
# dtype) and the fastest kept, unless SORA_KERNELS_AUTOTUNE=0 (then, and under the
# interpreter, the first). dk/dv with ATOMIC_DQ (DQ_MODE "atomic") also holds a
# [BLOCK_M, BLOCK_D] dq tile: at D=256 every config spilled, so that head dim computes dq
# the "separate" way.
_WIDE = _configs((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3))
_FWD_256 = _configs((64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2))
_DKDV_NARROW = _configs((64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2))
_DQ_NARROW = _configs((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2))
_DKDV_DQ_NARROW = _configs((32, 128, 8, 2), (64, 64, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2))
KERNEL_CONFIGS = {
    80: {
        "fwd": {16: _WIDE, 32: _WIDE, 64: _WIDE,
                128: _configs((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2)), 256: _FWD_256},
        "dkdv": {16: _DKDV_NARROW, 32: _DKDV_NARROW,
                 64: _configs((32, 128, 8, 2), (16, 64, 4, 2), (32, 32, 8, 2), (16, 128, 8, 2)),
                 128: _configs((64, 64, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2)),
                 256: _configs((32, 32, 8, 2))},
        "dq": {16: _DQ_NARROW, 32: _DQ_NARROW, 64: _DQ_NARROW[1:],
               128: _configs((64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2)),
               256: _configs((32, 32, 4, 2), (16, 32, 4, 2))},
        "dkdv_dq": {16: _DKDV_DQ_NARROW,
                    32: _configs((32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)),
                    64: _configs((32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)),
                    128: _configs((16, 64, 8, 2), (16, 32, 4, 2)), 256: []},
    },
    90: {
        "fwd": {16: _WIDE, 32: _WIDE, 64: _WIDE,
                128: _configs((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2)), 256: _FWD_256},
        "dkdv": {16: _DKDV_NARROW, 32: _DKDV_NARROW, 64: _DKDV_NARROW,
                 128: _configs((64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 8, 2)),
                 256: _configs((32, 32, 8, 2), (16, 64, 8, 2))},
        "dq": {16: _DQ_NARROW, 32: _DQ_NARROW, 64: _DQ_NARROW, 128: _DQ_NARROW,
               256: _configs((32, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (16, 32, 4, 2))},
        "dkdv_dq": {16: _DKDV_DQ_NARROW, 32: _DKDV_DQ_NARROW, 64: _DKDV_DQ_NARROW,
                    128: _configs((32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)), 256: []},
    },
}
AUTOTUNE_CANDIDATES = 3
AUTOTUNE_ENV = "SORA_KERNELS_AUTOTUNE"


def config_family(device: torch.device) -> int:
    """The config family of a device: 80 for sm_8x GPUs, 90 for Hopper and newer, and for the
    interpreter (whose choice of config changes no result)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return 80
    return 90


def configs_for(kind: str, BLOCK_D: int, family: int = 90) -> list[KernelConfig]:
    return KERNEL_CONFIGS[family][kind][BLOCK_D]


_TUNED: dict = {}  # (kind, BLOCK_D, causal, [rope,] [tma,] dtype, short_keys, device) -> config


# Key segments up to this long (cross-attention to captions) get their own tuning key and
# candidates with key blocks of at most 64: a 128-key block over a 77-token caption computes 40%
# of its scores for nothing (the H200 ran cross-text at 171 TFLOP/s against torch's
# FlashAttention-2 varlen at 262 with the config tuned on 16k-token segments).
SHORT_KEYS = 512
SHORT_KEY_BLOCK_N = 64


def launch_candidates(kind: str, BLOCK_D: int, short_keys: bool, family: int = 90) -> list[KernelConfig]:
    """The configs `_launch` tries for a kernel, best guess first: with short key segments
    those with BLOCK_N <= SHORT_KEY_BLOCK_N first."""
    candidates = configs_for(kind, BLOCK_D, family)
    if short_keys:
        candidates = [c for c in candidates if c.BLOCK_N <= SHORT_KEY_BLOCK_N] + \
                     [c for c in candidates if c.BLOCK_N > SHORT_KEY_BLOCK_N]
    return candidates[:AUTOTUNE_CANDIDATES]


def _launch(kind: str, kernel, grid_of, args: tuple, key: tuple, constexprs: dict, device: torch.device,
            prepare=None, short_keys: bool = False) -> None:
    """Launches `kernel` with the best config for `key` (`args`: the kernel's arguments, or a
    function of the config that gives them): timed once per key on a GPU (outputs
    are overwritten by every trial; `prepare()`, called before each launch, resets what a launch
    accumulates into), else the first candidate that fits the GPU's shared memory (Triton raises
    OutOfResources before launching one that does not: D=256 with 3 stages needs 256 KiB under
    Triton 3.6, over an H100's 227 KiB). short_keys: every key segment is at most SHORT_KEYS
    long (its own tuning key and candidates)."""
    candidates = launch_candidates(kind, constexprs["BLOCK_D"], short_keys, config_family(device))
    full_key = (kind,) + key + (short_keys, device.index)

    def launch(c: KernelConfig) -> None:
        if prepare is not None:
            prepare()
        kernel[grid_of(c)](*(args(c) if callable(args) else args), **constexprs, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
                           num_warps=c.num_warps, num_stages=c.num_stages)

    cfg = _TUNED.get(full_key)
    if cfg is not None:
        return launch(cfg)
    if device.type != "cuda" or len(candidates) == 1 or os.environ.get(AUTOTUNE_ENV) == "0" \
            or torch.cuda.is_current_stream_capturing():  # timing syncs: not while capturing a graph
        return launch_first_that_fits(kind, key, candidates, launch)
    timings = []
    for c in candidates:
        try:
            timings.append((triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20), c))
        except triton.runtime.errors.OutOfResources:
            continue
    if not timings:
        raise RuntimeError(f"varlen_attention: no {kind} config of {candidates} fits this GPU's resources for {key}")
    _TUNED[full_key] = cfg = min(timings, key=lambda t: t[0])[1]
    launch(cfg)


def launch_first_that_fits(kind: str, key: tuple, candidates: list[KernelConfig], launch) -> KernelConfig:
    """Calls launch(c) for the candidates in order until one does not raise OutOfResources;
    returns that config."""
    for c in candidates:
        try:
            launch(c)
            return c
        except triton.runtime.errors.OutOfResources:
            continue
    raise RuntimeError(f"varlen_attention: no {kind} config of {candidates} fits this GPU's resources for {key}")


@dataclass(frozen=True)
class RopeArgs:
    """What the kernels need to rotate: positions of queries and keys, and the frequencies."""
    positions_q: torch.Tensor
    positions_k: torch.Tensor
    theta: float
    sections: tuple[int, int, int]


# How rope enters the Triton kernels: the rope3d kernel rotates q and k once before the
# attention kernels (the rotated copies are shared by the backward's two kernels), and the
# backward kernels rotate dq and dk back as they store them. Measured on an H200 (bf16, D=128,
# mixed batch; docs/NOTES-attention.md) against no rope: +2% forward, +1.5% forward+backward.
# Rotating tiles inside the kernels as they load cost more and is gone (2026-12-06): each
# program's own tile +9% / +6%, every tile (streamed key blocks once per query block) +95% /
# +63%; and those variants spilled registers where this one does not.

# How the backward computes dq (both compute the same function):
#   "separate": attn_bwd_dq_kernel streams every key block again for each query block: 7 matrix
#               products per (query block, key block) pair with the dk/dv kernel's 4; no
#               atomics, so dq is the same bit for bit from run to run;
#   "atomic":   the dk/dv kernel also adds each pair's dq into an fp32 buffer with atomics
#               (FlashAttention-2's way): 5 products per pair, one pass, but the order of the
#               additions, and so dq's last bits, vary from run to run; "separate" runs
#               instead while torch.use_deterministic_algorithms(True) is set.
# benchmarks/bench_varlen_attention.py (test_dq_modes) times both; "separate" stays the
# default until a GPU measures "atomic". Head dims over 128 always compute dq "separate"
# (KERNEL_CONFIGS has no atomic config there that keeps its tiles in registers).
DQ_MODES = ("separate", "atomic")
DQ_MODE = "separate"

# How the forward loads its key and value blocks:
#   "pointers": tl.load of pointer tiles (cp.async on Ampere and Hopper), every GPU;
#   "tma":      the blocks without a mask through tensor descriptors (Hopper's TMA engine:
#               one instruction per block, no address registers); the masked tail block
#               and query tiles stay pointer loads. Needs sm_90+, the heads of k and v dense
#               in their rows (stride(1) == D) and 16-byte aligned rows; elsewhere the
#               launcher uses "pointers" (tma_reasons says why).
# benchmarks/bench_varlen_attention.py (test_fwd_loads) times both; "pointers" stays the
# default until a GPU has measured "tma".
FWD_LOADS = ("pointers", "tma")
FWD_LOAD = "pointers"


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(2) == 1 else x.contiguous()


@dataclass(frozen=True)
class _RopeLaunch:
    """How the backward kernels see rope: positions, the frequency table and whether sin / cos
    are approximate (all None / False without rope)."""
    positions_q: torch.Tensor | None = None
    positions_k: torch.Tensor | None = None
    table: torch.Tensor | None = None
    FAST: bool = False


def _rope_launch(rope: RopeArgs | None, q: torch.Tensor) -> _RopeLaunch:
    if rope is None:
        return _RopeLaunch()
    return _RopeLaunch(positions_q=rope.positions_q.contiguous(), positions_k=rope.positions_k.contiguous(),
                       table=rope_table(q.shape[2], rope.theta, rope.sections, q.device),
                       FAST=fast_trig(q.dtype, q.device))


def _operands(q: torch.Tensor, k: torch.Tensor, rope: RopeArgs | None, cache: dict):
    """q and k as the kernels read them: rotated by the rope3d kernel with rope (once per call:
    `cache` keeps them for the next kernel of the same call)."""
    if rope is None:
        return q, k
    if "q" not in cache:
        cache["q"] = launch_rope3d(q, rope.positions_q.contiguous(), rope.theta, rope.sections, False)
        cache["k"] = launch_rope3d(k, rope.positions_k.contiguous(), rope.theta, rope.sections, False)
    return cache["q"], cache["k"]


def tma_reasons(k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why the forward cannot load k and v blocks through tensor descriptors (empty: it can)."""
    reasons = []
    if TensorDescriptor is None:
        reasons.append("this Triton has no triton.tools.tensor_descriptor")
    if k.device.type == "cuda" and torch.cuda.get_device_capability(k.device)[0] < 9:
        reasons.append(f"TMA needs sm_90 or newer, {torch.cuda.get_device_name(k.device)} is "
                       f"sm_{''.join(map(str, torch.cuda.get_device_capability(k.device)))}")
    for name, x in (("k", k), ("v", v)):
        if x.stride(1) != x.shape[2] and x.shape[1] > 1:
            reasons.append(f"{name}: heads not dense in a row (stride {tuple(x.stride())})")
        if (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
            reasons.append(f"{name}: rows not 16-byte aligned (stride {x.stride(0)}, address {x.data_ptr()})")
    return reasons


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, BLOCK_N: int, BLOCK_D: int):
    """Tensor descriptors of k and v as [Nk, Hkv * D] with [BLOCK_N, BLOCK_D] blocks."""
    return tuple(TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1], [BLOCK_N, BLOCK_D])
                 for x in (k, v))


def attention_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool,
                      rope: RopeArgs | None):
    """Triton forward: (out [Nq, H, D], lse fp32 [H, Nq])."""
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    Nq, H, D = q.shape
    out = torch.empty((Nq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, Nq), dtype=torch.float32, device=q.device)
    n_seqs = cu_q.shape[0] - 1
    if Nq == 0 or n_seqs == 0 or max_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if FWD_LOAD not in FWD_LOADS:
        raise ValueError(f"FWD_LOAD: expected one of {FWD_LOADS}, got {FWD_LOAD!r}")
    q, k = _operands(q, k, rope, {})
    BLOCK_D = block_d(D)
    tma = FWD_LOAD == "tma" and k.shape[0] > 0 and not tma_reasons(k, v)

    def args(c: KernelConfig) -> tuple:
        descriptors = _kv_descriptors(k, v, c.BLOCK_N, BLOCK_D) if tma else (None, None)
        return (q, k, v, *descriptors, out, lse, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), Nq, H, H // k.shape[1], D, scale * LOG2E)
    constexprs = dict(CAUSAL=causal, TMA=tma, BLOCK_D=BLOCK_D, ALIGN=alignment(D, q, k, v))
    _launch("fwd", attn_fwd_kernel, lambda c: (triton.cdiv(max_q, c.BLOCK_M), n_seqs, H), args,
            (BLOCK_D, causal, tma, q.dtype), constexprs, q.device, short_keys=max_k <= SHORT_KEYS)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool,
                       rope: RopeArgs | None):
    """Triton backward: (dq, dk, dv) like q, k, v."""
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    dout, out = dout.contiguous(), out.contiguous()
    Nq, H, D = q.shape
    Nk, Hkv, _ = k.shape
    dq = torch.empty((Nq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((Nk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((Nk, Hkv, D), dtype=v.dtype, device=v.device)
    n_seqs = cu_q.shape[0] - 1
    if n_seqs == 0 or (Nq == 0 and Nk == 0):
        return dq.zero_(), dk.zero_(), dv.zero_()
    BLOCK_D = block_d(D)
    delta = torch.empty((H, Nq), dtype=torch.float32, device=q.device)
    if Nq > 0:
        attn_bwd_preprocess_kernel[(triton.cdiv(Nq * H, 32),)](out, dout, delta, Nq * H, H, D, BLOCK_ROWS=32,
                                                                 BLOCK_D=BLOCK_D, ALIGN=alignment(D), num_warps=4)
    rotated: dict = {}  # q, k rotated by rope3d, shared by the two kernels
    if DQ_MODE not in DQ_MODES:
        raise ValueError(f"DQ_MODE: expected one of {DQ_MODES}, got {DQ_MODE!r}")
    atomic = (DQ_MODE == "atomic" and Nq > 0 and max_q > 0 and not torch.are_deterministic_algorithms_enabled()
              and bool(configs_for("dkdv_dq", BLOCK_D, config_family(q.device))))  # none at D=256
    dq_acc = torch.zeros((Nq, H, D), dtype=torch.float32, device=q.device) if atomic else None

    def strides(qs, ks):  # of the tensors a kernel reads (rope3d's copies are contiguous)
        return qs.stride(0), qs.stride(1), ks.stride(0), ks.stride(1), v.stride(0), v.stride(1)
    r = _rope_launch(rope, q)
    if Nk > 0 and max_k > 0:
        qs, ks = _operands(q, k, rope, rotated)
        kind = "dkdv_dq" if atomic else "dkdv"
        _launch(kind, attn_bwd_dkdv_kernel, lambda c: (triton.cdiv(max_k, c.BLOCK_N), n_seqs, Hkv),
                (qs, ks, v, dout, lse, delta, dk, dv, dq_acc, cu_q, cu_k, r.positions_k, r.table,
                 *strides(qs, ks), Nq, H, Hkv, H // Hkv, D, scale * LOG2E, scale),
                (BLOCK_D, causal, rope is not None, q.dtype),
                dict(CAUSAL=causal, ROPE=rope is not None, FAST=r.FAST, ATOMIC_DQ=atomic, BLOCK_D=BLOCK_D,
                     ALIGN=alignment(D, qs, ks, v)),
                q.device, prepare=dq_acc.zero_ if atomic else None, short_keys=max_k <= SHORT_KEYS)
    else:
        dk.zero_(), dv.zero_()
    if atomic:  # dq_acc holds ds k summed over key blocks: scale, rotate back, cast
        dq_acc.mul_(scale)
        if rope is not None:
            dq_acc = launch_rope3d(dq_acc, rope.positions_q, rope.theta, rope.sections, True)
        dq.copy_(dq_acc)
    elif Nq > 0 and max_q > 0:
        qs, ks = _operands(q, k, rope, rotated)
        _launch("dq", attn_bwd_dq_kernel, lambda c: (triton.cdiv(max_q, c.BLOCK_M), n_seqs, H),
                (qs, ks, v, dout, lse, delta, dq, cu_q, cu_k, r.positions_q, r.table,
                 *strides(qs, ks), Nq, H, H // Hkv, D, scale * LOG2E, scale),
                (BLOCK_D, causal, rope is not None, q.dtype),
                dict(CAUSAL=causal, ROPE=rope is not None, FAST=r.FAST, BLOCK_D=BLOCK_D, ALIGN=alignment(D, qs, ks, v)),
                q.device, short_keys=max_k <= SHORT_KEYS)
    return dq, dk, dv


# -----------------------------------------------------------------------------
# CPU backend: the C++ kernel, or PyTorch's fused CPU attention one batched call per distinct
# segment shape
# -----------------------------------------------------------------------------

@dataclass
class _Group:
    """Segments of one (Lq, Lk) shape, run as one batch: their query rows (the ones that
    see a key) and key rows, and the mask when causal needs one."""
    n: int                      # segments
    lq: int                     # queries per segment that see a key
    lk: int
    rows_q: torch.Tensor | slice  # int64 [n * lq], or a slice when the rows are consecutive
    rows_k: torch.Tensor | slice
    is_causal: bool             # top-left causal (aten's is_causal) suffices
    mask: torch.Tensor | None   # bool [lq, lk], bottom-right causal with lq < lk


def _segment_shapes(cu_q: torch.Tensor, cu_k: torch.Tensor) -> tuple[list, list, dict[tuple[int, int], list[int]]]:
    """(cu_q, cu_k as lists, {(Lq, Lk): the segments of that shape}) for segments with queries and keys."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    shapes: dict[tuple[int, int], list[int]] = {}
    for b in range(len(cq) - 1):
        Lq, Lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if Lq > 0 and Lk > 0:
            shapes.setdefault((Lq, Lk), []).append(b)
    return cq, ck, shapes


def _cpu_groups(cq: list, ck: list, shapes: dict, causal: bool, device: torch.device) -> list[_Group]:
    groups = []
    for (Lq, Lk), segs in shapes.items():
        skip = Lq - Lk if causal and Lq > Lk else 0  # bottom-right causal: the first queries see no key
        lq = Lq - skip
        mask = None
        if causal and lq < Lk:
            i = torch.arange(lq, device=device)[:, None]
            mask = torch.arange(Lk, device=device)[None, :] <= i + (Lk - lq)
        groups.append(_Group(len(segs), lq, Lk, _rows([(cq[b] + skip, cq[b + 1]) for b in segs], device),
                             _rows([(ck[b], ck[b + 1]) for b in segs], device), causal and mask is None, mask))
    return groups


def _rows(spans: list[tuple[int, int]], device: torch.device) -> torch.Tensor | slice:
    """The rows of `spans`: a slice when they follow each other (equal segments packed in a
    row, the dense case), else an index tensor."""
    if all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return slice(spans[0][0], spans[-1][1])
    return torch.cat([torch.arange(a, b) for a, b in spans]).to(device)


def _take(x: torch.Tensor, rows: torch.Tensor | slice, dim: int = 0) -> torch.Tensor:
    if isinstance(rows, slice):
        return x[rows] if dim == 0 else x[:, rows]
    return x.index_select(dim, rows)


def _put(x: torch.Tensor, rows: torch.Tensor | slice, batch: torch.Tensor) -> None:
    """Writes a batch [n, h, length, D] back to rows of packed x [N, h, D] (one copy)."""
    n, h, length, D = batch.shape
    if isinstance(rows, slice):
        x[rows].view(n, length, h, D).copy_(batch.transpose(1, 2))
    else:
        x.index_copy_(0, rows, batch.transpose(1, 2).reshape(n * length, h, D))


def _put_lse(lse: torch.Tensor, rows: torch.Tensor | slice, batch: torch.Tensor) -> None:
    """Writes a batch [n, H, length] back to columns of lse [H, N]."""
    n, H, length = batch.shape
    if isinstance(rows, slice):
        lse[:, rows].view(H, n, length).copy_(batch.transpose(0, 1))
    else:
        lse.index_copy_(1, rows, batch.transpose(0, 1).reshape(H, n * length).float())


def _whole(rows: torch.Tensor | slice, n_rows: int) -> bool:
    """Whether `rows` are all n_rows rows in order. For a group of every row in order (dense
    segments of one shape) the packed tensor is aten's batch itself: aten's CPU flash attention
    returns [n, heads, length, D] laid out as [n, length, heads, D], the packed rows, so its
    outputs are the results as (contiguous) views, with no copy back; lse, [n, H, length] laid
    out [n, length, H], is copied to the contiguous [H, N] the op's fake promises."""
    return isinstance(rows, slice) and rows.start == 0 and rows.stop == n_rows


def _packed_view(batch: torch.Tensor) -> torch.Tensor:
    """A batch [n, h, length, D] of every row in order as packed rows [n * length, h, D]."""
    return batch.transpose(1, 2).reshape(-1, batch.shape[1], batch.shape[3])


def _covers(groups: list[_Group], n_rows: int) -> bool:
    """Whether the groups write every query row (no row needs its zero / -inf default)."""
    return sum(g.n * g.lq for g in groups) == n_rows


def _gather(x: torch.Tensor, rows: torch.Tensor, n: int, length: int, heads: int) -> torch.Tensor:
    """Rows of packed x [N, h, D] as a batch [n, heads, length, D] (kv heads repeated to
    `heads`); a view when the rows are consecutive and no heads are repeated."""
    y = _take(x, rows).view(n, length, x.shape[1], x.shape[2]).transpose(1, 2)
    return y.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else y


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """aten's CPU flash attention takes an additive mask of the query's dtype."""
    return None if mask is None else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf"))


def _rotated(q, k, rope: RopeArgs | None, inverse: bool = False):
    """q and k rotated by rope (before the cpu engines), or rotated back (their gradients), by
    rope3d's C++ kernel where it runs (float32 math, as the reference's)."""
    if rope is None:
        return q, k
    return (rope3d_cpu(q, rope.positions_q, rope.theta, rope.sections, inverse),
            rope3d_cpu(k, rope.positions_k, rope.theta, rope.sections, inverse))


def _cpu_work_dtype(dtype: torch.dtype) -> torch.dtype:
    # aten's CPU kernels run fp16 about 2x slower than fp32 here (no native fp16 arithmetic)
    # and its fp16 backward is less accurate: half precision is computed in fp32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# The CPU backend has two engines: the C++ kernel (csrc/attention/varlen_attention_cpu.cpp:
# every segment and head in one OpenMP region, blocks of 48 queries x 128 keys, no gathers or
# copies back), and aten's flash-attention CPU kernel, one batched call per segment shape.
# Float32 (and half precision, computed in float32) goes to the C++ kernel when it is built: its
# products run at 78-99 GFLOP/s a core here (docs/NOTES-attention.md), about what aten's
# BLAS-based kernel gets per flop, and it has no per-shape calls (aten's cost about 100 us each
# beyond their work, a third of the time with the cross-attention benchmark's 15 key lengths):
# per call it is 0.97-1.58x aten's engine on the batches measured (D = 32 to 256, causal, GQA).
# A segment's results are then the same bits whatever else is packed with it: each (segment,
# head) is computed by the same blocks in the same order. Float64 goes to aten (the kernel is
# float32), as does everything without sora_kernels._C (or with one built before the kernel
# existed). The backward uses the engine its forward used: it recomputes the scores with the
# forward's own code, bit for bit (mixing the engines made dq 3x less accurate: P = e^(S - lse)
# no longer matched the forward's out).
#
# USE_KERNEL is read by the forward and the backward when they run: the tests set it to run
# aten's engine; change it between steps, not between a forward and its backward.
KERNEL_BUILT = B.compiled_has("varlen_attention_forward", "CPU") and B.compiled_has("varlen_attention_backward", "CPU")
USE_KERNEL = KERNEL_BUILT


def _use_kernel(q: torch.Tensor) -> bool:
    return USE_KERNEL and q.dtype == torch.float32


def cpu_forward(q, k, v, cu_q, cu_k, scale: float, causal: bool, rope: RopeArgs | None):
    """(out, lse) with the C++ kernel or aten's, as _use_kernel chooses."""
    dtype, work = q.dtype, _cpu_work_dtype(q.dtype)
    q, k = _rotated(q, k, rope)
    q, k, v = q.to(work), k.to(work), v.to(work)
    if _use_kernel(q):
        out, lse = torch.ops.sora_kernels.varlen_attention_forward(q, k, v, cu_q, cu_k, scale, causal)
    else:
        cq, ck, shapes = _segment_shapes(cu_q, cu_k)
        out, lse = _aten_forward(q, k, v, _cpu_groups(cq, ck, shapes, causal, q.device), scale)
    return out.to(dtype), lse


def _aten_forward(q, k, v, groups: list[_Group], scale: float):
    """(out, lse): the segments of each group gathered into one batch and run through aten's
    flash-attention CPU kernel."""
    Nq, H, D = q.shape
    whole = len(groups) == 1 and _whole(groups[0].rows_q, Nq)
    if whole:  # aten's outputs are the results (no buffers to fill)
        out = lse = None
    elif _covers(groups, Nq):
        out, lse = q.new_empty((Nq, H, D)), torch.empty((H, Nq), device=q.device)
    else:
        out, lse = q.new_zeros((Nq, H, D)), torch.full((H, Nq), float("-inf"), device=q.device)
    for g in groups:
        o, m = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _gather(q, g.rows_q, g.n, g.lq, H), _gather(k, g.rows_k, g.n, g.lk, H), _gather(v, g.rows_k, g.n, g.lk, H),
            0.0, g.is_causal, attn_mask=_additive(g.mask, q.dtype), scale=scale)     # [n, H, lq, D], [n, H, lq]
        if whole:
            return _packed_view(o), m.transpose(0, 1).reshape(H, Nq).float().contiguous()
        _put(out, g.rows_q, o)
        _put_lse(lse, g.rows_q, m)
    return out, lse


def cpu_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale: float, causal: bool, rope: RopeArgs | None):
    """(dq, dk, dv) with the engine the forward used (_use_kernel)."""
    dtype, work = q.dtype, _cpu_work_dtype(q.dtype)
    q, k = _rotated(q, k, rope)
    q, k, v, dout, out = (x.to(work) for x in (q, k, v, dout, out))
    if _use_kernel(q):
        dq, dk, dv = torch.ops.sora_kernels.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale,
                                                                      causal)
    else:
        cq, ck, shapes = _segment_shapes(cu_q, cu_k)
        dq, dk, dv = _aten_backward(dout, q, k, v, out, lse, _cpu_groups(cq, ck, shapes, causal, q.device), scale)
    dq, dk = _rotated(dq, dk, rope, inverse=True)  # gradients of the rotated q, k -> of q, k
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _aten_backward(dout, q, k, v, out, lse, groups: list[_Group], scale: float):
    """(dq, dk, dv) with aten's flash-attention CPU backward, one batched call per group."""
    Nq, H, D = q.shape
    Hkv = k.shape[1]
    work = q.dtype
    whole = len(groups) == 1 and _whole(groups[0].rows_q, Nq) and _whole(groups[0].rows_k, k.shape[0])
    if not whole:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for g in groups:
        lse_g = _take(lse, g.rows_q, dim=1).view(H, g.n, g.lq).transpose(0, 1).to(work).contiguous()
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _gather(dout, g.rows_q, g.n, g.lq, H), _gather(q, g.rows_q, g.n, g.lq, H),
            _gather(k, g.rows_k, g.n, g.lk, H), _gather(v, g.rows_k, g.n, g.lk, H),
            _gather(out, g.rows_q, g.n, g.lq, H), lse_g, 0.0, g.is_causal, attn_mask=_additive(g.mask, work),
            scale=scale)
        if Hkv != H:  # GQA: the heads of a group share their kv head, so their gradients add up
            gk, gv = (t.view(g.n, Hkv, H // Hkv, g.lk, D).sum(2) for t in (gk, gv))
        if whole:
            dq, dk, dv = _packed_view(gq), _packed_view(gk), _packed_view(gv)
            break
        _put(dq, g.rows_q, gq)
        _put(dk, g.rows_k, gk)
        _put(dv, g.rows_k, gv)
    return dq, dk, dv


# -----------------------------------------------------------------------------
# Custom ops and autograd
# -----------------------------------------------------------------------------

def _rope_of(pos_q, pos_k, theta, sections) -> RopeArgs | None:
    return None if pos_q is None else RopeArgs(pos_q, pos_k, theta, tuple(sections))


@torch.library.custom_op("sora_kernels::varlen_attention_triton", mutates_args=())
def varlen_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                            causal: bool, positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
                            theta: float, sections: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    check_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    return attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                             _rope_of(positions_q, positions_k, theta, sections))


@torch.library.custom_op("sora_kernels::varlen_attention_triton_backward", mutates_args=())
def varlen_attention_triton_backward(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
        softmax_scale: float, causal: bool, positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
        theta: float, sections: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              softmax_scale, causal, _rope_of(positions_q, positions_k, theta, sections))


@torch.library.custom_op("sora_kernels::varlen_attention_cpu", mutates_args=())
def varlen_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                         causal: bool, positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
                         theta: float, sections: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    check_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    return cpu_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                       _rope_of(positions_q, positions_k, theta, sections))


@torch.library.custom_op("sora_kernels::varlen_attention_cpu_backward", mutates_args=())
def varlen_attention_cpu_backward(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
        softmax_scale: float, causal: bool, positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
        theta: float, sections: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpu_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                        _rope_of(positions_q, positions_k, theta, sections))


def _rotate_qk(q, k, positions_q, positions_k, theta, sections, inverse=False):
    """q and k rotated by their tokens' rope3d angles (back, with inverse); unchanged without
    rope."""
    if positions_q is None:
        return q, k
    return (ref_rope.rope3d(q, positions_q, theta, tuple(sections), inverse=inverse),
            ref_rope.rope3d(k, positions_k, theta, tuple(sections), inverse=inverse))


# The reference backend as a custom op too, so that torch.compile(fullgraph=True) takes it (its
# per-segment loop reads cu_seqlens on the host), for example a float32 model on a GPU. The
# backward is the reference's formulas (autograd does not record inside a custom op).
@torch.library.custom_op("sora_kernels::varlen_attention_reference", mutates_args=())
def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                               softmax_scale: float, causal: bool, positions_q: torch.Tensor | None,
                               positions_k: torch.Tensor | None, theta: float,
                               sections: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    check_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    with torch.no_grad():
        q, k = _rotate_qk(q, k, positions_q, positions_k, theta, sections)
        out, lse = ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("sora_kernels::varlen_attention_reference_backward", mutates_args=())
def varlen_attention_reference_backward(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
        softmax_scale: float, causal: bool, positions_q: torch.Tensor | None, positions_k: torch.Tensor | None,
        theta: float, sections: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the attention saw q and k rotated; its dq and dk rotate back
    q, k = _rotate_qk(q, k, positions_q, positions_k, theta, sections)
    dq, dk, dv = ref.varlen_attention_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    dq, dk = _rotate_qk(dq, dk, positions_q, positions_k, theta, sections, inverse=True)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _empty(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor like x: the layout every kernel output has."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                  positions_q, positions_k, theta, sections):
    return _empty(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _fake_backward(dout, q, k, v, out, lse, *rest):
    return _empty(q), _empty(k), _empty(v)


def _register_autograd(forward_op: str, backward_op: str) -> None:
    backward = getattr(torch.ops.sora_kernels, backward_op.split("::")[1])

    def setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, pos_q, pos_k, theta, sections = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, pos_q, pos_k)
        ctx.params = (max_q, max_k, scale, causal, theta, sections)
        ctx.mark_non_differentiable(lse)

    def autograd_backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, pos_q, pos_k = ctx.saved_tensors
        max_q, max_k, scale, causal, theta, sections = ctx.params
        dq, dk, dv = backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, pos_q, pos_k,
                                 theta, sections)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None

    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(backward_op)(_fake_backward)
    torch.library.register_autograd(forward_op, autograd_backward, setup_context=setup)


_register_autograd("sora_kernels::varlen_attention_triton", "sora_kernels::varlen_attention_triton_backward")
_register_autograd("sora_kernels::varlen_attention_cpu", "sora_kernels::varlen_attention_cpu_backward")
_register_autograd("sora_kernels::varlen_attention_reference", "sora_kernels::varlen_attention_reference_backward")


def attention_flops(q: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int,
                    causal: bool) -> int:
    """Matrix-product FLOPs of a forward: 4 D per (query, visible key) pair per head (Q K^T and
    P V). With cu_seqlens that cannot be read (fake tensors under torch.compile) every query
    counts max_seqlen_k keys, an upper bound."""
    Nq, H, D = q.shape
    try:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    except (RuntimeError, NotImplementedError):   # a fake or meta tensor: no values
        return 4 * H * D * Nq * max_seqlen_k
    pairs = 0
    for b in range(len(cq) - 1):
        Lq, Lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if causal:   # bottom-right: query i sees max(0, i + Lk - Lq + 1) keys, the last m = min(Lq, Lk) some
            m = min(Lq, Lk)
            pairs += m * (2 * Lk - m + 1) // 2
        else:
            pairs += Lq * Lk
    return 4 * H * D * pairs


# PyTorch's FLOP counter (torch.utils.flop_counter.FlopCounterMode) sees the attention custom
# ops, not the products inside them: their counts, forward and backward (2.5x: Q K^T again, dV,
# dP, dQ and dK), as for FlashAttention.

@register_flop_formula([torch.ops.sora_kernels.varlen_attention_triton, torch.ops.sora_kernels.varlen_attention_cpu,
                        torch.ops.sora_kernels.varlen_attention_reference], get_raw=True)
def _forward_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, *args,
                   out_val=None, **kwargs) -> int:
    return attention_flops(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, causal)


@register_flop_formula([torch.ops.sora_kernels.varlen_attention_triton_backward,
                        torch.ops.sora_kernels.varlen_attention_cpu_backward,
                        torch.ops.sora_kernels.varlen_attention_reference_backward], get_raw=True)
def _backward_flops(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, *args, out_val=None, **kwargs) -> int:
    return attention_flops(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, causal) * 5 // 2


# -----------------------------------------------------------------------------
# Checks
# -----------------------------------------------------------------------------

# Each cu_seqlens tensor's values as last read, with its version then. A DiT passes the same
# cu_seqlens to every layer, forward and backward, so a GPU copies each one to the host once
# per step instead of once per attention call (each copy waits for the queued kernels).
# Inference tensors have no version counter: they are read every time.
_SEQLENS_READ = WeakIdKeyDictionary()


def _read_seqlens(cu: torch.Tensor) -> list[int]:
    version = None if cu.is_inference() else cu._version
    cached = _SEQLENS_READ.get(cu) if version is not None else None
    if cached is not None and cached[0] == version:
        return cached[1]
    values = cu.tolist()
    if version is not None:
        _SEQLENS_READ[cu] = (version, values)
    return values


def check_seqlens_values(cu_q: torch.Tensor, cu_k: torch.Tensor, n_q: int, n_k: int, max_q: int, max_k: int) -> None:
    """ValueError naming the argument unless both cu_seqlens start at 0, never decrease, end at
    the token count, and max_seqlen covers the longest segment. Reads cu_seqlens on the host:
    one small device-to-host copy on a GPU the first time a tensor (at its version) is seen."""
    for name, cu, n, max_name, max_len in (("cu_seqlens_q", cu_q, n_q, "max_seqlen_q", max_q),
                                           ("cu_seqlens_k", cu_k, n_k, "max_seqlen_k", max_k)):
        lengths = check_offsets(name, _read_seqlens(cu), n)
        longest = max(lengths, default=0)
        if max_len < longest:
            raise ValueError(f"{max_name}: expected at least the longest segment, {longest}, got {max_len}")


def check_inputs(q, k, v, cu_q, cu_k, max_q, max_k) -> None:
    """Shapes, dtypes and devices (no device sync); values are checked by check_seqlens_values."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a 3-dim tensor [N, heads, head_dim], got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} like q, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {x.device}")
        if x.shape[2] != q.shape[2]:
            raise ValueError(f"{name}: expected head_dim {q.shape[2]} like q, got {x.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("q: expected a head_dim of at least 1, got 0")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: expected [Nk, Hkv] = {tuple(k.shape[:2])} like k, got {tuple(v.shape[:2])}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k: expected kv heads dividing the {q.shape[1]} query heads, got {k.shape[1]}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        check_cu_seqlens(name, cu, q.device)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"cu_seqlens_k: expected {cu_q.shape[0]} entries like cu_seqlens_q (one segment of keys "
                         f"per segment of queries), got {cu_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {m!r}")


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

# fp16 and bf16, as FlashAttention. In fp32 the kernels' exp2(s - lse) carries the rounding of
# lse (~5e-7 at lse ~ 5) into every probability, 2-3x PyTorch's fp32 softmax error on dv: fp32
# runs on the cpu and reference backends instead.
TRITON_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reasons(name: str):
    def reasons(q, k, v, cu_q=None, *_):
        out = []
        if name == "triton":
            out += B.device_reasons("triton", q.device, "varlen_attention")
            if q.shape[2] > MAX_HEAD_DIM:
                out.append(f"compiled for head dims <= {MAX_HEAD_DIM}, got {q.shape[2]}")
            if q.dtype not in TRITON_DTYPES:
                out.append(f"runs fp16 and bf16, got {q.dtype}")
            if q.shape[1] > MAX_GRID_YZ:
                out.append(f"launches one program row per head: at most {MAX_GRID_YZ} heads, got {q.shape[1]}")
            if cu_q is not None and cu_q.shape[0] - 1 > MAX_GRID_YZ:
                out.append(f"launches one program column per segment: at most {MAX_GRID_YZ} segments, "
                           f"got {cu_q.shape[0] - 1}")
        elif name == "cpu":  # the C++ kernel when built (float32), else aten's (_use_kernel)
            if q.device.type != "cpu":
                out.append(f"runs on CPU tensors, got {q.device.type}")
            if q.dtype not in CPU_DTYPES:
                out.append(f"runs fp16, bf16, fp32 and fp64, got {q.dtype}")
        return out
    return reasons


def _op_runner(op):
    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, rope):
        # without rope the sections go unused; not [], which AOTInductor in torch 2.11 passes
        # to the op as None (a package of a model with cross-attention then failed to run)
        pos_q, pos_k, theta, sections = (None, None, 10000.0, [0, 0, 0]) if rope is None else \
            (rope.positions_q, rope.positions_k, rope.theta, list(rope.sections))
        return op(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, pos_q, pos_k, theta, sections)
    return run


# Each run returns (out [Nq, H, D], lse fp32 [H, Nq]).
ATTENTION_BACKENDS = (
    B.Backend("triton", _reasons("triton"), _op_runner(varlen_attention_triton)),
    B.Backend("cpu", _reasons("cpu"), _op_runner(varlen_attention_cpu)),
    B.Backend("reference", _reasons("reference"), _op_runner(varlen_attention_reference)),
)


# -----------------------------------------------------------------------------
# Public function
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Rope3D:
    """3D rotary embedding for varlen_attention(rope=...): queries rotate by positions_q,
    keys by positions_k (default positions_q, for self-attention). See rope3d."""
    positions_q: torch.Tensor
    positions_k: torch.Tensor | None = None
    theta: float = 10000.0
    sections: tuple[int, int, int] | None = None


def _rope_record(rope, q, k) -> RopeArgs | None:
    if rope is None:
        return None
    if isinstance(rope, torch.Tensor):
        rope = Rope3D(rope)
    if not isinstance(rope, Rope3D):
        raise ValueError(f"rope: expected None, an int32 positions tensor [N, 3] or a Rope3D, "
                         f"got {type(rope).__name__}")
    pos_k = rope.positions_k if rope.positions_k is not None else rope.positions_q
    check_positions("rope.positions_q", rope.positions_q, q.shape[0], q.device)
    check_positions("rope.positions_k" if rope.positions_k is not None else "rope.positions_q (used for the keys)",
                    pos_k, k.shape[0], k.device)
    return RopeArgs(rope.positions_q, pos_k, check_theta(rope.theta), check_sections(q.shape[2], rope.sections, "q"))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                     softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                     return_attn_probs: bool = False, block_table=None, *, return_lse: bool = False, rope=None,
                     backend: str | None = None):
    """Attention over packed sequences of different lengths (block-diagonal), with no padding.

    Arguments, shapes and semantics follow flash_attn_varlen_func:

    Args:
        q: [Nq, H, D] queries of every segment, one segment after another.
        k, v: [Nk, Hkv, D] keys and values, H % Hkv == 0 (GQA / MQA when Hkv < H).
        cu_seqlens_q, cu_seqlens_k: int32 [B+1] segment offsets (start at 0, non-decreasing,
            end at Nq / Nk). Segment b's queries attend only to segment b's keys: the same
            offsets for self-attention, different ones for cross-attention (video tokens to
            their own sample's text tokens). Zero-length segments are allowed.
        max_seqlen_q, max_seqlen_k: at least the longest segment (they size the GPU grid).
        dropout_p: 0.0 only (attention dropout is not implemented; DiTs train without it).
        softmax_scale: default 1 / sqrt(D).
        causal: mask aligned bottom-right: query i of a segment sees keys j <= i + Lk - Lq.
        window_size, softcap, alibi_slopes: flash_attn_varlen_func's, accepted at their
            defaults only ((-1, -1): no window; 0.0: no soft-capping; None: no ALiBi), so
            its calls run unchanged, positional arguments included.
        deterministic: the backward is deterministic on every backend with the default
            DQ_MODE ("separate"); True is refused while DQ_MODE is "atomic" (under
            torch.use_deterministic_algorithms(True) the backward computes dq "separate").
        return_attn_probs: flash_attn_varlen_func's: returns (out, lse, None) (the third, its
            dropout mask, has no meaning without dropout).
        block_table: flash_attn_varlen_func's paged KV cache, accepted as None only (k and v
            are packed tensors here).
        return_lse: also return the log-sum-exp, fp32 [H, Nq] (natural log).
        rope: None; an int32 positions tensor [Nq, 3] of (t, h, w) (self-attention: keys use
            the same); or a Rope3D(positions_q, positions_k, theta, sections). q and k are
            rotated as rope3d would rotate them (by the rope3d kernel, before the attention
            kernels; the backward kernels rotate dq and dk back as they store them).
        backend: force "triton", "cpu" or "reference" (default: the first that can run;
            SORA_KERNELS_BACKEND sets it too).

    Returns out [Nq, H, D] in q.dtype, or (out, lse) with return_lse, or (out, lse, None) with
    return_attn_probs. A query that sees no key (an empty key segment, or causal with Lq > Lk)
    outputs zeros and lse -inf.
    Differentiable with respect to q, k and v. Equivalent PyTorch, per segment b::

        s = (q_b @ k_b^T) * softmax_scale         # per head, k_b repeated over its group
        out_b = softmax(s masked) @ v_b

    The cu_seqlens values are checked on the host: one small device-to-host copy per call.
    """
    check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: expected 0.0 (attention dropout is not implemented), got {dropout_p!r}")
    check_flash_defaults(window_size, softcap, alibi_slopes, deterministic)
    if block_table is not None:
        raise ValueError(f"block_table: expected None (a paged KV cache is not implemented; k and v are packed), "
                         f"got {type(block_table).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    elif not B.finite_number(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite number or None, got {softmax_scale!r}")
    if not isinstance(causal, int) or causal not in (0, 1):   # a bool, or flash_attn callers' 0 / 1
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    rope = _rope_record(rope, q, k)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), bool(causal), rope)
    out, lse = B.select("varlen_attention", ATTENTION_BACKENDS, args, backend).run(*args)
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def check_flash_defaults(window_size, softcap, alibi_slopes, deterministic) -> None:
    """flash_attn_varlen_func's arguments that varlen_attention takes at their defaults only."""
    if not isinstance(window_size, (tuple, list)) or list(window_size) != [-1, -1]:
        raise ValueError(f"window_size: expected (-1, -1) (no sliding window; local attention is not implemented), "
                         f"got {window_size!r}")
    if softcap != 0.0:
        raise ValueError(f"softcap: expected 0.0 (soft-capping is not implemented), got {softcap!r}")
    if alibi_slopes is not None:
        raise ValueError(f"alibi_slopes: expected None (ALiBi is not implemented), got {type(alibi_slopes).__name__}")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
    if deterministic and DQ_MODE == "atomic":
        raise ValueError("deterministic: True needs DQ_MODE 'separate' (the 'atomic' one adds dq with atomics), "
                         "got DQ_MODE 'atomic'")
