"""Benchmarks of final_layer_unpatchify (DiT's final layer: modulated LayerNorm, linear to the
patch features, unpatchify into each video) on the mixed batch of latents.

Providers: `triton` (one fused kernel), `cpu` (ours unfused: adaln_norm's C++ kernel, a matrix
product, unpack_unpatchify), `eager` (what a DiT writes: F.layer_norm, modulate with rows
gathered per segment, F.linear, then per-video reshape / permute), `compile` (torch.compile of
that eager code).

Memory-bound (about 2 * P flops per element of x, P = C*pt*ph*pw): bytes moved are x read
once and the latents written once (the per-video rows and the weight are negligible); fwd+bwd
adds the backward's minimum: x and the latent gradients read, the x gradient written.
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from sora_kernels.ops.final_layer_unpatchify import FINAL_LAYER_BACKENDS
from sora_kernels.reference import patchify as ref_patchify

PROVIDERS = ["triton", "cpu", "eager", "compile"]
MODES = ["fwd", "fwd+bwd"]
WIDTH = 1152  # DiT-XL


def _eager(x, shift, scale, weight, bias, seg, patch, sizes):
    h = torch.nn.functional.layer_norm(x, (x.shape[1],), eps=1e-6) * (1 + scale[seg]) + shift[seg]
    return ref_patchify.unpack_unpatchify(torch.nn.functional.linear(h, weight, bias), patch, sizes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_final_layer_unpatchify(suite, benchmark, provider, mode):
    repeat = 4 if suite.device.type == "cuda" else 1
    dtype = torch.bfloat16 if suite.device.type == "cuda" else torch.float32
    latents = harness.mixed_batch(repeat, suite.device, dtype=dtype)
    patch = harness.PATCH
    packed = sk.pack_patchify(latents, patch)
    N, P, n = packed.tokens.shape[0], packed.tokens.shape[1], len(latents)
    g = torch.Generator().manual_seed(0)
    args = {"x": torch.randn(N, WIDTH, generator=g), "shift": 0.5 * torch.randn(n, WIDTH, generator=g),
            "scale": 0.5 * torch.randn(n, WIDTH, generator=g),
            "weight": torch.randn(P, WIDTH, generator=g) / WIDTH ** 0.5, "bias": torch.randn(P, generator=g)}
    args = {k: v.to(suite.device, dtype) for k, v in args.items()}
    seg = packed.segment_ids.long()
    sizes = [tuple(v.shape[1:]) for v in latents]
    if provider in ("eager", "compile"):
        eager = torch.compile(_eager) if provider == "compile" else _eager
        fn = lambda a: eager(**a, seg=seg, patch=patch, sizes=sizes)  # noqa: E731
    else:
        harness.backend_runner(provider, FINAL_LAYER_BACKENDS, (args["x"], *[None] * 8, True), suite.device)
        fn = lambda a: sk.final_layer_unpatchify(**a, packed=packed, patch_size=patch, backend=provider)  # noqa: E731
    outs = fn(args)
    for a, b in zip(outs, _eager(**args, seg=seg, patch=patch, sizes=sizes)):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    itemsize = args["x"].element_size()
    nbytes = (N * WIDTH + N * P) * itemsize
    if mode == "fwd":
        run = lambda: fn(args)  # noqa: E731
    else:
        leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
        grads = [torch.randn_like(o) for o in outs]

        def run():
            torch.autograd.grad(fn(leaves), list(leaves.values()), grads)
        nbytes += (2 * N * WIDTH + N * P) * itemsize
    suite.run("final_layer_unpatchify", mode, provider, f"mixed_x{repeat}-D{WIDTH}", run, nbytes, dtype, benchmark,
              tokens=N, patch_features=P, videos=n)
