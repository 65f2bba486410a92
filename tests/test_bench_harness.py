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


def test_write_results_replaces_the_file_whole(tmp_path, monkeypatch):
    """The results file is written beside itself and renamed over the last one: a write that
    fails half-way (a run killed mid-write) leaves the previous file whole and loadable."""
    import json
    row = harness.Row("k", "fwd", "p", "w", "float32", 1.0, 0.9, 1.1, 8, 8e-6, 0.1, {}, 0, 0.0)
    env = {"device": "x", "device_type": "cpu"}
    path = str(tmp_path / "r.json")
    assert harness.write_results([row], env, 10.0, path) == path
    dump = json.dump

    def fail_half_way(obj, f, **kw):
        f.write('{"environment": ')
        raise KeyboardInterrupt
    monkeypatch.setattr(json, "dump", fail_half_way)
    with pytest.raises(KeyboardInterrupt):
        harness.write_results([row, row], env, 10.0, path)
    monkeypatch.setattr(json, "dump", dump)
    assert len(json.load(open(path))["rows"]) == 1
