"""Build sora_kernels and its compiled extension sora_kernels._C.

Environment variables (all optional):
  SORA_KERNELS_SKIP_CUDA_BUILD=1   build only the C++ CPU kernels, even with nvcc and a CUDA torch.
  SORA_KERNELS_CUDA_ARCHS="8.0;9.0a"   CUDA architectures to compile for (TORCH_CUDA_ARCH_LIST syntax).
  MAX_JOBS=N   parallel compile jobs; by default derived from cores and memory (about 3 GB per nvcc job).

The CUDA kernels are built whenever torch is a CUDA build and nvcc is found, also on
a machine without a GPU: the build only needs the compiler.
"""
import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """CUDA_HOME if set, else the CUDA folder whose bin/nvcc is the real compiler."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _max_jobs():
    """Parallel jobs from cores and memory, unless MAX_JOBS is set."""
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    jobs = max(1, min(cores, int(mem_gb // 3)))
    print(f"sora_kernels: MAX_JOBS={jobs} (from {cores} cores, {mem_gb:.0f} GB); "
          "set MAX_JOBS lower if the build runs out of memory", file=sys.stderr)
    return str(jobs)


def _record_build(with_cuda: bool, reason: str) -> None:
    """sora_kernels/_build.json: whether this build compiled the CUDA kernels, and why not
    (tests/test_backends.py fails when they are missing for a reason the build no longer has,
    so that the cuda backend's tests cannot all skip unnoticed)."""
    import torch
    record = {"cuda": with_cuda, "reason": reason, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    with open(os.path.join(ROOT, "sora_kernels", "_build.json"), "w") as f:
        json.dump(record, f, indent=1)


def _extensions():
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ["MAX_JOBS"] = _max_jobs()
    import torch
    from torch.utils import cpp_extension

    skip_cuda = os.environ.get("SORA_KERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0")
    with_cuda = (not skip_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
    # csrc/<op>/ holds each op's kernels; csrc/tests/ holds C++ unit tests (CMake only).
    op_dirs = [d for d in sorted(glob.glob("csrc/*/")) if not d.startswith("csrc/tests")]
    sources = ["csrc/module.cpp", "csrc/ops.cpp", *(f for d in op_dirs for f in sorted(glob.glob(d + "*_cpu.cpp")))]
    # -fno-trapping-math: lets GCC if-convert float compares in `omp simd` loops (the clamps of
    # group_norm_cpu.cpp's vectorised exp); no kernel relies on floating-point exceptions.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]  # torch adds the C++ standard it needs
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        reason = ("SORA_KERNELS_SKIP_CUDA_BUILD is set" if skip_cuda else
                  "torch is not a CUDA build" if torch.version.cuda is None else "nvcc was not found")
        print(f"sora_kernels: building C++ CPU kernels only ({reason})", file=sys.stderr)
        _record_build(False, reason)
        return [cpp_extension.CppExtension("sora_kernels._C", sources, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("SORA_KERNELS_CUDA_ARCHS", "8.0;9.0a")
    # pip's CUDA wheels keep the CUDA library headers (cusparse.h, ...) that torch's
    # headers include under site-packages/nvidia/cu13/include.
    try:
        import nvidia
        for base in nvidia.__path__:
            include_dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    except ImportError:
        pass
    sources += [f for d in op_dirs for f in sorted(glob.glob(d + "*_cuda_ops.cpp")) + sorted(glob.glob(d + "*.cu"))]
    print(f"sora_kernels: building C++ CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"with {cpp_extension.CUDA_HOME}/bin/nvcc", file=sys.stderr)
    _record_build(True, f"built for {os.environ['TORCH_CUDA_ARCH_LIST']} with {cpp_extension.CUDA_HOME}/bin/nvcc")
    return [cpp_extension.CUDAExtension(
        "sora_kernels._C", sources, include_dirs=include_dirs,
        define_macros=[("SORA_KERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


MODEL_EXTRAS = ["av", "safetensors", "tqdm"]
# text: sora_model.text.HFTextEncoder (`sora-train --text hf:<folder>`); 4.31 added
# AutoModelForTextEncoding (T5's encoder alone)
TEXT_EXTRAS = ["transformers>=4.31"]

setup(
    name="sora-kernels",
    version="0.1.0",
    description="Kernels for video diffusion transformers: 3D patchify, variable-size packing, "
                "variable-length attention, fused DiT ops and latent decoding",
    packages=find_packages(include=["sora_kernels", "sora_kernels.*", "sora_model", "sora_model.*"]),
    package_data={"sora_kernels": ["_build.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # model: what sora_model's video I/O, checkpoints and training loop use (the tests need it too)
    extras_require={"model": MODEL_EXTRAS, "text": TEXT_EXTRAS,
                    "dev": ["pytest", "hypothesis", "pytest-benchmark", "ninja", "numpy", *MODEL_EXTRAS, *TEXT_EXTRAS]},
    entry_points={"console_scripts": ["sora-train=sora_model.train:main", "sora-sample=sora_model.sample:main",
                                      "sora-train-vae=sora_model.train_vae:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
