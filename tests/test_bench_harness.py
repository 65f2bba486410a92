"""The benchmark harness's process settings (benchmarks/harness.py)."""
import platform

import pytest
import torch

from benchmarks import harness


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_steady_malloc_sets_and_records_thresholds():
    settings = harness.steady_malloc()
    assert settings == harness.MALLOC_SETTINGS
    assert harness.steady_malloc() is settings  # once per process
    assert harness.environment(torch.device("cpu"))["malloc"] == harness.MALLOC_SETTINGS
