"""Peak tensor memory of a call, for the tests and benchmarks of bounded-memory code."""
from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch


def peak_bytes(fn, device: torch.device, resident=()) -> int:
    """Peak bytes of live tensors while fn() runs, beyond those alive before that it does not
    read: the CUDA allocator's statistics on a GPU; on CPU, the profiler's memory timeline
    (every tensor allocation and free recorded). The timeline also counts the tensors alive
    before that fn reads (its PREEXISTING ones: a model's weights); the allocator's statistics
    cannot tell those apart, so on CUDA the bytes of `resident` (tensors alive before that fn
    reads, e.g. a module's parameters; each storage once) are added, and a budget check
    measures the same on both. TypeError for a resident that is not a tensor, on any device."""
    storages = {}     # by storage: views and tied weights count once, a whole storage each
    for i, t in enumerate(resident):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"resident: expected tensors (e.g. module.parameters()), got {type(t).__name__} at {i}")
        if t.device.type == device.type and device.index in (None, t.device.index):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    if device.type == "cuda":
        held = sum(storages.values())
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base + held
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
