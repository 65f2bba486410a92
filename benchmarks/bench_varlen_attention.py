"""Benchmarks of varlen_attention against what one would use instead.

FLOPs are counted as FlashAttention counts them: forward 4 * sum(Lq * Lk) * H * D (halved
when causal), backward 2.5x the forward, so "fwd+bwd" is 3.5x. The same count is used for
every provider, also for padded SDPA, which does more work than it is credited for: its
TFLOP/s is useful work per second, and the speedup column is over padded SDPA.

Providers (each skipped, with the reason, where it cannot run):
    triton / cpu      ours (sora_kernels.varlen_attention with that backend)
    sdpa_padded       pad every segment to the longest, SDPA with a mask, unpad
    sdpa_loop         SDPA on each segment in a Python loop, then torch.cat
    sdpa_nested       SDPA over a nested jagged tensor
    varlen_attn       torch.nn.attention.varlen.varlen_attn, where this torch has it
    flex_document     FlexAttention (compiled) with a document block mask (on CPU forward only:
                      torch has no FlexAttention backward there)
    flash_attn        flash_attn_varlen_func, when flash-attn is installed
    xformers          xformers memory_efficient_attention with BlockDiagonalMask, when installed

Workloads: dense equal-length segments; a Sora-style mixed batch (one long clip, several
short clips, many images); cross-attention of video tokens to 0..512 text tokens per sample.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import sora_kernels as sk
from sora_kernels.ops import varlen_attention as op
from sora_kernels.reference import attention as ref

PROVIDERS = ["triton", "cpu", "sdpa_padded", "sdpa_loop", "sdpa_nested", "varlen_attn", "flex_document", "flash_attn",
             "xformers"]
MODES = ["fwd", "fwd+bwd"]


# -----------------------------------------------------------------------------
# Workloads
# -----------------------------------------------------------------------------

def _mixed_lengths(device: torch.device) -> list[int]:
    """One long clip, short clips, images of several aspect ratios (tokens after a 8x VAE and
    a 1x2x2 patch): on a GPU a 720p-like clip (16 x 45 x 40 = 28800 tokens), eight 256px clips
    of 16 latent frames (16 x 16 x 16) and 32 images from 8x32 to 16x16 tokens."""
    if device.type == "cuda":
        return [16 * 45 * 40] + [16 * 16 * 16] * 8 + [16 * 16, 8 * 32, 32 * 8, 12 * 20] * 8
    return [4 * 16 * 28] + [4 * 8 * 8] * 4 + [8 * 8, 4 * 16, 16 * 4] * 4


def workloads(device: torch.device) -> dict:
    """name -> (query lengths, key lengths, heads, kv heads, head dim, causal)."""
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        text = torch.randint(0, 513, (64,), generator=gen).tolist()
        return {
            "dense-16k": ([16384] * 4, None, 16, 16, 128, False),
            "dense-128k": ([16384] * 8, None, 16, 16, 128, False),
            "dense-16k-causal": ([16384] * 4, None, 16, 16, 128, True),
            "dense-2k-d64": ([2048] * 32, None, 16, 16, 64, False),
            "dense-16k-d72": ([16384] * 4, None, 16, 16, 72, False),   # DiT-XL's heads (ALIGN 8)
            "mixed": (_mixed_lengths(device), None, 16, 16, 128, False),
            "cross-text": ([1024] * 64, text, 16, 16, 128, False),
        }
    text = torch.randint(0, 129, (16,), generator=gen).tolist()
    return {
        "dense-512": ([512] * 4, None, 4, 4, 64, False),
        "mixed": (_mixed_lengths(device), None, 4, 4, 64, False),
        "cross-text": ([256] * 16, text, 4, 4, 64, False),
    }


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def make_inputs(lens_q, lens_k, heads, kv_heads, head_dim, device, dtype):
    lens_k = lens_k or lens_q
    g = torch.Generator().manual_seed(0)
    cu_q = torch.tensor([0] + list(lens_q)).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + list(lens_k)).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(int(cu_k[-1]), kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(int(cu_k[-1]), kv_heads, head_dim, generator=g).to(device, dtype)
    return q, k, v, cu_q.to(device), cu_k.to(device), max(lens_q), max(lens_k)


def attention_flops(lens_q, lens_k, heads, head_dim, causal, mode) -> int:
    fwd = 4 * sum(a * b for a, b in zip(lens_q, lens_k or lens_q)) * heads * head_dim // (2 if causal else 1)
    return fwd if mode == "fwd" else int(3.5 * fwd)


# -----------------------------------------------------------------------------
# Providers: each returns fn(q, k, v) -> out [Nq, H, D], or raises Unavailable
# -----------------------------------------------------------------------------

class Unavailable(Exception):
    pass


def _ours(backend, cu_q, cu_k, max_q, max_k, causal, device):
    def check():
        if backend == "triton" and device.type == "cpu":
            raise Unavailable("triton on CPU runs only in the interpreter: not a timing")
        q = torch.empty(1, 1, 64, device=device, dtype=_dtype(device))
        reasons = next(b for b in op.ATTENTION_BACKENDS if b.name == backend).reasons(q, q, q)
        if reasons:
            raise Unavailable("; ".join(reasons))
    check()
    return lambda q, k, v: sk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, backend=backend)


def _sdpa_padded(lens_q, lens_k, causal):
    """Pads to [B, H, Lmax, D] (kv heads repeated), masks the padding (and causal), unpads."""
    lens_k = lens_k or lens_q
    B, Lq, Lk = len(lens_q), max(lens_q), max(lens_k)

    def index(lens, L, device):
        return torch.cat([b * L + torch.arange(n) for b, n in enumerate(lens)]).to(device)

    def fn(q, k, v):
        device, H, D = q.device, q.shape[1], q.shape[2]
        iq, ik = index(lens_q, Lq, device), index(lens_k, Lk, device)

        def pad(x, idx, L):
            out = x.new_zeros(B * L, *x.shape[1:]).index_copy(0, idx, x)
            return out.view(B, L, x.shape[1], D).transpose(1, 2).repeat_interleave(H // x.shape[1], dim=1)

        qp, kp, vp = pad(q, iq, Lq), pad(k, ik, Lk), pad(v, ik, Lk)
        valid_k = torch.zeros(B * Lk, dtype=torch.bool, device=device).index_fill(0, ik, True).view(B, 1, 1, Lk)
        mask = valid_k
        if causal:
            lq = torch.tensor(lens_q, device=device).view(B, 1, 1, 1)
            lk = torch.tensor(lens_k, device=device).view(B, 1, 1, 1)
            i = torch.arange(Lq, device=device).view(1, 1, Lq, 1)
            j = torch.arange(Lk, device=device).view(1, 1, 1, Lk)
            mask = mask & (j <= i + (lk - lq))
        o = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
        return o.transpose(1, 2).reshape(B * Lq, H, D).index_select(0, iq)
    return fn


def _sdpa_loop(lens_q, lens_k, causal):
    lens_k = lens_k or lens_q

    def fn(q, k, v):
        outs, sq, sk_ = [], 0, 0
        for lq, lk in zip(lens_q, lens_k):
            qs = q[sq:sq + lq].transpose(0, 1)[None]
            if lk == 0:
                outs.append(torch.zeros_like(q[sq:sq + lq]))
            else:
                ks, vs = (x[sk_:sk_ + lk].transpose(0, 1)[None] for x in (k, v))
                mask = None
                if causal and lq != lk:
                    i = torch.arange(lq, device=q.device)[:, None]
                    mask = torch.arange(lk, device=q.device)[None, :] <= i + (lk - lq)
                o = torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None,
                    enable_gqa=ks.shape[1] != qs.shape[1])
                outs.append(o[0].transpose(0, 1))
            sq, sk_ = sq + lq, sk_ + lk
        return torch.cat(outs)
    return fn


def _sdpa_nested(lens_q, lens_k, causal, device):
    if device.type != "cuda":   # measured 2026-12-07, torch 2.14.1 on this 2-core VM, fp32
        raise Unavailable("SDPA over nested jagged tensors is slow on CPU: here it ran 0.87 s (dense-512) "
                          "and 4-8 s (mixed) a forward (medians), 36x-230x the cpu backend and 14x-210x sdpa_loop, so "
                          "its rows would take minutes")
    if causal or lens_k is not None:
        raise Unavailable("nested jagged SDPA here: non-causal self-attention only")
    offsets = torch.tensor([0] + list(lens_q)).cumsum(0).to(device)

    def fn(q, k, v):
        H = q.shape[1]
        nt = [torch.nested.nested_tensor_from_jagged(x.repeat_interleave(H // x.shape[1], dim=1), offsets)
              .transpose(1, 2) for x in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*nt)
        return o.transpose(1, 2).values()
    return fn


def _varlen_attn(cu_q, cu_k, max_q, max_k, causal):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})")
    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if causal:
        if "is_causal" in params:
            kwargs["is_causal"] = True
        elif "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            raise Unavailable("varlen_attn here has no causal option")

    def fn(q, k, v):
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=True, **kwargs)
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    return fn


def _flex_document(lens_q, lens_k, causal, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"no FlexAttention in torch {torch.__version__} ({e})")
    lens_k = lens_k or lens_q
    doc_q = torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q)).to(device)
    doc_k = torch.repeat_interleave(torch.arange(len(lens_k)), torch.tensor(lens_k)).to(device)
    start_q = (torch.tensor([0] + list(lens_q)).cumsum(0)[:-1]).to(device)[doc_q]
    start_k = (torch.tensor([0] + list(lens_k)).cumsum(0)[:-1]).to(device)[doc_k]
    len_q = torch.tensor(lens_q, device=device)[doc_q]
    len_k = torch.tensor(lens_k, device=device)[doc_k]

    def mask_mod(b, h, qi, ki):
        same = doc_q[qi] == doc_k[ki]
        if causal:
            same = same & ((ki - start_k[ki]) <= (qi - start_q[qi]) + (len_k[ki] - len_q[qi]))
        return same

    block_mask = create_block_mask(mask_mod, None, None, len(doc_q), len(doc_k), device=device, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask,
                 enable_gqa=k.shape[1] != q.shape[1])
        return o[0].transpose(0, 1)
    return fn


def _flash_attn(cu_q, cu_k, max_q, max_k, causal):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise Unavailable(f"flash-attn is not installed ({e})")
    return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)


def _xformers(lens_q, lens_k, causal):
    try:
        from xformers.ops import fmha
    except ImportError as e:
        raise Unavailable(f"xformers is not installed ({e})")
    if causal:
        bias = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(lens_q, lens_k or lens_q)
    else:
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens_q, lens_k or lens_q)

    def fn(q, k, v):
        H = q.shape[1]
        k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    return fn


def provider_fn(provider, lens_q, lens_k, cu_q, cu_k, max_q, max_k, causal, device):
    if provider in ("triton", "cpu"):
        return _ours(provider, cu_q, cu_k, max_q, max_k, causal, device)
    if provider == "sdpa_padded":
        return _sdpa_padded(lens_q, lens_k, causal)
    if provider == "sdpa_loop":
        return _sdpa_loop(lens_q, lens_k, causal)
    if provider == "sdpa_nested":
        return _sdpa_nested(lens_q, lens_k, causal, device)
    if provider == "varlen_attn":
        return _varlen_attn(cu_q, cu_k, max_q, max_k, causal)
    if provider == "flex_document":
        return _flex_document(lens_q, lens_k, causal, device)
    if provider == "flash_attn":
        return _flash_attn(cu_q, cu_k, max_q, max_k, causal)
    if provider == "xformers":
        return _xformers(lens_q, lens_k, causal)
    raise ValueError(provider)


# -----------------------------------------------------------------------------
# Benchmarks
# -----------------------------------------------------------------------------

def _padded_too_big(lens_q, lens_k, heads, head_dim, device) -> str | None:
    """Padded SDPA on the CPU above ~4 GB of padded scores is minutes per call: skip it."""
    B, Lq, Lk = len(lens_q), max(lens_q), max(lens_k or lens_q)
    if device.type == "cpu" and B * heads * Lq * Lk * 4 > 4e9:
        return "padded scores over 4 GB on CPU"
    return None


def _check_against_reference(out, inputs, causal):
    """Spot check that a provider computes this attention: the first segment with at most 4096
    queries and keys, against the reference in fp32."""
    q, k, v, cu_q, cu_k, _, _ = inputs
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if 0 < lq <= 4096 and lk <= 4096:
            cu = [torch.tensor([0, n], device=q.device, dtype=torch.int32) for n in (lq, lk)]
            expected, _ = ref.varlen_attention(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], *cu,
                                               1 / math.sqrt(q.shape[2]), causal)
            err = (out[cq[b]:cq[b + 1]].float() - expected.float()).abs().max().item()
            assert err < 0.05, f"segment {b}: error {err:.3g} against the reference"
            return


def timed_call(fn, q, k, v, out, mode: str):
    """What a mode times: fn(q, k, v), or ("fwd+bwd") it and the gradients of q, k, v."""
    if mode == "fwd":
        return lambda: fn(q, k, v)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, dout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", ["dense-16k", "dense-16k-causal", "dense-128k", "dense-2k-d64", "dense-16k-d72",
                                      "dense-512", "mixed", "cross-text"])
def test_varlen_attention(suite, benchmark, workload, provider, mode):
    all_workloads = workloads(suite.device)
    if workload not in all_workloads:
        pytest.skip(f"workload {workload} is not run on {suite.device.type}")
    lens_q, lens_k, heads, kv_heads, head_dim, causal = all_workloads[workload]
    dtype = _dtype(suite.device)
    if provider == "sdpa_padded":
        reason = _padded_too_big(lens_q, lens_k, heads, head_dim, suite.device)
        if reason:
            pytest.skip(reason)
    if provider == "flex_document" and mode != "fwd" and suite.device.type == "cpu":
        pytest.skip(f"flex_document: FlexAttention has no backward on CPU (torch {torch.__version__})")
    inputs = make_inputs(lens_q, lens_k, heads, kv_heads, head_dim, suite.device, dtype)
    q, k, v, cu_q, cu_k, max_q, max_k = inputs
    try:
        fn = provider_fn(provider, lens_q, lens_k, cu_q, cu_k, max_q, max_k, causal, suite.device)
        out = fn(q, k, v)
    except Unavailable as e:
        pytest.skip(f"{provider}: {e}")
    except (RuntimeError, NotImplementedError, torch.OutOfMemoryError) as e:  # a provider that fails here
        pytest.skip(f"{provider} failed on {workload}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    _check_against_reference(out, inputs, causal)
    run = timed_call(fn, q, k, v, out, mode)
    nbytes = sum(x.numel() * x.element_size() for x in (q, k, v)) + out.numel() * out.element_size()
    suite.run("varlen_attention", mode, provider, workload, run, nbytes, dtype, benchmark,
              flops=attention_flops(lens_q, lens_k, heads, head_dim, causal, mode), segments=len(lens_q),
              tokens=q.shape[0], heads=heads, head_dim=head_dim, causal=causal,
              **({"configs": tuned_configs()} if provider == "triton" else {}))


def tuned_configs() -> dict:
    """The launch config the autotuner kept for each kernel key so far (for the results file)."""
    return {"/".join(map(str, key)): f"M{c.BLOCK_M} N{c.BLOCK_N} w{c.num_warps} s{c.num_stages}"
            for key, c in op._TUNED.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["no-rope", "rope", "rope3d+attention"])
def test_rope_fusion(suite, benchmark, variant, mode):
    """The mixed batch with 3D rope: through rope= (rope3d inside, the gradients rotated back
    in the backward kernels), or rope3d on q and k followed by attention, against attention
    with no rope at all."""
    backend = "triton" if suite.device.type == "cuda" else "cpu"
    lens, _, heads, kv_heads, head_dim, _ = workloads(suite.device)["mixed"]
    dtype = _dtype(suite.device)
    q, k, v, cu, _, max_len, _ = make_inputs(lens, None, heads, kv_heads, head_dim, suite.device, dtype)
    positions = torch.cat([torch.randint(0, 64, (n, 3), dtype=torch.int32) for n in lens]).to(suite.device)
    if variant == "rope":
        fn = lambda q, k, v: sk.varlen_attention(q, k, v, cu, cu, max_len, max_len, rope=positions,  # noqa: E731
                                                 backend=backend)
    elif variant == "rope3d+attention":
        fn = lambda q, k, v: sk.varlen_attention(sk.rope3d(q, positions), sk.rope3d(k, positions), v,  # noqa: E731
                                                 cu, cu, max_len, max_len, backend=backend)
    else:
        fn = lambda q, k, v: sk.varlen_attention(q, k, v, cu, cu, max_len, max_len, backend=backend)  # noqa: E731
    run = timed_call(fn, q, k, v, fn(q, k, v), mode)
    nbytes = 4 * q.numel() * q.element_size()
    suite.run("varlen_attention", mode, f"{backend}:{variant}", "mixed+rope", run, nbytes, dtype, benchmark,
              flops=attention_flops(lens, None, heads, head_dim, False, mode))


def _time_triton_variant(suite, benchmark, workload: str, mode: str, label: str) -> None:
    """Times the Triton backend on `workload` under the launcher setting the caller has patched
    in (DQ_MODE, FWD_LOAD), as provider triton:<label>."""
    lens_q, lens_k, heads, kv_heads, head_dim, causal = workloads(suite.device)[workload]
    dtype = _dtype(suite.device)
    inputs = make_inputs(lens_q, lens_k, heads, kv_heads, head_dim, suite.device, dtype)
    q, k, v, cu_q, cu_k, max_q, max_k = inputs
    if label == "load-tma" and op.tma_reasons(k, v):
        pytest.skip("; ".join(op.tma_reasons(k, v)))
    fn = provider_fn("triton", lens_q, lens_k, cu_q, cu_k, max_q, max_k, causal, suite.device)
    out = fn(q, k, v)
    _check_against_reference(out, inputs, causal)
    run = timed_call(fn, q, k, v, out, mode)
    nbytes = sum(x.numel() * x.element_size() for x in (q, k, v)) + out.numel() * out.element_size()
    suite.run("varlen_attention", mode, f"triton:{label}", workload, run, nbytes, dtype, benchmark,
              flops=attention_flops(lens_q, lens_k, heads, head_dim, causal, mode), segments=len(lens_q),
              tokens=q.shape[0], heads=heads, head_dim=head_dim, causal=causal, configs=tuned_configs())


@pytest.mark.parametrize("dq_mode", op.DQ_MODES)
@pytest.mark.parametrize("workload", ["dense-16k", "dense-16k-causal", "mixed"])
def test_dq_modes(suite, benchmark, workload, dq_mode, monkeypatch):
    """Forward+backward of the Triton backend with each way its backward computes dq
    (varlen_attention.DQ_MODE): a second kernel, or atomics from the dk/dv kernel."""
    if suite.device.type != "cuda":
        pytest.skip("DQ_MODE is the Triton launcher's; the Triton backend is timed on CUDA only")
    monkeypatch.setattr(op, "DQ_MODE", dq_mode)
    _time_triton_variant(suite, benchmark, workload, "fwd+bwd", f"dq-{dq_mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fwd_load", op.FWD_LOADS)
@pytest.mark.parametrize("workload", ["dense-16k", "dense-16k-causal", "mixed"])
def test_fwd_loads(suite, benchmark, workload, fwd_load, mode, monkeypatch):
    """The Triton backend with each way its forward loads key and value blocks
    (varlen_attention.FWD_LOAD): pointer tiles, or TMA tensor descriptors (sm_90+)."""
    if suite.device.type != "cuda":
        pytest.skip("FWD_LOAD is the Triton launcher's; the Triton backend is timed on CUDA only")
    monkeypatch.setattr(op, "FWD_LOAD", fwd_load)
    _time_triton_variant(suite, benchmark, workload, mode, f"load-{fwd_load}")
