"""benchmarks/compare.py: rows matched across two results files, verdicts only outside both
runs' p20-p80 ranges, unmatched rows listed, JSON out, exit status, refusals."""
import json
import re

import pytest

from benchmarks import compare


def _row(provider, median, spread=0.02, kernel="adaln_norm", workload="mixed"):
    return {"kernel": kernel, "mode": "fwd", "provider": provider, "workload": workload, "dtype": "float32",
            "median_ms": median, "p20_ms": median * (1 - spread), "p80_ms": median * (1 + spread)}


def _write(path, rows, device="x86_64", revision="abc", cpu_count=2):
    env = {"device": device, "device_type": "cpu", "cpu_count": cpu_count, "git_revision": revision}
    path.write_text(json.dumps({"environment": env, "rows": rows}))
    return str(path)


def test_verdicts_and_unmatched_rows(tmp_path, capsys):
    before = _write(tmp_path / "a.json", [_row("cpu", 10.0), _row("eager", 20.0), _row("compile", 5.0, 0.3),
                                          _row("triton", 1.0)])
    after = _write(tmp_path / "b.json", [_row("cpu", 8.0), _row("eager", 24.0), _row("compile", 4.0, 0.3),
                                         _row("reference", 3.0)], revision="def")
    out_json = tmp_path / "cmp.json"
    assert compare.main([before, after, "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "before: device x86_64 | git_revision abc" in text and "git_revision def" in text
    rows = {r["provider"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["cpu"]["verdict"] == "faster" and rows["cpu"]["speedup"] == pytest.approx(1.25)
    assert rows["eager"]["verdict"] == "slower"
    assert rows["compile"]["verdict"] == "~"           # 1.25x, but the p20-p80 ranges overlap
    assert "3 rows: 1 faster, 1 slower, 1 within noise" in text
    assert "only before: adaln_norm fwd mixed float32 triton" in text
    assert "only after: adaln_norm fwd mixed float32 reference" in text
    assert compare.main([before, after, "--fail-on-regression"]) == 1
    assert compare.main([before, after, "--fail-on-regression", "-k", "cpu"]) == 0
    capsys.readouterr()


def test_threshold():
    before, after = _row("cpu", 10.0, 0.001), _row("cpu", 9.7, 0.001)
    assert compare.verdict(before, after, 0.05) == "~"
    assert compare.verdict(before, after, 0.01) == "faster"


def test_refusals(tmp_path, capsys):
    a = _write(tmp_path / "a.json", [_row("cpu", 1.0)])
    b = _write(tmp_path / "b.json", [_row("cpu", 1.0)], device="NVIDIA H100 80GB HBM3")
    with pytest.raises(SystemExit):
        compare.main([a, b])
    assert "different devices (('x86_64', 'cpu', 2), ('NVIDIA H100 80GB HBM3', 'cpu', 2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):               # same name, another machine
        compare.main([a, _write(tmp_path / "c.json", [_row("cpu", 1.0)], cpu_count=16)])
    assert "('x86_64', 'cpu', 16): name, type, cores); --any-device" in capsys.readouterr().err
    assert compare.main([a, b, "--any-device"]) == 0
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        compare.main([a, str(tmp_path / "bad.json")])
    assert "bad.json: expected a benchmark results file with 'environment' and 'rows'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([a, str(tmp_path / "missing.json")])
    assert "missing.json: expected a benchmark results JSON file" in capsys.readouterr().err
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            compare.main([a, a, "--threshold", bad])
        assert "--threshold: expected a number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("rows,message", [
    ([_row("cpu", 1.0), _row("cpu", 2.0)], r"row 1: adaln_norm fwd mixed float32 cpu appears twice"),
    ([{**_row("cpu", 1.0), "median_ms": 0.0}], r"row 0: expected .* 0 < p20_ms <= median_ms <= p80_ms"),
    ([{**_row("cpu", 1.0), "p80_ms": None}], r"row 0: expected"),
    ([{k: v for k, v in _row("cpu", 1.0).items() if k != "provider"}], r"row 0: expected kernel, mode"),
    (["not a row"], r"row 0: expected"),
])
def test_bad_rows_refused(tmp_path, capsys, rows, message):
    """Rows a verdict cannot rest on (a zero or missing time, a key twice, a missing field) are
    refused with the file and row named, not compared or silently dropped."""
    good = _write(tmp_path / "good.json", [_row("cpu", 1.0)])
    with pytest.raises(SystemExit):
        compare.main([good, _write(tmp_path / "bad.json", rows)])
    assert re.search(message, capsys.readouterr().err)
