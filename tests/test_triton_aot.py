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
