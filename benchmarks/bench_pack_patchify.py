"""Benchmarks of pack_patchify and unpack_unpatchify on a mixed batch of latents.

Providers: each backend, and `torch_loop`, what one would write instead: a per-video
reshape / permute, then torch.cat (and, in "op" mode, per-video meshgrid positions).
Modes: "kernel" times the backend's kernel call (tokens, and for our backends the positions
they write in the same launch; torch_loop builds tokens only); "op" times the public function,
which also builds cu_seqlens and grid_sizes (and torch_loop its positions with meshgrid).
Bytes moved = every video element read once and written once, plus 12 bytes of positions
per token for pack_patchify.
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from sora_kernels.ops.pack_patchify import PACK_BACKENDS, UNPACK_BACKENDS
from sora_kernels.reference import patchify as ref

PROVIDERS = ["cuda", "triton", "cpu", "reference", "torch_loop"]
PATCH = harness.PATCH


def torch_loop_pack(videos, patch):
    pt, ph, pw = patch
    tokens = []
    for v in videos:
        C, T, H, W = v.shape
        x = v.reshape(C, T // pt, pt, H // ph, ph, W // pw, pw).permute(1, 3, 5, 0, 2, 4, 6)
        tokens.append(x.reshape(-1, C * pt * ph * pw))
    return torch.cat(tokens)


def torch_loop_metadata(videos, patch):
    pt, ph, pw = patch
    grids = [(v.shape[1] // pt, v.shape[2] // ph, v.shape[3] // pw) for v in videos]
    device = videos[0].device
    positions = torch.cat([torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in g), indexing="ij"),
                                       dim=-1).reshape(-1, 3) for g in grids]).int()
    lengths = torch.tensor([0] + [t * h * w for t, h, w in grids])
    cu_seqlens = lengths.cumsum(0).int().to(device)
    return cu_seqlens, torch.tensor(grids, dtype=torch.int32, device=device), positions


def torch_loop_unpack(tokens, patch, sizes):
    pt, ph, pw = patch
    out, start = [], 0
    for T, H, W in sizes:
        n = (T // pt) * (H // ph) * (W // pw)
        C = tokens.shape[1] // (pt * ph * pw)
        x = tokens[start:start + n].reshape(T // pt, H // ph, W // pw, C, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
        out.append(x.reshape(C, T, H, W))
        start += n
    return out


@pytest.mark.parametrize("workload", ["mixed", "mixed_x16"])
@pytest.mark.parametrize("mode", ["kernel", "op"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pack_patchify(suite, benchmark, workload, mode, provider):
    repeat = harness.workloads(suite.device).get(workload)
    if repeat is None:
        pytest.skip(f"workload {workload} runs on CUDA only")
    videos = harness.mixed_batch(repeat, suite.device)
    run = harness.backend_runner(provider, PACK_BACKENDS, (videos, PATCH), suite.device)
    if provider == "torch_loop":
        fn = (lambda: torch_loop_pack(videos, PATCH)) if mode == "kernel" else \
             (lambda: (torch_loop_pack(videos, PATCH), torch_loop_metadata(videos, PATCH)))
        out = torch_loop_pack(videos, PATCH)
    elif mode == "kernel":
        fn = run
        out = fn()[0]
    else:
        fn = lambda: sk.pack_patchify(videos, PATCH, backend=provider)  # noqa: E731
        out = fn().tokens
    assert torch.equal(out, ref.pack_patchify(videos, PATCH)), f"{provider} disagrees with the reference"
    nbytes = 2 * sum(v.numel() for v in videos) * videos[0].element_size() + 12 * out.shape[0]
    suite.run("pack_patchify", mode, provider, workload, fn, nbytes, videos[0].dtype, benchmark,
              videos=len(videos), tokens=out.shape[0], graph=True)


@pytest.mark.parametrize("workload", ["mixed", "mixed_x16"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_unpack_unpatchify(suite, benchmark, workload, provider):
    repeat = harness.workloads(suite.device).get(workload)
    if repeat is None:
        pytest.skip(f"workload {workload} runs on CUDA only")
    videos = harness.mixed_batch(repeat, suite.device)
    tokens = ref.pack_patchify(videos, PATCH)
    sizes = [tuple(v.shape[1:]) for v in videos]
    fn = harness.backend_runner(provider, UNPACK_BACKENDS, (tokens, PATCH, sizes), suite.device) or \
        (lambda: torch_loop_unpack(tokens, PATCH, sizes))
    assert all(torch.equal(a, b) for a, b in zip(fn(), videos)), f"{provider} disagrees with the input"
    nbytes = 2 * tokens.numel() * tokens.element_size()
    suite.run("unpack_unpatchify", "kernel", provider, workload, fn, nbytes, tokens.dtype, benchmark,
              videos=len(videos), tokens=tokens.shape[0], graph=True)
