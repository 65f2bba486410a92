"""Runs the benchmark suite: `python -m benchmarks.run [--quick] [--profile] [pytest args]`.

Prints a results table and writes benchmarks/results/<device>.json (device name, versions,
git revision, timestamp, one row per op / provider / workload).
"""
import os
import sys

import pytest

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    args = [here, "-o", "python_files=bench_*.py", "-p", "no:cacheprovider", "-q",
            "--benchmark-disable-gc", "--benchmark-sort=name", "--benchmark-columns=median,iqr,rounds",
            # On CUDA the suite times with do_bench, not pytest-benchmark's fixture.
            "-W", "ignore:Benchmark fixture was not used"]
    sys.exit(pytest.main(args + sys.argv[1:]))
