"""pytest plumbing for the benchmark suite: options, the shared result list, the
closing table and the JSON file under benchmarks/results/."""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import harness


def pytest_addoption(parser):
    parser.addoption("--profile", action="store_true",
                     help="also write a torch profiler trace per case to benchmarks/results/*.trace.json")
    parser.addoption("--quick", action="store_true", help="fewer rounds (a smoke run, not for publishing)")
    parser.addoption("--results", default=None, help="results JSON path (default: benchmarks/results/<device>.json)")


class Suite:
    def __init__(self, config):
        self.device = harness.bench_device()
        harness.steady_malloc()  # steady allocation costs for every provider (harness.MALLOC_SETTINGS)
        self.quick = config.getoption("--quick")
        self.profile = config.getoption("--profile")
        self.rows: list[harness.Row] = []
        self.results_arg = config.getoption("--results")

    def copy_bw(self) -> float:
        return harness.copy_bandwidth_gbps(self.device, self.quick)

    def run(self, kernel: str, mode: str, provider: str, workload: str, fn, bytes_moved: int, dtype: torch.dtype,
            benchmark=None, flops: int = 0, rounds: int | None = None, graph: bool = False, **extra) -> harness.Row:
        """Times fn, records a row, and writes a profiler trace with --profile. `flops`, for
        compute-bound ops, adds TFLOP/s to the row. `graph` (CUDA): also the device time
        without the host's share (harness.graph_time_ms) as extra graph_ms and
        graph_frac_copy_bw, or graph_error when fn cannot be captured; where median_ms is well
        above graph_ms the call is bound by its Python and launch overhead, not its kernels."""
        t = harness.measure(fn, self.device, benchmark, self.quick, rounds)
        if graph and self.device.type == "cuda":
            try:
                graph_ms = harness.graph_time_ms(fn, self.quick)
                extra.update(graph_ms=graph_ms,
                             graph_frac_copy_bw=bytes_moved / (graph_ms * 1e-3) / 1e9 / self.copy_bw())
            except Exception as e:  # noqa: BLE001 - recorded in the row: capture fails in many ways
                extra.update(graph_error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        gbps = bytes_moved / (t.median_ms * 1e-3) / 1e9
        row = harness.Row(kernel, mode, provider, workload, str(dtype).replace("torch.", ""), t.median_ms, t.p20_ms,
                          t.p80_ms, bytes_moved, gbps, gbps / self.copy_bw(), extra, flops,
                          flops / (t.median_ms * 1e-3) / 1e12)
        self.rows.append(row)
        self.write()  # after every row, so a run cut short keeps what it measured
        if self.profile:
            self._trace(f"{kernel}-{mode}-{provider}-{workload}", fn)
        return row

    def write(self) -> str:
        self.results_path = harness.write_results(self.rows, harness.environment(self.device), self.copy_bw(),
                                                  self.results_arg)
        return self.results_path

    def _trace(self, name: str, fn) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        os.makedirs(harness.RESULTS_DIR, exist_ok=True)
        prof.export_chrome_trace(os.path.join(harness.RESULTS_DIR, f"{name}.trace.json"))


_SUITE: Suite | None = None


@pytest.fixture(scope="session")
def suite(request) -> Suite:
    global _SUITE
    if _SUITE is None:
        _SUITE = Suite(request.config)
    return _SUITE


def pytest_sessionfinish(session, exitstatus):
    if _SUITE is None or not _SUITE.rows:
        return
    env = harness.environment(_SUITE.device)
    path = _SUITE.write()
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    text = (f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | rev {env['git_revision']}\n"
            f"measured copy bandwidth: {_SUITE.copy_bw():.1f} GB/s (read + write)\n"
            + harness.format_table(_SUITE.rows) + f"\n\nresults written to {os.path.relpath(path, harness.ROOT)}\n")
    if tr is not None:
        tr.write_line(text)
    else:
        print(text)
