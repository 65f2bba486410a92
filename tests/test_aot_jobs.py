"""The ahead-of-time jobs (sora_kernels/testing/aot.py) are the variants the JIT compiles for
real launches: each launch, recorded from the public ops, must have the constants (its int
arguments equal to 1) and the multiple-of-16 hints on the ints that address rows of some job.
Cheap (no compilation), so it also runs on a GPU, against the real JIT (benchmarks/
gpu_session.sh), where tests/test_triton_aot.py's compilation is left out."""
import pytest

from sora_kernels import backends as B

pytestmark = pytest.mark.skipif(B.TRITON_MISSING is not None, reason="triton is not installed")


# Per kernel, the int arguments that size or stride its contiguous rows: with the JIT's
# multiple-of-16 hint their loads and stores vectorise, so a job must have the hint a call gets.
_GN = ("C", "S", "sb", "sc", "st", "ss")
_ATTENTION = ("stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh", "head_dim")
ADDRESSING = {"activation_kernel": ("n",), "patch_embed_kernel": ("E", "K"), "final_layer_kernel": ("D", "P"),
              "latent_denorm_kernel": ("S",), "frames_to_uint8_kernel": ("P",), "adaln_fwd_kernel": ("D",),
              "adaln_bwd_kernel": ("D",), "gated_residual_kernel": ("D",), "gn_stats_kernel": _GN,
              "gn_apply_kernel": _GN, "gn_bwd_reduce_kernel": _GN, "gn_bwd_apply_kernel": _GN,
              "rope3d_kernel": ("stride_xn", "stride_xh", "head_dim"), "attn_bwd_preprocess_kernel": ("head_dim",),
              "attn_fwd_kernel": _ATTENTION, "attn_bwd_dkdv_kernel": _ATTENTION, "attn_bwd_dq_kernel": _ATTENTION}


class _Launches:
    """Stands in for a Triton kernel in its module: records each launch's arguments by name,
    then launches the kernel."""

    def __init__(self, kernel, record: list):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record.append((self.kernel.fn.__name__, {**dict(zip(self.kernel.arg_names, args)), **kwargs}))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_jobs_are_the_jits_variants(layout, device, monkeypatch):
    """The JIT compiles an int argument equal to 1 as a constant and marks multiples of 16; the
    ahead-of-time jobs of group_norm_silu's kernels must be that variant for the strides and
    sizes that address memory (C, S, sb, sc, st, ss), as the launchers pass them for a decoder
    activation in each layout (forward and backward), or the spill check reads code no call
    runs."""
    import torch

    import sora_kernels as sk
    from sora_kernels.ops import group_norm_silu as op
    from sora_kernels.testing.aot import group_norm_jobs
    addressing = _GN
    jobs = {}
    for job in group_norm_jobs([90]):
        ones = {k for k in addressing if job["constexprs"].get(k) == 1}
        jobs.setdefault(job["kernel"], set()).add((frozenset(ones), frozenset(job["divisible"])))
    launches = []
    for name in ("gn_stats_kernel", "gn_apply_kernel", "gn_bwd_reduce_kernel", "gn_bwd_apply_kernel"):
        monkeypatch.setattr(op, name, _Launches(getattr(op, name), launches))
    x = torch.randn(1, 64, 2, 8, 16, device=device)  # C, H * W and every stride multiples of 16
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    weight = torch.ones(64, device=device, requires_grad=True)
    bias = torch.zeros(64, device=device)
    sk.group_norm_silu(x.requires_grad_(), 16, weight, bias, eps=1e-5, backend="triton").sum().backward()
    assert {name for name, _ in launches} == {"gn_stats_kernel", "gn_apply_kernel", "gn_bwd_reduce_kernel",
                                               "gn_bwd_apply_kernel"}
    for name, args in launches:
        ones = frozenset(k for k in addressing if args[k] == 1)
        divisible = frozenset(k for k in addressing if args[k] != 1 and args[k] % 16 == 0)
        assert (ones, divisible) in jobs[name], (name, layout, sorted(ones), sorted(divisible), jobs[name])


def test_launches_compile_as_the_jobs_compile_them(device, monkeypatch):
    """The JIT makes an int argument equal to 1 a constant (a variant of its own) and hints
    multiples of 16. Launches of every kernel with the DiT's sizes (multiples of 16; patches
    (1, 2, 2) and the mini DiT's (1, 1, 1) with 4 channels, whose K and P are not; DiT-XL's
    heads of 72, whose head dim and head strides are not) and with 1s
    (one video: n_videos; two: one search step; an image: T; small frames: one chunk a group,
    one block a plane; a few tokens: one tile a program; multi-query attention: one kv head,
    and rope3d on it) must compile as some ahead-of-time job does: the same constants (or the
    argument is do_not_specialize: one variant for every value) and the same hints on the
    arguments that address rows (ADDRESSING)."""
    import torch

    import sora_kernels as sk
    from sora_kernels.ops import (activations, adaln_norm, final_layer_unpatchify, frames_to_uint8, gated_residual,
                                  group_norm_moments, group_norm_silu, latent_denorm, pack_patchify, patch_embed3d,
                                  rope3d, varlen_attention)
    from sora_kernels.testing import aot
    modules = (activations, adaln_norm, final_layer_unpatchify, frames_to_uint8, gated_residual, group_norm_moments,
               group_norm_silu, latent_denorm, pack_patchify, patch_embed3d, rope3d, varlen_attention)
    jobs = aot.kernel_jobs([90])
    ints = {}  # kernel -> its int arguments (unknown ints in some job)
    for job in jobs:
        ints.setdefault(job["kernel"], set()).update(n for n, t in job["signature"].items() if t == "i32")
    kernels = {name: getattr(module, name) for module in modules for name in set(vars(module)) & set(ints)}
    compiled = {}  # kernel -> (ints compiled as the constant 1, hinted addressing ints, ALIGN) of its jobs
    for job in jobs:
        name = job["kernel"]
        hinted = aot.hinted_ints(kernels[name], job["signature"], job.get("divisible", ()), job.get("unaligned", ()))
        compiled.setdefault(name, set()).add((frozenset(n for n in ints[name] if job["constexprs"].get(n) == 1),
                                              frozenset(hinted & set(ADDRESSING.get(name, ()))),
                                              job["constexprs"].get("ALIGN")))
    launches = []
    for module in modules:
        for name in set(vars(module)) & set(kernels):
            monkeypatch.setattr(module, name, _Launches(kernels[name], launches))

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    for patch, C, E in (((1, 2, 2), 4, 32), ((1, 1, 1), 4, 32)):
        P = C * patch[0] * patch[1] * patch[2]
        sk.patchify3d(leaf(1, C, 2, 4, 4), patch, backend="triton").sum().backward()         # one video
        packed = sk.pack_patchify([leaf(C, 1, 4, 4), leaf(C, 2, 2, 2)], patch, backend="triton")  # two
        packed.tokens.sum().backward()
        one = sk.patch_embed3d([leaf(C, 2, 4, 4)], leaf(E, P), leaf(E), patch, backend="triton")
        tokens, cu = one.tokens, one.cu_seqlens
        shift, scale, gate = leaf(1, E), leaf(1, E), leaf(1, E)
        h = sk.gated_residual(tokens, leaf(*tokens.shape), gate, cu, backend="triton")  # one tile
        h = sk.adaln_norm(h, shift, scale, cu, backend="triton")
        h = sk.gelu_tanh(h, backend="triton") + sk.swiglu(h, h, backend="triton")
        out = sk.final_layer_unpatchify(h, shift, scale, leaf(P, E), leaf(P), one, patch, backend="triton")
        out[0].sum().backward()
    image = leaf(1, 32, 1, 4, 4)                                    # T = 1, 16 positions: one chunk
    sk.group_norm_silu(image, 8, leaf(32), leaf(32), backend="triton").sum().backward()
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        sk.group_norm_moments(image.detach().to(memory_format=layout)[..., 1:, :3], 8, backend="triton")  # a tile
    sk.latent_denorm(image.detach(), 0.5, 0.1, backend="triton")     # one block a plane
    sk.frames_to_uint8(image.detach()[0, :3], backend="triton")
    q = leaf(6, 2, 16, dtype=torch.float16)
    k, v = leaf(6, 1, 16, dtype=torch.float16), leaf(6, 1, 16, dtype=torch.float16)  # one kv head
    cu_qk = torch.tensor([0, 2, 6], device=device, dtype=torch.int32)
    sk.varlen_attention(q, k, v, cu_qk, cu_qk, 4, 4, backend="triton").float().sum().backward()
    positions = torch.zeros(6, 3, device=device, dtype=torch.int32)
    sk.rope3d(k, positions, backend="triton").float().sum().backward()                   # one head
    q, k, v = (leaf(6, 2, 72, dtype=torch.float16) for _ in range(3))      # DiT-XL's heads of 72 (ALIGN 8)
    sk.varlen_attention(q, k, v, cu_qk, cu_qk, 4, 4, backend="triton").float().sum().backward()
    sk.rope3d(q, positions, backend="triton").float().sum().backward()
    assert {name for name, _ in launches} == set(kernels), sorted(set(kernels) - {name for name, _ in launches})
    for name, args in launches:
        free = ints[name] - aot.unspecialized(kernels[name])
        ones = frozenset(n for n in free if args[n] == 1)
        hints = frozenset(n for n in free & set(ADDRESSING.get(name, ())) if args[n] != 1 and args[n] % 16 == 0)
        align = args.get("ALIGN")  # the attention kernels' alignment of the head dim and strides
        assert (ones, hints, align) in compiled[name], (name, sorted(ones), sorted(hints), align, compiled[name])
