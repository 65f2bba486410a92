"""sora_kernels.testing.memory.peak_bytes: what the bounded-memory tests and benchmarks measure."""
import pytest
import torch

from conftest import DEVICE
from sora_kernels.testing.memory import peak_bytes

MB = 2 ** 20


def test_peak_bytes_counts_what_the_call_reads_and_makes():
    """A call that reads w (1 MB, alive before), leaves `unread` (1 MB, alive before) alone and
    holds y and z (1 MB each) at once: 3 MB on either device, with w passed as resident (the
    CPU timeline counts a tensor the call reads; CUDA's allocator statistics start above it,
    so peak_bytes adds it). On CPU resident changes nothing; on CUDA without it w is left out."""
    w = torch.randn(MB // 4, device=DEVICE)
    unread = torch.randn(MB // 4, device=DEVICE)

    def call():
        y = w * 2
        z = y + 1
        del y
        return z

    measured = peak_bytes(call, DEVICE, resident=[w, w, w[:10]])  # a storage listed thrice counts once
    assert abs(measured - 3 * MB) <= 4096, measured           # scalars, the allocator's 512-byte blocks
    without = peak_bytes(call, DEVICE)
    expected_without = 3 * MB if DEVICE.type == "cpu" else 2 * MB
    assert abs(without - expected_without) <= 4096, without
    assert unread.numel() == MB // 4
    with pytest.raises(TypeError, match="resident: expected tensors .*, got Linear at 0"):
        peak_bytes(call, DEVICE, resident=[torch.nn.Linear(2, 2)])
