"""benchmarks/variants.py: backend:setting rows grouped with their backend's default row,
fastest first, verdicts only outside the p20-p80 ranges, several files read as one, refusals."""
import json

import pytest

from benchmarks import variants


def _row(provider, median, spread=0.02, workload="dense-16k", graph_ms=None):
    return {"kernel": "varlen_attention", "mode": "fwd+bwd", "provider": provider, "workload": workload,
            "dtype": "bfloat16", "median_ms": median, "p20_ms": median * (1 - spread),
            "p80_ms": median * (1 + spread), "extra": {} if graph_ms is None else {"graph_ms": graph_ms}}


def _write(path, rows, device="NVIDIA H100 80GB HBM3"):
    path.write_text(json.dumps({"environment": {"device": device, "device_type": "cuda", "cpu_count": 16,
                                                "git_revision": "abc"}, "rows": rows}))
    return str(path)


def test_groups_fastest_first_with_the_default_marked(tmp_path, capsys):
    a = _write(tmp_path / "a.json", [_row("triton", 2.0), _row("triton:dq-separate", 2.02, graph_ms=1.9),
                                     _row("triton:dq-atomic", 1.5), _row("sdpa_padded", 9.0),
                                     _row("triton", 1.0, workload="mixed"), _row("sdpa_padded", 3.0, workload="mixed")])
    b = _write(tmp_path / "b.json", [_row("cuda:three-pass", 0.3, 0.5, workload="mixed"),
                                     _row("cuda", 0.25, 0.5, workload="mixed"),
                                     _row("triton:load-tma", 4.0, workload="dense-16k-causal")])
    out = tmp_path / "v.json"
    assert variants.main([a, b, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    groups = json.loads(out.read_text())["groups"]
    # the mixed triton group has no variant row; sdpa_padded is another backend; a lone variant
    # row (its siblings not timed) is a group of its own
    assert [(g["key"]["workload"], g["key"]["backend"]) for g in groups] == [
        ("dense-16k", "triton"), ("dense-16k-causal", "triton"), ("mixed", "cuda")]
    rows = groups[0]["rows"]
    assert [r["provider"] for r in rows] == ["triton:dq-atomic", "triton", "triton:dq-separate"]
    assert [r["verdict"] for r in rows] == ["fastest", "slower", "slower"]
    assert rows[1]["default"] and not rows[0]["default"]
    assert rows[1]["x_fastest"] == pytest.approx(2.0 / 1.5) and rows[2]["graph_ms"] == 1.9
    assert [r["provider"] for r in groups[1]["rows"]] == ["triton:load-tma"]
    assert [r["verdict"] for r in groups[2]["rows"]] == ["fastest", "~"]   # 1.2x, but the ranges overlap
    assert "triton (default)" in text and "3 groups of variant rows (backend:setting) among 9 rows" in text
    assert variants.main([a, b, "-k", "cuda", "--json", str(out)]) == 0
    assert "1 groups" in capsys.readouterr().out
    assert variants.main([a, b, "-k", "dq-atomic", "--json", str(out)]) == 0     # the whole group, siblings too
    capsys.readouterr()
    assert [[r["provider"] for r in g["rows"]] for g in json.loads(out.read_text())["groups"]] == [
        ["triton:dq-atomic", "triton", "triton:dq-separate"]]


def test_threshold():
    """Rows 1% apart with degenerate ranges (older CUDA results carried the median alone) are
    '~' under the default 2% and 'slower' under 0.5%."""
    rows = [_row("triton", 1.01, 0.0), _row("triton:dq-atomic", 1.0, 0.0)]
    assert [r["verdict"] for r in variants.variant_groups(rows)[0]["rows"]] == ["fastest", "~"]
    assert [r["verdict"] for r in variants.variant_groups(rows, threshold=0.005)[0]["rows"]] == ["fastest", "slower"]


def test_refusals(tmp_path, capsys):
    a = _write(tmp_path / "a.json", [_row("triton", 2.0), _row("triton:dq-atomic", 1.5)])
    with pytest.raises(SystemExit):
        variants.main([a, _write(tmp_path / "b.json", [_row("triton", 2.0)])])
    assert "varlen_attention fwd+bwd dense-16k bfloat16 triton appears in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        variants.main([a, _write(tmp_path / "c.json", [_row("cuda", 1.0)], device="NVIDIA H200")])
    assert "from another device than" in capsys.readouterr().err
