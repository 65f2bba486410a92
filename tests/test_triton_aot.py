"""Every Triton kernel config the launchers can produce compiles ahead of time for sm_80
and sm_90a on this machine, as the JIT compiles it for 16-aligned tensors; the configs that
spill registers (cuobjdump's stack frame) are tracked in tests/aot_spills.json."""
import json
import os
import subprocess
import sys

import pytest

from sora_kernels import backends as B

pytestmark = pytest.mark.skipif(B.TRITON_MISSING is not None, reason="triton is not installed")


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sora_kernels.testing.aot", "--arch", "80", "90"],
                          capture_output=True, text=True, env=env, timeout=1800)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, proc.stderr[-3000:]
    return results


def test_every_config_compiles_and_its_spills_are_listed(aot_results):
    """Every config compiles; the ones that spill (stack frame bytes, compiled with the JIT's
    alignment hints) are exactly those listed in tests/aot_spills.json, with at most the
    listed bytes: a new or grown spill fails, and so does a listed config that no longer
    spills (delete its line), so the list stays the truth and can only shrink toward empty.
    The lists are per Triton version; under a version with none the comparison is skipped."""
    from sora_kernels.testing.aot import kernel_jobs, spill_key
    assert len(aot_results) == len(kernel_jobs([80, 90]))
    kernels = {r["kernel"] for r in aot_results}
    assert {"patchify_tile_kernel", "attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"} <= kernels
    failed = [r for r in aot_results if not r["ok"]]
    assert not failed, (f"{len(failed)} configs failed; first: {failed[0]}; "
                        f"errors: {sorted({r['error'] for r in failed})[:3]}")
    assert {r["arch"] for r in aot_results} == {80, 90}
    import triton
    with open(os.path.join(os.path.dirname(__file__), "aot_spills.json")) as f:
        listed = json.load(f)
    if triton.__version__ not in listed["spills"]:  # each version spills differently (its own ptxas)
        pytest.skip(f"tests/aot_spills.json lists the spills of Triton {sorted(listed['spills'])}; "
                    f"this is {triton.__version__}")
    known = listed["spills"][triton.__version__]
    spilling = {spill_key(r): r["spill"] for r in aot_results if r["spill"] > 0}
    assert not spilling.keys() - known.keys(), \
        f"configs that spill and are not in tests/aot_spills.json: {sorted(spilling.keys() - known.keys())[:5]}"
    assert not known.keys() - spilling.keys(), \
        f"listed in tests/aot_spills.json but no longer spilling: {sorted(known.keys() - spilling.keys())[:5]}"
    grown = {k: (known[k], v) for k, v in spilling.items() if v > known[k]}
    assert not grown, f"spills grown past tests/aot_spills.json (listed, now): {list(grown.items())[:5]}"


def test_register_budget(aot_results):
    # 8 warps x 255 registers is the hardware ceiling; the copy kernel stays far under it so
    # 2+ programs share an SM. (Attention kernels may use all 255: one program per SM.)
    worst = max((r for r in aot_results if r["kernel"] == "patchify_tile_kernel"), key=lambda r: r["regs"])
    assert worst["regs"] <= 192, (worst["arch"], worst["constexprs"])


def test_attention_uses_tensor_cores(aot_results):
    """Every attention config's SASS has warpgroup MMA (HGMMA) on sm_90 or at least HMMA on
    sm_80: a kernel on FFMA would be an order of magnitude slower."""
    attention = [r for r in aot_results if r["kernel"] in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel",
                                                           "attn_bwd_dq_kernel")]
    assert attention and all(r["mma"] in ("HGMMA", "HMMA") for r in attention), \
        [(r["kernel"], r["arch"], r["constexprs"]) for r in attention if r["mma"] not in ("HGMMA", "HMMA")][:5]
    on_hopper = [r for r in attention if r["arch"] == 90 and r["kernel"] == "attn_fwd_kernel"]
    assert all(r["mma"] == "HGMMA" for r in on_hopper), [r["constexprs"] for r in on_hopper if r["mma"] != "HGMMA"]


def test_spill_in_loops_reads_backward_branches():
    """spill_in_loops counts local accesses between a backward branch and its target only."""
    from sora_kernels.testing.aot import spill_in_loops
    sass = "\n".join(f"        /*{a:04x}*/                   {text} ;" for a, text in [
        (0x10, "STL [R1], R2"), (0x20, "FFMA R3, R4, R5, R6"), (0x30, "LDL R7, [R1+0x4]"),
        (0x40, "ISETP.GE.AND P0, PT, R3, R8, PT"), (0x50, "@!P0 BRA 0x20"), (0x60, "LDL.LU R2, [R1]"),
        (0x70, "BRA 0x70")])
    assert spill_in_loops(sass) == 1


def test_frames_rounding_add_not_fused(aot_results):
    """frames_to_uint8 rounds with (v + 1.5 * 2^23) - 1.5 * 2^23 on the rounded product v; fused
    into one fma the product stays unrounded and ties round differently from torch (304 of
    5,760 fp32 elements on an H200 before the clamp moved between them)."""
    frames = [r for r in aot_results if r["kernel"] == "frames_to_uint8_kernel"]
    assert frames and not [r for r in frames if r["fma_rounding"]], \
        [(r["arch"], r["constexprs"]) for r in frames if r["fma_rounding"]][:5]


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
    addressing = ("C", "S", "sb", "sc", "st", "ss")
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
