"""Backends, and how an op picks one.

Every op has up to four backends, tried in this priority order:

    cuda       CUDA C++ kernels registered with the dispatcher (sora_kernels._C, CUDA key)
    triton     Triton kernels as torch.library custom ops (CUDA tensors, or CPU tensors under
               TRITON_INTERPRET=1)
    cpu        C++ kernels with OpenMP registered with the dispatcher (sora_kernels._C, CPU key)
    reference  pure PyTorch, inside the library: the fallback, the test oracle, the benchmark baseline

Each backend says why it cannot run a call (``reasons``); the first with no reasons runs.
``backend="name"`` on an op, or the environment variable ``SORA_KERNELS_BACKEND``, forces one.
When none can run, one :class:`NoBackendError` lists every backend and its reasons.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

BACKEND_ENV = "SORA_KERNELS_BACKEND"
PRIORITY = ("cuda", "triton", "cpu", "reference")


# -----------------------------------------------------------------------------
# What is built and importable (computed once, at import)
# -----------------------------------------------------------------------------

def _load_compiled() -> str | None:
    """Imports sora_kernels._C; returns None on success, else why it is missing."""
    try:
        from sora_kernels import _C  # noqa: F401  (registers torch.ops.sora_kernels.*)
    except ImportError as e:
        return f"sora_kernels._C is not built ({e}); run `pip install -e .`"
    return None


def _load_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


COMPILED_MISSING = _load_compiled()
TRITON_MISSING = _load_triton()


def _compiled_kernels() -> frozenset:
    """(op, dispatch key) pairs that sora_kernels._C registered, e.g. ("pack_patchify", "CUDA")."""
    if COMPILED_MISSING is not None:
        return frozenset()
    return frozenset((name.split("::", 1)[1], key) for key in ("CPU", "CUDA")
                     for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
                     if name.startswith("sora_kernels::"))


COMPILED_KERNELS = _compiled_kernels()  # a constant, so selection traces under torch.compile


def build_record() -> dict | None:
    """What setup.py recorded of the build of sora_kernels._C (sora_kernels/_build.json):
    {"cuda": whether it compiled the CUDA kernels, "reason": how, or why not, ...}; None when
    there is no record (a build before setup.py wrote it, or none)."""
    import json
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def compiled_has(op: str, key: str) -> bool:
    """Whether sora_kernels._C registered `op` for dispatch key `key` ('CPU' or 'CUDA')."""
    return (op, key) in COMPILED_KERNELS


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# -----------------------------------------------------------------------------
# Reasons common to every op
# -----------------------------------------------------------------------------

def device_reasons(name: str, device: torch.device, op: str) -> list[str]:
    """Why backend `name` cannot run op `op` on `device`, before any op-specific check."""
    if name == "reference":
        return []
    if name == "cpu":
        if device.type != "cpu":
            return [f"runs on CPU tensors, got {device.type}"]
        if COMPILED_MISSING:
            return [COMPILED_MISSING]
        return [] if compiled_has(op, "CPU") else [f"sora_kernels._C has no CPU kernel for {op}"]
    if name == "cuda":
        if device.type != "cuda":
            return [f"runs on CUDA tensors, got {device.type}"]
        if COMPILED_MISSING:
            return [COMPILED_MISSING]
        if not compiled_has(op, "CUDA"):
            return ["sora_kernels._C was built without CUDA kernels (CPU-only torch, no nvcc, "
                    "or SORA_KERNELS_SKIP_CUDA_BUILD)"]
        return []
    if name == "triton":
        if TRITON_MISSING:
            return [TRITON_MISSING]
        if device.type == "cpu" and not triton_interpreting():
            return ["runs on CPU tensors only under TRITON_INTERPRET=1"]
        if device.type not in ("cpu", "cuda"):
            return [f"runs on CUDA tensors, got {device.type}"]
        return []
    raise ValueError(f"backend: expected one of {PRIORITY}, got {name!r}")


def finite_number(x) -> bool:
    """Whether x is an int or float and finite. abs(x) < inf rather than math.isfinite: under
    torch.compile with dynamic shapes a float argument is traced, and math.isfinite breaks the
    graph on it."""
    return isinstance(x, (int, float)) and abs(x) < math.inf


def deterministic_reasons(summed: tuple, atomic_sums: str) -> list[str]:
    """Why a backend whose backward adds `atomic_sums` (the gradients of the tensors `summed`)
    with float atomics, in an order, and so to last bits, that vary from run to run, cannot run
    a call that will differentiate one of them while torch.use_deterministic_algorithms(True)
    is set: the next backend runs it (the reference's index additions are deterministic in that
    mode). With warn_only=True it runs after a warning to the caller, as PyTorch's own
    nondeterministic ops do; but not under torch.compile, which cannot read warn_only (the next
    backend runs, as without it). Call it last, when nothing else rules the backend out."""
    if not (torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in summed)):
        return []
    why = (f"its backward adds {atomic_sums} with float atomics, in an order that varies from run to run, "
           f"and torch.use_deterministic_algorithms(True) is set")
    if not torch.compiler.is_compiling() and torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(f"sora_kernels' triton backend runs although {why} (warn_only=True)",
                      stacklevel=_outside_the_package())
        return []
    return [why]


def _outside_the_package() -> int:
    """The stacklevel of the first frame outside sora_kernels, seen from the caller's caller
    (a warning then names the user's line, however deep in the package it was raised)."""
    package, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


# -----------------------------------------------------------------------------
# Selection
# -----------------------------------------------------------------------------

class NoBackendError(RuntimeError):
    """No backend can run this call; the message lists every backend and why."""


@dataclass(frozen=True)
class Backend:
    """One way to run an op: `reasons(*args)` says why it cannot, `run(*args)` runs it."""

    name: str
    reasons: Callable[..., list[str]]
    run: Callable


def requested_backend(backend: str | None) -> str | None:
    """The backend forced by the argument, else by SORA_KERNELS_BACKEND, else None."""
    forced = backend if backend is not None else (os.environ.get(BACKEND_ENV) or None)
    if forced is not None and forced not in PRIORITY:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{source}: expected one of {', '.join(PRIORITY)}, got {forced!r}")
    return forced


def select(op: str, backends: Sequence[Backend], args: tuple, backend: str | None = None) -> Backend:
    """The first backend of `backends` (in priority order) that can run `args`.

    With `backend` (or SORA_KERNELS_BACKEND) set, only that one is considered.
    Raises NoBackendError listing every considered backend and its reasons.
    """
    forced = requested_backend(backend)
    candidates = [b for b in backends if forced is None or b.name == forced]
    report = []
    for b in candidates:
        reasons = b.reasons(*args)
        if not reasons:
            return b
        report.append(f"  {b.name}: " + "; ".join(reasons))
    if not candidates:
        report.append(f"  {forced}: not implemented for {op}")
    head = f"sora_kernels.{op}: no backend can run this call"
    if forced is not None:
        head += f" (forced to {forced!r})"
    raise NoBackendError(head + "\n" + "\n".join(report))

