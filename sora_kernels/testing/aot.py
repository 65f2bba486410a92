"""Ahead-of-time compile every Triton kernel config for GPUs that are not here.

`python -m sora_kernels.testing.aot [--arch 80 90] [--jobs N] [--kernel NAME]` compiles each config the
launchers can produce to a cubin with triton.compile(ASTSource, GPUTarget), with the
alignment hints the JIT gives 16-aligned tensors (so the code is the code a GPU runs), and
reads its registers, shared memory and spills (the stack frame) with the cuobjdump that
ships with Triton. Prints one JSON object per config and exits 1 if any config spills or
fails (tests/test_triton_aot.py compares the spilling ones with tests/aot_spills.json).
Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

_TYPES = {2: "*i16", 4: "*i32"}


def patchify_jobs(archs: list[int]) -> list[dict]:
    """One job per (config, element size, direction, arch) of patchify_tile_kernel, pt unknown
    and pt == 1."""
    from sora_kernels.ops import pack_patchify as op
    jobs = []
    # Launched as: pack with positions (pack_patchify), pack without (patchify3d), unpack.
    variants = [(True, "*i32"), (True, None), (False, None)]
    for cfg in op.config_space():
        for itemsize in op.WORDS:
            for pack, positions in variants:
                for arch in archs:
                    constexprs = {**cfg, "PACK": pack}
                    signature = {"slots_ptr": "*i64", "tokens_ptr": _TYPES[itemsize],
                                 "positions_ptr": positions or "constexpr", "n_videos": "i32", "search_steps": "i32",
                                 "C": "i32", "pt": "i32", "ph": "i32", "pw": "i32"}
                    if positions is None:
                        constexprs["positions_ptr"] = None
                    jobs.append({"module": "sora_kernels.ops.pack_patchify", "kernel": "patchify_tile_kernel",
                                 "arch": arch, "num_warps": op.NUM_WARPS, "num_stages": 3,
                                 "signature": signature, "constexprs": constexprs})
    return _unit_patches(jobs)


def _attention_signature(fn, dtype: str, constexprs: dict) -> dict:
    """Argument types of a varlen_attention kernel, from its argument names."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_desc"):  # set by the caller (tensordesc<...>)
            signature[name] = None
        elif name in ("lse_ptr", "delta_ptr", "freq_ptr", "dq_acc_ptr"):
            signature[name] = "*fp32"
        elif name.startswith(("cu_", "pos_")):
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype
        elif name in ("scale_log2", "softmax_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _attention_variants(kind: str, cfg, BLOCK_D: int, arch: int) -> list[dict]:
    """The constexprs of the variants the launchers run for one config: causal and not; the
    backward's with rope (dq, dk rotated back as they are stored, approximate sin / cos: bf16)
    and without (no position or frequency pointers); the forward with pointer loads and, on
    sm_90, with TMA descriptors."""
    variants = []
    for causal in (False, True):
        cx = {"CAUSAL": causal, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_D": BLOCK_D, "ALIGN": 16}
        if kind == "fwd":
            variants.append(dict(cx, TMA=False, k_desc=None, v_desc=None))
            if arch >= 90:
                variants.append(dict(cx, TMA=True))
            continue
        if kind != "dq":  # dkdv_dq: with ATOMIC_DQ (DQ_MODE "atomic")
            cx.update(ATOMIC_DQ=kind == "dkdv_dq", **({"dq_acc_ptr": None} if kind == "dkdv" else {}))
        positions = "pos_q_ptr" if kind == "dq" else "pos_k_ptr"
        variants.append(dict(cx, ROPE=True, FAST=True))
        variants.append(dict(cx, ROPE=False, FAST=False, **{positions: None, "freq_ptr": None}))
    return variants


# DiT-XL's heads of 72 (1152 / 16), and heads of 96, are multiples of 8 but not of 16: the JIT
# hints neither the head dim nor the head strides (the row strides, 16 * 72 for XL, are hinted),
# and the kernels' ALIGN 8 tells the compiler they are multiples of 8 (rope3d.aligned);
# at multiples of 16 ALIGN is 16, the DiT's other sizes.
XL_UNALIGNED = ("head_dim", "stride_qh", "stride_kh", "stride_vh")


def _xl_heads(jobs: list[dict], *unaligned: str) -> list[dict]:
    """Each job again as DiT-XL's heads of 72 compile it: the ints `unaligned` (its head dim and
    head strides) without the multiple-of-16 hint, ALIGN 8."""
    return [dict(job, unaligned=list(unaligned), constexprs=dict(job["constexprs"], ALIGN=8)) for job in jobs]


def attention_jobs(archs: list[int]) -> list[dict]:
    """One job per (kernel, config its family's launcher can try, padded head dim, arch,
    variant) of the varlen_attention kernels, bf16; each for GQA / MQA (`group`, the query heads
    per kv head, an unknown int) and for multi-head attention, the DiT's: there the JIT makes
    group == 1 a constant (an int argument equal to 1 is specialised), which folds the kv head
    arithmetic and, in the dk/dv kernel, the loop over a group's heads."""
    from sora_kernels.ops import varlen_attention as op
    kernels = {"fwd": op.attn_fwd_kernel, "dkdv": op.attn_bwd_dkdv_kernel, "dq": op.attn_bwd_dq_kernel,
               "dkdv_dq": op.attn_bwd_dkdv_kernel}
    jobs = []
    for kind, fn in kernels.items():
        for BLOCK_D in op.HEAD_DIM_BLOCKS:
            for arch in archs:
                family = 80 if arch < 90 else 90
                tried = [c for short in (False, True) for c in op.launch_candidates(kind, BLOCK_D, short, family)]
                for cfg in dict.fromkeys(tried):
                    for cx, mha in itertools.product(_attention_variants(kind, cfg, BLOCK_D, arch), (False, True)):
                        cx = dict(cx, group=1) if mha else cx
                        signature = _attention_signature(fn, "bf16", cx)
                        if cx.get("TMA"):
                            signature.update(k_desc=f"tensordesc<bf16[{cfg.BLOCK_N}, {BLOCK_D}]>",
                                             v_desc=f"tensordesc<bf16[{cfg.BLOCK_N}, {BLOCK_D}]>")
                        jobs.append(_job(fn, arch, cfg.num_warps, cfg.num_stages, signature, cx))
                        if mha and BLOCK_D == 128:  # DiT-XL's heads of 72: head dim and head strides unhinted
                            jobs += _xl_heads(jobs[-1:], *XL_UNALIGNED)
    return jobs


def rope_jobs(archs: list[int]) -> list[dict]:
    """The attention's helper kernels in bf16, for every padded head dim: rope3d (forward and
    inverse rotation, approximate and accurate sin / cos: FAST is bf16 / fp16 on a GPU, fp32
    takes the accurate ones; also for one head, multi-query attention's k, where the constant
    folds each element's token and head division, and for DiT-XL's heads of 72) and the
    backward's preprocess (delta = rowsum(out * dout))."""
    from sora_kernels.ops import rope3d as rope
    from sora_kernels.ops import varlen_attention as op
    rotations = []
    for BLOCK_D in op.HEAD_DIM_BLOCKS:
        for inverse in (False, True):
            for fast in (True, False):
                constexprs = {"INVERSE": inverse, "FAST": fast, "BLOCK_ROWS": rope.block_rows(BLOCK_D),
                              "BLOCK_D": BLOCK_D, "ALIGN": 16}
                signature = _pointer_signature(rope.rope3d_kernel, constexprs, set(), "bf16" if fast else "fp32",
                                               {"pos_ptr": "*i32", "freq_ptr": "*fp32"})
                rotations += [_job(rope.rope3d_kernel, arch, 4, 3, signature, constexprs) for arch in archs]
    xl = _xl_heads([job for job in rotations if job["constexprs"]["BLOCK_D"] == 128], "head_dim", "stride_xh")
    jobs = rotations + _unit(rotations, "heads") + xl
    for BLOCK_D in op.HEAD_DIM_BLOCKS:
        constexprs = {"BLOCK_ROWS": 32, "BLOCK_D": BLOCK_D, "ALIGN": 16}
        signature = _pointer_signature(op.attn_bwd_preprocess_kernel, constexprs, set(), "bf16",
                                       {"delta_ptr": "*fp32"})
        preprocess = [_job(op.attn_bwd_preprocess_kernel, arch, 4, 3, signature, constexprs) for arch in archs]
        jobs += preprocess + (_xl_heads(preprocess, "head_dim") if BLOCK_D == 128 else [])
    return jobs


def _job(fn, arch: int, num_warps: int, num_stages: int, signature: dict, constexprs: dict,
         divisible: tuple = ()) -> dict:
    """divisible: integer arguments of this call the JIT sees as multiples of 16, past
    ALIGNED_INTS and stride_* (_alignment_hints)."""
    return {"module": fn.__module__, "kernel": fn.__name__, "arch": arch, "num_warps": num_warps,
            "num_stages": num_stages, "signature": signature, "constexprs": constexprs,
            "divisible": list(divisible)}


def unspecialized(kernel) -> set[str]:
    """The int arguments `kernel` declares do_not_specialize (a JITFunction, or the interpreter's
    InterpretedFunction): the JIT compiles one variant for all their values, neither a constant
    for 1 nor a multiple-of-16 hint (docs/ARCHITECTURE.md, "Integer arguments"); the jobs
    compile them as unknown ints."""
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    arg_names = kernel.arg_names
    return {arg_names[n] if isinstance(n, int) else n for n in names or ()}


def _unit(jobs: list[dict], *names: str) -> list[dict]:
    """Each job again with the int arguments `names` == 1, which the JIT compiles as the
    constant 1 (a variant of its own)."""
    ones = dict.fromkeys(names, 1)
    return [dict(job, signature=dict(job["signature"], **dict.fromkeys(names, "constexpr")),
                 constexprs=dict(job["constexprs"], **ones)) for job in jobs]


def _hinted(jobs: list[dict], *names: str) -> list[dict]:
    """Each job again with the int arguments `names` multiples of 16 (the JIT's hint for the
    usual sizes): they size masks and strides along contiguous rows, whose loads and stores
    vectorise only with the hint; the jobs without it stand for other sizes."""
    return [dict(job, divisible=[*job.get("divisible", ()), *names]) for job in jobs]


def _unit_patches(jobs: list[dict]) -> list[dict]:
    """The jobs, and each again with the patch sizes of the DiT configs as the JIT compiles them
    (their 1s constants): pt == 1, for (1, 2, 2) (the constant folds the temporal index math:
    final_layer under Triton 3.6 spilled 24 bytes with pt unknown, none with pt 1), and
    pt == ph == pw == 1, the mini DiT's (1, 1, 1) (of the patchify copy's configs, those with
    PW_P2 == 1, the ones a pw of 1 selects)."""
    point = [job for job in jobs if job["constexprs"].get("PW_P2", 1) == 1]
    return jobs + _unit(jobs, "pt") + _unit(point, "pt", "ph", "pw")


def _pointer_signature(fn, constexprs: dict, none: set, dtype: str, overrides: dict | None = None) -> dict:
    """Argument types of a kernel from its argument names: *_ptr arguments are pointers (fp32
    for the saved statistics and accumulators, int32 for segment ids, else `dtype`), the rest
    i32 or fp32 (eps); `overrides` (name -> type) for the kernel's own exceptions."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs or name in none:
            signature[name] = "constexpr"
        elif name in ("mean_ptr", "rstd_ptr", "dgate_ptr", "dshift_ptr", "dscale_ptr", "dw_ptr"):
            signature[name] = "*fp32"
        elif name == "seg_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    signature.update({k: v for k, v in (overrides or {}).items() if k in signature})
    return signature


# The dtypes the DiT row kernels and the activations run (their triton_reasons): each compiles
# to other code (fp32 tiles hold twice the bytes of bf16 ones), so each is checked for spills.
DIT_DTYPES = (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"))


def dit_jobs(archs: list[int]) -> list[dict]:
    """One job per (kernel, variant, tile config, dtype, arch) of the DiT row kernels (bf16,
    fp16, fp32): adaln_norm / gated_residual_adaln / rms_norm forward and backward,
    gated_residual, and the activations."""
    import torch

    from sora_kernels.ops import adaln_norm as op
    from sora_kernels.ops import gated_residual as gr
    variants = []  # (kernel, constexprs, arguments passed as None)
    for residual, layer in ((False, True), (False, False), (True, True), (True, False)):
        no_res = set() if residual else {"y_ptr", "gate_ptr", "h_ptr", "dh_ptr", "dy_ptr", "dgate_ptr"}
        no_mean = set() if layer else {"mean_ptr"}
        for fn in (op.adaln_fwd_kernel, op.adaln_bwd_kernel):
            variants.append((fn, {"RESIDUAL": residual, "LAYER": layer}, (no_res | no_mean) & set(fn.arg_names)))
    rms_none = {"y_ptr", "gate_ptr", "h_ptr", "dh_ptr", "dy_ptr", "dgate_ptr", "shift_ptr", "scale_ptr", "seg_ptr",
                "mean_ptr", "dshift_ptr", "dscale_ptr"}
    for fn in (op.adaln_fwd_kernel, op.adaln_bwd_kernel):  # rms_norm: no modulation
        variants.append((fn, {"RESIDUAL": False, "LAYER": False}, rms_none & set(fn.arg_names)))
    for backward in (False, True):
        variants.append((gr.gated_residual_kernel, {"BACKWARD": backward}, set() if backward else {"dgate_ptr"}))
    jobs = []
    for dtype, torch_dtype in DIT_DTYPES:
        dt = getattr(torch, torch_dtype)
        for fn, flags, none in variants:
            gated = fn is gr.gated_residual_kernel
            backward = flags["BACKWARD"] if gated else fn is op.adaln_bwd_kernel
            for cfg in gr.config_space(dt, backward) if gated else op.config_space(backward):
                constexprs = {**flags, **cfg, **{name: None for name in none}}
                warps = (gr.num_warps(cfg["BLOCK_D"], dt, backward) if gated
                         else op.num_warps(cfg["BLOCK_D"], backward, flags["RESIDUAL"], dt))
                signature = _pointer_signature(fn, constexprs, none, dtype)
                jobs += [_job(fn, arch, warps, 3, signature, constexprs) for arch in archs]
    from sora_kernels.ops import activations as act
    activations = []
    for dtype, torch_dtype in DIT_DTYPES:
        for kind in (0, 1):
            for backward in (False, True):
                none = ({"b_ptr", "db_ptr"} if kind == 0 else set()) | (set() if backward else {"db_ptr", "dout_ptr"})
                constexprs = {"KIND": kind, "BACKWARD": backward, "BLOCK": act.BLOCK, **{name: None for name in none}}
                signature = _pointer_signature(act.activation_kernel, constexprs, none, dtype)
                warps = act.num_warps(getattr(torch, torch_dtype))
                activations += [_job(act.activation_kernel, arch, warps, 3, signature, constexprs) for arch in archs]
    return jobs + activations + _hinted(activations, "n")  # n = N * D elements


def patch_embed_jobs(archs: list[int]) -> list[dict]:
    """patch_embed_kernel in bf16 and fp16 (tensor cores) and fp32 (ieee products), with and
    without bias, K (C * pt * ph * pw, the weight's [E, K]) a multiple of 16 and not, for any
    patch and the DiT's (_unit_patches)."""
    from sora_kernels.ops import patch_embed3d as op
    jobs = []
    for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
        cfg = op.config(fp32=dtype == "fp32")
        for bias in (True, False):
            none = set() if bias else {"bias_ptr"}
            constexprs = {"PRECISION": precision, **{k: v for k, v in cfg.items() if k.startswith("BLOCK")},
                          **{name: None for name in none}}
            signature = _pointer_signature(op.patch_embed_kernel, constexprs, none, dtype, {"slots_ptr": "*i64"})
            jobs += [_job(op.patch_embed_kernel, arch, cfg["num_warps"], cfg["num_stages"], signature,
                          constexprs) for arch in archs]
    return _unit_patches(jobs + _hinted(jobs, "K"))


def final_layer_jobs(archs: list[int]) -> list[dict]:
    """final_layer_kernel for every BLOCK_P, LayerNorm and RMSNorm, in bf16 and fp16 (tensor
    cores) and fp32 (ieee products), P (C * pt * ph * pw) a multiple of 16 and not, for any
    patch and the DiT's (_unit_patches)."""
    from sora_kernels.ops import final_layer_unpatchify as op
    jobs = []
    for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
        for layer in (True, False):
            for cfg in op.config_space(fp32=dtype == "fp32"):
                constexprs = {"LAYER": layer, "PRECISION": precision,
                              **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}}
                signature = _pointer_signature(op.final_layer_kernel, constexprs, set(), dtype,
                                               {"slots_ptr": "*i64", "u_ptr": "*fp32", "c_ptr": "*fp32"})
                jobs += [_job(op.final_layer_kernel, arch, cfg["num_warps"], cfg["num_stages"], signature, constexprs)
                         for arch in archs]
    return _unit_patches(jobs + _hinted(jobs, "P"))


# group_norm_silu's two layouts as the JIT compiles them: the launchers pass x contiguous or
# channels-last-3d (_dense), so the position stride ss or the channel stride sc is 1, which the
# JIT makes a constant (an int argument equal to 1 is specialised as constexpr 1); the frame
# sizes of a video autoencoder (H * W, C * H * W, ...) make the other strides and C, S
# multiples of 16. Compiling the strides as unknown ints instead (as before 2026-12-07) checked
# scalar code with 64-bit addresses per element that no call runs.
GN_LAYOUTS = {"contiguous": ({"ss": 1}, ("C", "S", "sb", "sc", "st")),
              "channels_last": ({"sc": 1}, ("C", "S", "sb", "st", "ss"))}


def group_norm_jobs(archs: list[int]) -> list[dict]:
    """The four group_norm_silu kernels for every tile config, in bf16, fp16 and fp32 (the
    video autoencoder's dtypes), with and without SiLU, in both layouts (GN_LAYOUTS)."""
    from sora_kernels.ops import group_norm_silu as op
    kernels = (op.gn_stats_kernel, op.gn_apply_kernel, op.gn_bwd_reduce_kernel, op.gn_bwd_apply_kernel)
    fp32 = {name: "*fp32" for name in ("part_ptr", "group_part_ptr", "chan_part_ptr", "m1_ptr", "m2_ptr", "w_ptr",
                                        "b_ptr")}
    jobs = []
    for fn in kernels:
        # the backward's reduce kernel: with group partials (dx_ptr None) or writing dx (given statistics)
        variants = ({"dx_ptr"}, {"group_part_ptr"}) if fn is op.gn_bwd_reduce_kernel else (set(),)
        for none in variants:
            for silu in ((False, True) if "SILU" in fn.arg_names else (None,)):
                for cfg, (unit, divisible) in itertools.product(op.config_space(), GN_LAYOUTS.values()):
                    constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
                    if silu is not None:
                        constexprs["SILU"] = silu
                    constexprs.update({name: None for name in none}, **unit)
                    for dtype in ("bf16", "fp16", "fp32"):
                        signature = _pointer_signature(fn, constexprs, none, dtype, fp32)
                        jobs += [_job(fn, arch, cfg["num_warps"], 3, signature, constexprs, divisible)
                                 for arch in archs]
    return jobs


# group_norm_moments reads a view of a decoder tile's activation (sora_model/vae_tiling.py), in the
# decoder's layout: contiguous (the width stride sw is 1) or channels-last-3d (the channel stride
# sc is 1). Channels-last strides are multiples of the channel count (16-aligned in a decoder);
# a contiguous tile's row and frame strides are its own width and area, halo included, so they
# get no hint.
GN_MOMENTS_LAYOUTS = {"contiguous": ({"sw": 1}, ()), "channels_last": ({"sc": 1}, ("sb", "st", "sh", "sw"))}


def group_norm_moments_jobs(archs: list[int]) -> list[dict]:
    """group_norm_moments' kernel for every tile config, bf16 and fp32 input, in both layouts
    (GN_MOMENTS_LAYOUTS)."""
    from sora_kernels.ops import group_norm_moments as op
    from sora_kernels.ops.group_norm_silu import config_space
    jobs = []
    for dtype in ("bf16", "fp32"):
        for cfg, (unit, divisible) in itertools.product(config_space(), GN_MOMENTS_LAYOUTS.values()):
            constexprs = {**{k: v for k, v in cfg.items() if k.startswith("BLOCK")}, **unit}
            signature = _pointer_signature(op.gn_moments_kernel, constexprs, set(), dtype, {"part_ptr": "*fp32"})
            jobs += [_job(op.gn_moments_kernel, arch, cfg["num_warps"], 3, signature, constexprs, divisible)
                     for arch in archs]
    return jobs


def frames_jobs(archs: list[int]) -> list[dict]:
    """frames_to_uint8_kernel for every channel block, bf16, fp16 and fp32 input, P (T * H * W
    positions) a multiple of 16 and not."""
    from sora_kernels.ops import frames_to_uint8 as op
    jobs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for constexprs in op.config_space():
            signature = _pointer_signature(op.frames_to_uint8_kernel, constexprs, set(), dtype, {"out_ptr": "*u8"})
            jobs += [_job(op.frames_to_uint8_kernel, arch, 4, 3, signature, constexprs) for arch in archs]
    return jobs + _hinted(jobs, "P")


def latent_denorm_jobs(archs: list[int]) -> list[dict]:
    """latent_denorm_kernel, bf16, fp16 and fp32 latents, S (h * w, a plane) a multiple of 16
    and not."""
    from sora_kernels.ops import latent_denorm as op
    jobs = []
    for dtype in ("bf16", "fp16", "fp32"):
        constexprs = {"BLOCK": op.BLOCK}
        signature = _pointer_signature(op.latent_denorm_kernel, constexprs, set(), dtype,
                                       {"scale_ptr": "*fp32", "shift_ptr": "*fp32", "nan_ptr": "*i32"})
        jobs += [_job(op.latent_denorm_kernel, arch, 4, 3, signature, constexprs) for arch in archs]
    return jobs + _hinted(jobs, "S")


def kernel_jobs(archs: list[int]) -> list[dict]:
    return (patchify_jobs(archs) + attention_jobs(archs) + rope_jobs(archs) + dit_jobs(archs) + patch_embed_jobs(archs)
            + final_layer_jobs(archs) + group_norm_jobs(archs) + group_norm_moments_jobs(archs) + frames_jobs(archs)
            + latent_denorm_jobs(archs))


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# Integer arguments the JIT sees as multiples of 16 in the usual calls (16-aligned row strides,
# the model width D or E = 1152, a head dim of 128): it specializes such values with
# tt.divisibility = 16, as it does 16-byte aligned pointers (every fresh torch allocation).
ALIGNED_INTS = ("D", "E", "head_dim")


def _alignment_hints(fn, signature: dict, divisible=(), unaligned=()) -> dict:
    """The divisibility hints the JIT gives a call with 16-aligned tensors and strides: 16 on
    every pointer and on the stride / width arguments (ALIGNED_INTS, stride_*, `divisible`).
    Without them the compiler cannot vectorise a load (it assumes 1-byte alignment) and the
    register and stack figures are the scalar code's, not the code the GPU runs."""
    ints = hinted_ints(fn, signature, divisible, unaligned)
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature.get(name, "constexpr").startswith("*") or name in ints}


def hinted_ints(fn, signature: dict, divisible=(), unaligned=()) -> set[str]:
    """The int arguments a job compiles as multiples of 16: ALIGNED_INTS, the strides and the
    job's `divisible`, less the job's `unaligned` and those `fn` declares do_not_specialize
    (the JIT gives them no hint)."""
    plain = unspecialized(fn) | set(unaligned)
    return {name for name in fn.arg_names if signature.get(name) == "i32" and name not in plain
            and (name in ALIGNED_INTS or name.startswith("stride") or name in divisible)}


def compile_job(job: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    result = dict(job)
    try:
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"],
                        attrs=_alignment_hints(fn, job["signature"], job.get("divisible", ()),
                                               job.get("unaligned", ())))
        k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                           options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            cuobjdump = _cuobjdump()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([cuobjdump, "--dump-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout if job["module"].endswith("attention") else ""
        fields = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", usage))
        # Spills go to the stack frame (ptxas -v: "N bytes stack frame, N bytes spill stores"),
        # which also holds the PTX's own local arrays (`__local_depot`): a Triton kernel has no
        # calls, and its only local array is libdevice's argument reduction in the accurate
        # sin / cos (28 bytes). The stack frame past those arrays (8-byte aligned) is the spill
        # area (checked against ptxas -v on spilling and non-spilling configs). LOCAL stays 0.
        local_array = sum(int(n) for n in re.findall(r"\.local\s+\.align\s+\d+\s+\.b8\s+__local_depot\d*\[(\d+)\]",
                                                     k.asm["ptx"]))
        spill = max(0, int(fields["STACK"]) - (local_array + 7) // 8 * 8)
        result.update(regs=int(fields["REG"]), spill=spill, local_array=local_array,
                      shared_static=int(fields["SHARED"]), shared=k.metadata.shared, ok=True)
        if sass:  # which matrix instructions the attention kernels use, and where they spill
            result["mma"] = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"
            result["spill_in_loops"] = spill_in_loops(sass) if spill else 0
        if job["kernel"] == "frames_to_uint8_kernel":  # the 1.5 * 2^23 rounding add fused with the product
            result["fma_rounding"] = bool(re.search(r"fma\.rn\.f32\s[^;]*0f4B400000", k.asm["ptx"]))
        if job["arch"] >= 90:
            result["ptx_has_ld_global"] = "ld.global" in k.asm["ptx"]
    except Exception as e:  # report every failure, keep compiling the rest
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    return result


def spill_in_loops(sass: str) -> int:
    """Local loads and stores (STL / LDL) inside a loop of the SASS: between a backward branch
    and its target. Spills outside every loop (values stored in the prologue, loaded in the
    epilogue) cost a few accesses a program; inside the key loop they cost one per step. It
    counts every local access, a local array's too (libdevice's accurate sin / cos reduction
    loops over one): compile_job reports it for kernels that spill."""
    address = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
    instructions = [(int(a, 16), text) for a, text in address.findall(sass)]
    loops = []
    for at, text in instructions:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < at:
            loops.append((int(target.group(1), 16), at))
    return sum(1 for at, text in instructions if re.search(r"\b(STL|LDL)\b", text)
               and any(lo <= at <= hi for lo, hi in loops))


def spill_key(result: dict) -> str:
    """A config's identity in tests/aot_spills.json: kernel, arch, warps, stages, constexprs,
    and the job's own multiple-of-16 ints (`divisible`) and unhinted ones (`unaligned`) where it
    has some."""
    constexprs = dict(sorted(result["constexprs"].items()))  # None: an argument left out (a variant)
    pointers = sorted({t for t in result["signature"].values() if t.startswith("*")})  # the dtypes
    divisible = f" divisible {','.join(sorted(result['divisible']))}" if result.get("divisible") else ""
    unaligned = f" unaligned {','.join(sorted(result['unaligned']))}" if result.get("unaligned") else ""
    return (f"{result['kernel']} sm_{result['arch']} w{result['num_warps']} s{result['num_stages']} "
            f"{','.join(pointers)} {json.dumps(constexprs, sort_keys=True)}{divisible}{unaligned}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernel", default="", help="only the kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile ahead of time", file=sys.stderr)
        return 2
    jobs = [j for j in kernel_jobs(args.arch) if args.kernel in j["kernel"]]
    bad = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, r in enumerate(pool.map(compile_job, jobs, chunksize=4)):
            bad += (not r["ok"]) or r.get("spill", 0) > 0
            print(json.dumps(r), flush=True)
            if (i + 1) % 50 == 0:
                print(f"compiled {i + 1}/{len(jobs)}", file=sys.stderr, flush=True)
    print(f"{len(jobs)} configs, {bad} failed or spilled", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
