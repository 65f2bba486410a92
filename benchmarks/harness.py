"""Timing, bandwidth ceilings, workloads and result files for the benchmark suite.

On CUDA every time comes from triton.testing.do_bench (CUDA events, median and 20/80
percentiles); on CPU from pytest-benchmark's rounds. Throughput is derived from the bytes
an op must move (each input read once, each output written once) and compared with the
device's measured copy bandwidth.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# glibc's malloc serves a block over M_MMAP_THRESHOLD (which grows by itself up to 32 MiB)
# with a fresh mmap, and returns the top of its heap to the system whenever more than
# M_TRIM_THRESHOLD (twice the other) is free there. A call whose tensors add up to about that
# size then page-faults and zeroes them every time, or only some of the time, depending on
# what ran before in the process: on the 2-core CPU, gated_residual_adaln's forward (two
# 23.6 MB outputs) took 4.7 ms in one run of the suite and 10-12.5 ms in others, and
# allocating and filling two such tensors 16.5 ms against 1.4 ms with trimming off. So the
# suite fixes both thresholds for every provider alike; a process of one's own gets the same
# with MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ in the environment, or jemalloc.
MALLOC_SETTINGS = {"M_TRIM_THRESHOLD": 2**31 - 1, "M_MMAP_THRESHOLD": 32 * 2**20}
_MALLOPT_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # glibc's malloc.h
_malloc_state: dict = {}


def steady_malloc() -> dict | None:
    """Fixes glibc malloc's trim and mmap thresholds in this process (MALLOC_SETTINGS), once.
    Returns what was set, for the results' environment; None where the C library is not
    glibc (nothing is changed there)."""
    if "settings" not in _malloc_state:
        settings = None
        try:
            import ctypes
            libc = ctypes.CDLL(None)
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                settings = {name: value for name, value in MALLOC_SETTINGS.items()
                            if libc.mallopt(_MALLOPT_PARAMS[name], value) == 1}
        except OSError:
            settings = None
        _malloc_state["settings"] = settings or None
    return _malloc_state["settings"]


# -----------------------------------------------------------------------------
# Workloads
# -----------------------------------------------------------------------------

# A realistic mixed batch of 16-channel latents (time x height x width after the VAE):
# one long clip, several short square clips and images of several aspect ratios.
MIXED_SIZES = [(13, 90, 160)] + [(5, 32, 32)] * 4 + [(1, 64, 64), (1, 48, 80), (1, 80, 48), (1, 32, 96), (1, 96, 32)]
LATENT_CHANNELS = 16
PATCH = (1, 2, 2)


def mixed_batch(repeat: int = 1, device=None, dtype=torch.bfloat16) -> list[torch.Tensor]:
    """The mixed batch, `repeat` times over (more videos, same mix)."""
    device = device or bench_device()
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(LATENT_CHANNELS, *s, generator=g).to(device=device, dtype=dtype)
            for _ in range(repeat) for s in MIXED_SIZES]


def workloads(device: torch.device) -> dict[str, int]:
    """Workload name -> repeat count of the mixed batch. On CUDA a larger batch shows the
    bandwidth the kernels reach once launch overhead is amortised."""
    return {"mixed": 1, "mixed_x16": 16} if device.type == "cuda" else {"mixed": 1}


def backend_runner(provider: str, backends, args: tuple, device: torch.device):
    """A no-argument callable running `provider`'s backend on `args`, or None for a baseline
    provider that is not a backend. Skips the benchmark (with the backend's reasons) when it
    cannot run here; Triton on CPU runs only in the interpreter, which is not a timing."""
    import pytest
    backend = next((b for b in backends if b.name == provider), None)
    if backend is None:
        return None
    if provider == "triton" and device.type == "cpu":
        pytest.skip("triton on CPU runs only in the interpreter: not a timing")
    reasons = backend.reasons(*args)
    if reasons:
        pytest.skip(f"{provider}: {'; '.join(reasons)}")
    return lambda: backend.run(*args)


# -----------------------------------------------------------------------------
# Timing
# -----------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantile(sorted_values: list[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def measure(fn, device: torch.device, benchmark=None, quick: bool = False, rounds: int | None = None) -> Timing:
    """Median and 20/80 percentiles of fn() in milliseconds. rounds: for calls of seconds (on
    CPU: that many timed calls after one warm-up; on CUDA at least that many)."""
    if device.type == "cuda":
        import triton
        med, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    if rounds is not None:
        benchmark = None
    if benchmark is not None:  # pytest-benchmark's rounds
        benchmark.pedantic(fn, rounds=5 if quick else 20, warmup_rounds=1 if quick else 3, iterations=1)
        data = sorted(benchmark.stats.stats.data)
    else:
        fn()
        data = []
        for _ in range(rounds or (5 if quick else 20)):
            t0 = time.perf_counter()
            fn()
            data.append(time.perf_counter() - t0)
        data.sort()
    return Timing(*(1e3 * _quantile(data, q) for q in (0.5, 0.2, 0.8)))


def graph_time_ms(fn, quick: bool = False) -> float:
    """fn's device time without the host's share: fn captured n times back to back in one
    CUDA graph, the graph replayed, the median replay over n. No L2 flush between the calls
    (unlike measure), so it is an upper bound on the kernels' speed for workloads that fit in
    L2; the suite's bandwidth workloads are several times larger. Raises whatever capture
    raises for an fn that cannot be captured (a host read of device data, say)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    n = max(1, min(100, int(2.0 / max(start.elapsed_time(end), 1e-3))))  # ~2 ms of calls per replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10 if quick else 30):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    del graph
    return _quantile(sorted(times), 0.5)


_COPY_BW: dict[str, float] = {}


def copy_bandwidth_gbps(device: torch.device, quick: bool = False) -> float:
    """The device's measured copy bandwidth: a large copy_, counting bytes read + written."""
    key = str(device)
    if key not in _COPY_BW:
        n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
        src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t = measure(lambda: dst.copy_(src), device, quick=quick)
        _COPY_BW[key] = 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9
    return _COPY_BW[key]


# -----------------------------------------------------------------------------
# Results
# -----------------------------------------------------------------------------

@dataclass
class Row:
    kernel: str          # op name
    mode: str            # "op": the public function; "kernel": the data movement alone
    provider: str        # backend or baseline
    workload: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes_moved: int
    gbps: float
    frac_copy_bw: float  # gbps over the device's measured copy bandwidth
    extra: dict = field(default_factory=dict)
    flops: int = 0       # floating-point operations counted for compute-bound ops (attention), else 0
    tflops: float = 0.0  # flops / median time


def git_revision() -> str:
    """SORA_KERNELS_REVISION when set (a copy of the tree on another machine may carry a stale
    .git), else git's HEAD, '-dirty' with uncommitted changes."""
    if os.environ.get("SORA_KERNELS_REVISION"):
        return os.environ["SORA_KERNELS_REVISION"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        # The results files themselves are rewritten during a run: they do not make it dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": name,
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_revision": git_revision(),
        "malloc": _malloc_state.get("settings"),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# Dense bf16 matrix peaks from the vendors' datasheets (TFLOP/s, no sparsity): the
# denominator of MFU. The SXM parts; a PCIe H100 (756) is named "H100 PCIe".
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The datasheet's dense bf16 peak of this GPU, None on a CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def results_path(env: dict) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower() or "device"
    return os.path.join(RESULTS_DIR, f"{env['device_type']}-{slug}.json")


def write_results(rows: list[Row], env: dict, copy_bw: float, path: str | None = None) -> str:
    path = path or results_path(env)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"          # then renamed: a run killed while writing leaves the last whole file
    with open(tmp, "w") as f:
        json.dump({"environment": env, "copy_bandwidth_gbps": copy_bw, "rows": [asdict(r) for r in rows]}, f, indent=1)
    os.replace(tmp, path)
    return path


def liger(module: str, name: str, device: torch.device):
    """Liger-Kernel's `module`.`name` for the `liger` provider, or a skip with the reason it
    cannot run here (not installed; not on CUDA)."""
    import pytest
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"liger-kernel is not installed ({e})")
    if device.type != "cuda":
        pytest.skip("Liger-Kernel runs on CUDA")
    return fn


# The baseline each op's speedup column is taken against.
BASELINES = {"varlen_attention": "sdpa_padded", "rope3d": "reference", "adaln_norm": "eager",
             "gated_residual_adaln": "eager", "patch_embed3d": "conv3d_loop", "final_layer_unpatchify": "eager",
             "group_norm_silu": "eager", "vae_decode": "eager_full", "latent_denorm": "eager",
             "dit_train": "padded", "sample": "loop", "gated_residual": "eager", "rms_norm": "eager",
             "gelu_tanh": "eager", "swiglu": "eager"}


def format_table(rows: list[Row]) -> str:
    """One table for memory-bound rows (GB/s, fraction of copy bandwidth, speedup over
    torch_loop), one for compute-bound rows (TFLOP/s, speedup over BASELINES)."""
    memory = [r for r in rows if not r.flops]
    compute = [r for r in rows if r.flops]
    tables = [_memory_table(memory)] if memory else []
    if compute:
        tables.append(_compute_table(compute))
    return "\n\n".join(tables)


def _speedup(rows: list[Row], r: Row, baseline: str) -> str:
    base = next((b for b in rows if (b.kernel, b.mode, b.workload, b.dtype) == (r.kernel, r.mode, r.workload, r.dtype)
                 and b.provider == baseline), None)
    return f"{base.median_ms / r.median_ms:.2f}x" if base else "-"


def _layout(head, lines) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _compute_table(rows: list[Row]) -> str:
    head = ("kernel", "mode", "workload", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "MFU", "speedup", "vs")
    lines = [(r.kernel, r.mode, r.workload, r.provider, f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}-{r.p80_ms:.3f}",
              f"{r.tflops:.3g}", f"{100 * r.extra['mfu']:.0f}%" if r.extra.get("mfu") is not None else "-",
              _speedup(rows, r, BASELINES.get(r.kernel, "torch_loop")), BASELINES.get(r.kernel, "torch_loop"))
             for r in rows]
    return _layout(head, lines)


def _memory_table(rows: list[Row]) -> str:
    head = ("kernel", "mode", "workload", "provider", "median ms", "p20-p80 ms", "GB/s", "of copy BW", "speedup")
    lines = []
    for r in rows:
        speedup = _speedup(rows, r, BASELINES.get(r.kernel, "torch_loop"))
        lines.append((r.kernel, r.mode, r.workload, r.provider, f"{r.median_ms:.4f}", f"{r.p20_ms:.4f}-{r.p80_ms:.4f}",
                      f"{r.gbps:.1f}", f"{100 * r.frac_copy_bw:.0f}%", speedup))
    return _layout(head, lines)
