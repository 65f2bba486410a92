"""Peak tensor memory of a call, for the tests and benchmarks of bounded-memory code."""
from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch


def peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes of live tensors, above those alive before, while fn() runs: the CUDA
    allocator's statistics on a GPU; on CPU, the profiler's memory timeline (every tensor
    allocation and free recorded)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA; still the CPU timeline
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return max((sum(s) for s in sizes), default=0)
