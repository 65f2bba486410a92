"""The C++ side without Python: CMake builds the CPU kernels and their unit tests (run by
ctest) and compiles every .cu for sm_80 and sm_90a when nvcc is here."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmake_env() -> dict:
    env = dict(os.environ)
    # The nvcc on PATH may be a wrapper script; CMake wants the real compiler.
    cuda_home = env.get("CUDA_HOME", "/usr/local/cuda")
    if "CUDACXX" not in env and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        env["CUDACXX"] = os.path.join(cuda_home, "bin", "nvcc")
    return env


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    env = _cmake_env()
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", ROOT, "-B", str(build)], capture_output=True, text=True, env=env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    if "CUDACXX" in env and env.get("SORA_KERNELS_SKIP_CUDA_BUILD", "0") in ("", "0"):
        # with nvcc here every .cu must be compiled: a configure that quietly found no CUDA
        # compiler would pass the rest of this test on the CPU kernels alone
        assert "sora_kernels: compiling CUDA kernels for" in configure.stdout, configure.stdout[-3000:]
    jobs = str(min(2, os.cpu_count() or 1))
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True, env=env)
    assert compiled.returncode == 0, compiled.stdout[-4000:] + compiled.stderr[-4000:]
    if "compiling CUDA kernels" in configure.stdout:
        sources = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu"))}
        objects = {os.path.relpath(p, build / "CMakeFiles" / "sora_kernels_cuda.dir")[:-len(".o")]
                   for p in glob.glob(str(build / "CMakeFiles" / "sora_kernels_cuda.dir" / "csrc" / "*" / "*.cu.o"))}
        assert sources and objects == sources, f"compiled {sorted(objects)}, sources {sorted(sources)}"
    ctest = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert ctest.returncode == 0, ctest.stdout + ctest.stderr
    assert "tests passed" in ctest.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("value", ["", "0", "1"])
def test_cmake_skip_cuda_build_as_setup_py(tmp_path, value):
    """CMake reads SORA_KERNELS_SKIP_CUDA_BUILD with setup.py's rule: empty and "0" (like unset)
    build the CUDA kernels when a CUDA compiler is here, any other value skips them."""
    env = _cmake_env()
    env["SORA_KERNELS_SKIP_CUDA_BUILD"] = value
    configure = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build")], capture_output=True, text=True,
                               env=env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    skip = value not in ("", "0")  # setup.py's _extensions()
    assert (f"SORA_KERNELS_SKIP_CUDA_BUILD={value} is set, CPU kernels only" in configure.stdout) == skip, \
        configure.stdout[-3000:]
    if skip:
        assert "compiling CUDA kernels for" not in configure.stdout, configure.stdout[-3000:]
    elif "CUDACXX" in env:
        assert "sora_kernels: compiling CUDA kernels for" in configure.stdout, configure.stdout[-3000:]
