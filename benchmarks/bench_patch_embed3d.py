"""Benchmarks of patch_embed3d (pack_patchify fused with the patch projection) on the mixed
batch of latents, against a Conv3d per video and torch.cat (what a DiT writes), and against
pack_patchify followed by a matrix product (our cpu backend).

Providers: `triton` and `cpu` (ours; each is skipped with its reasons where it cannot run),
`reference` (the library's pure-PyTorch backend), `conv3d_loop` (a Conv3d per video, then
torch.cat: the baseline), `compile` (torch.compile of that conv3d loop).

FLOPs: 2 * N * K * E (K = C*pt*ph*pw patch features, E output features); fwd+bwd counts 3x
(the weight and the input gradients are one product each).
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from sora_kernels.ops.patch_embed3d import PATCH_EMBED_BACKENDS

PROVIDERS = ["triton", "cpu", "reference", "conv3d_loop", "compile"]
MODES = ["fwd", "fwd+bwd"]
WIDTH = 1152  # DiT-XL


def _conv3d_loop(videos, weight, bias, patch):
    E = weight.shape[0]
    w = weight.view(E, videos[0].shape[0], *patch)
    return torch.cat([torch.nn.functional.conv3d(v[None], w, bias, stride=patch).flatten(2).transpose(1, 2)[0]
                      for v in videos])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_patch_embed3d(suite, benchmark, provider, mode):
    repeat = 4 if suite.device.type == "cuda" else 1
    videos = harness.mixed_batch(repeat, suite.device, dtype=torch.bfloat16 if suite.device.type == "cuda"
                                 else torch.float32)
    patch = harness.PATCH
    K = videos[0].shape[0] * patch[0] * patch[1] * patch[2]
    g = torch.Generator().manual_seed(0)
    weight = (0.05 * torch.randn(WIDTH, K, generator=g)).to(videos[0])
    bias = torch.randn(WIDTH, generator=g).to(videos[0])
    if provider in ("conv3d_loop", "compile"):
        # dynamic=False: kernels specialised to the batch's shapes, as a model of fixed sizes would get
        loop = torch.compile(_conv3d_loop, dynamic=False) if provider == "compile" else _conv3d_loop
        fn = lambda v, w, b: loop(v, w, b, patch)  # noqa: E731
    else:
        run = harness.backend_runner(provider, PATCH_EMBED_BACKENDS, (videos, weight, bias, patch), suite.device)
        assert run is not None
        fn = lambda v, w, b: sk.patch_embed3d(v, w, b, patch, backend=provider).tokens  # noqa: E731
    out = fn(videos, weight, bias)
    torch.testing.assert_close(out.float(), _conv3d_loop(videos, weight, bias, patch).float(), rtol=0.05, atol=0.05)
    if mode == "fwd":
        timed = lambda: fn(videos, weight, bias)  # noqa: E731
    else:
        leaves = [v.detach().requires_grad_() for v in videos] + [weight.detach().requires_grad_(),
                                                                  bias.detach().requires_grad_()]
        dout = torch.randn_like(out)

        def timed():
            torch.autograd.grad(fn(leaves[:-2], leaves[-2], leaves[-1]), leaves, dout)
    N = out.shape[0]
    flops = 2 * N * K * WIDTH * (1 if mode == "fwd" else 3)
    nbytes = (sum(v.numel() for v in videos) + N * WIDTH + K * WIDTH) * videos[0].element_size()
    suite.run("patch_embed3d", mode, provider, f"mixed_x{repeat}", timed, nbytes, videos[0].dtype, benchmark,
              flops=flops, tokens=N, width=WIDTH)
