"""Backend selection: priority, forcing by argument and environment, one error that lists
every backend with its reasons, and `python -m sora_kernels.info`."""
import os
import subprocess
import sys

import pytest
import torch

import sora_kernels as sk
from sora_kernels import backends as B
from sora_kernels.ops.pack_patchify import PACK_BACKENDS


def test_priority_picks_first_usable():
    videos = [torch.zeros(2, 1, 2, 2)]
    chosen = B.select("pack_patchify", PACK_BACKENDS, (videos, (1, 1, 1)))
    # CPU tensors: triton only under the interpreter, then the compiled CPU kernels.
    if B.TRITON_MISSING is None and B.triton_interpreting():
        expected = "triton"
    else:
        expected = "cpu" if B.COMPILED_MISSING is None else "reference"
    assert chosen.name == expected
    assert [b.name for b in PACK_BACKENDS] == list(B.PRIORITY)


def test_forced_backend_that_cannot_run_lists_reasons():
    if torch.cuda.is_available():
        pytest.skip("cuda can run here")
    with pytest.raises(sk.NoBackendError, match=r"forced to 'cuda'.*\n  cuda: runs on CUDA tensors, got cpu"):
        sk.pack_patchify([torch.zeros(2, 1, 2, 2)], 1, backend="cuda")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(B.BACKEND_ENV, "reference")
    assert B.select("pack_patchify", PACK_BACKENDS, ([torch.zeros(2, 1, 2, 2)], (1, 1, 1))).name == "reference"
    monkeypatch.setenv(B.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=r"SORA_KERNELS_BACKEND: expected one of cuda, triton, cpu, reference, "
                                         r"got 'fastest'"):
        sk.pack_patchify([torch.zeros(2, 1, 2, 2)], 1)


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match=r"backend: expected one of .* got 'tpu'"):
        sk.patchify3d(torch.zeros(1, 2, 1, 2, 2), 1, backend="tpu")


def test_no_backend_error_lists_every_backend():
    always_no = [B.Backend(name, lambda *a, n=name: [f"{n} says no"], None) for name in B.PRIORITY]
    with pytest.raises(sk.NoBackendError) as info:
        B.select("demo", always_no, ())
    text = str(info.value)
    for name in B.PRIORITY:
        assert f"  {name}: {name} says no" in text


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = B.device_reasons("triton", torch.device("cpu"), "pack_patchify")
    assert reasons and ("TRITON_INTERPRET=1" in reasons[0] or "not installed" in reasons[0])


def test_cuda_backend_declares_its_tile_limit():
    from sora_kernels.ops.pack_patchify import cuda_reasons
    assert cuda_reasons(2, 2048) == []
    assert "4096-byte" in cuda_reasons(4, 2048)[0]


def _nvcc() -> str | None:
    """The nvcc torch's extension builder finds (its CUDA_HOME: the variable, PATH's nvcc or
    /usr/local/cuda), which setup.py builds with."""
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    return nvcc if nvcc and os.path.exists(nvcc) else None


def test_cuda_kernels_built_where_they_can_be():
    """setup.py records in sora_kernels/_build.json whether it compiled the CUDA kernels and
    why not. Built with them, they are registered; built without them for a reason gone now (no
    nvcc then, or a CPU torch) while torch is a CUDA build and nvcc is here, this fails: the
    cuda backend's tests would otherwise all skip. SORA_KERNELS_SKIP_CUDA_BUILD skips it."""
    if B.COMPILED_MISSING:
        pytest.skip("sora_kernels._C is not built")
    record = B.build_record()
    if record is None:
        pytest.skip("no sora_kernels/_build.json: built before setup.py wrote it")
    cuda_ops = sorted(op for op, key in B.COMPILED_KERNELS if key == "CUDA")
    if record["cuda"]:
        assert cuda_ops, f"the build compiled the CUDA kernels ({record['reason']}), but none is registered"
        return
    assert not cuda_ops, f"the build record says no CUDA kernels ({record['reason']}), but {cuda_ops} are registered"
    if "SORA_KERNELS_SKIP_CUDA_BUILD" in record["reason"]:
        pytest.skip(f"built without CUDA kernels: {record['reason']}")
    nvcc = _nvcc()
    if torch.version.cuda is not None and nvcc:
        pytest.fail(f"sora_kernels._C was built without CUDA kernels ({record['reason']}), but torch "
                    f"{torch.__version__} is a CUDA build and {nvcc} exists: rebuild (pip install -e .), or the "
                    f"cuda backend's tests all skip")


def test_info_prints_backends():
    out = subprocess.run([sys.executable, "-m", "sora_kernels.info"], capture_output=True, text=True, check=True).stdout
    for word in ("torch", "triton", "device", "pack_patchify", "reference", "_C build"):
        assert word in out, out


def test_imports_without_compiled_extension():
    """The package imports and runs its Triton / reference backends when sora_kernels._C is
    missing (a checkout used without building, as on the lent GPU machine)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['sora_kernels._C'] = None\n"
            "import torch, sora_kernels as sk\n"
            "from sora_kernels import backends as B\n"
            "assert B.COMPILED_MISSING and not B.COMPILED_KERNELS\n"
            "p = sk.pack_patchify([torch.randn(4, 1, 4, 4)], (1, 2, 2), backend='reference')\n"
            "assert p.tokens.shape == (4, 16)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
