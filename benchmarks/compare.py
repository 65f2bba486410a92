"""Compares two benchmark results files (what `make bench` / `python -m benchmarks.run` write):

    python -m benchmarks.compare BEFORE.json AFTER.json [-k TEXT] [--threshold 0.05]
                                 [--json OUT.json] [--fail-on-regression] [--any-device]

Rows are matched by (kernel, mode, workload, dtype, provider). For each pair it prints both
medians and the speedup before / after (above 1: faster), and calls the change `faster` or
`slower` only when it passes the threshold and the two runs' p20-p80 ranges do not overlap;
anything else is `~` (within the noise of the runs). Rows found in one file only are listed
after the table. Both files' environments (device, revision, torch, triton, time) head the
output. Files from different devices (name, type or core count) are refused unless
--any-device; a row without its key fields or with times not 0 < p20 <= median <= p80, or a key
twice in one file, is refused with the file and row named. --json writes the
matched rows, machine-readable; --fail-on-regression exits 1 when a row is `slower` (for CI
or a bisect script).
"""
from __future__ import annotations

import argparse
import json
import sys

KEY = ("kernel", "mode", "workload", "dtype", "provider")


def load(path: str) -> dict:
    """A results file: {"environment": {...}, "rows": [...]}, each row with the key fields and
    0 < p20_ms <= median_ms <= p80_ms, no key twice; ValueError naming the path (and row) if not."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected a benchmark results JSON file ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) \
            or not isinstance(data.get("environment"), dict):
        raise ValueError(f"{path}: expected a benchmark results file with 'environment' and 'rows'")
    seen = set()
    for i, row in enumerate(data["rows"]):
        times = [row.get(k) for k in ("p20_ms", "median_ms", "p80_ms")] if isinstance(row, dict) else []
        if not isinstance(row, dict) or any(k not in row for k in KEY) \
                or not all(isinstance(t, (int, float)) for t in times) or not 0 < times[0] <= times[1] <= times[2]:
            raise ValueError(f"{path}: row {i}: expected {', '.join(KEY)} and 0 < p20_ms <= median_ms <= p80_ms, "
                             f"got {row!r}"[:400])
        key = tuple(row[k] for k in KEY)
        if key in seen:
            raise ValueError(f"{path}: row {i}: {' '.join(map(str, key))} appears twice")
        seen.add(key)
    return data


def same_device(a: dict, b: dict) -> bool:
    """Whether two environments are one device: its name, type and (CPUs) core count."""
    return all(a.get(k) == b.get(k) for k in ("device", "device_type", "cpu_count"))


def verdict(before: dict, after: dict, threshold: float) -> str:
    """'faster', 'slower' or '~': past the threshold and outside both runs' p20-p80 ranges."""
    speedup = before["median_ms"] / after["median_ms"]
    if speedup > 1 + threshold and after["p80_ms"] < before["p20_ms"]:
        return "faster"
    if speedup < 1 / (1 + threshold) and after["p20_ms"] > before["p80_ms"]:
        return "slower"
    return "~"


def compare(before: dict, after: dict, threshold: float = 0.05, match: str = "") -> tuple[list[dict], list, list]:
    """(matched rows, keys only before, keys only after), rows filtered by `match` (a substring
    of the key's fields joined with spaces)."""
    def index(data):
        rows = {tuple(r[k] for k in KEY): r for r in data["rows"]}
        return {k: r for k, r in rows.items() if match in " ".join(map(str, k))}
    b, a = index(before), index(after)
    matched = []
    for key in sorted(b.keys() & a.keys()):
        rb, ra = b[key], a[key]
        matched.append({**dict(zip(KEY, key)), "before_ms": rb["median_ms"], "after_ms": ra["median_ms"],
                        "speedup": rb["median_ms"] / ra["median_ms"], "verdict": verdict(rb, ra, threshold)})
    return matched, sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())


def _environment_line(name: str, env: dict) -> str:
    fields = ("device", "git_revision", "torch", "triton", "timestamp")
    return f"{name}: " + " | ".join(f"{k} {env.get(k)}" for k in fields)


def format_ms(x: float) -> str:
    """Milliseconds as the comparison tables print them (4 significant digits; 0.1 from 1000 up)."""
    return f"{x:.1f}" if x >= 1000 else f"{x:.4g}"


def format_comparison(matched: list[dict]) -> str:
    head = ("kernel", "mode", "workload", "dtype", "provider", "before ms", "after ms", "speedup", "")
    lines = [(m["kernel"], m["mode"], m["workload"], m["dtype"], m["provider"], format_ms(m["before_ms"]),
              format_ms(m["after_ms"]), f"{m['speedup']:.2f}x", m["verdict"]) for m in matched]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("-k", dest="match", default="", help="only rows whose kernel / mode / workload / dtype / provider "
                                                         "contain this text")
    p.add_argument("--threshold", type=float, default=0.05, help="relative change below which rows are '~'")
    p.add_argument("--json", help="write the matched rows to this file")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a row is 'slower'")
    p.add_argument("--any-device", action="store_true", help="compare files from different devices")
    args = p.parse_args(argv)
    if not args.threshold >= 0:      # NaN too
        p.error(f"--threshold: expected a number >= 0, got {args.threshold}")
    try:
        before, after = load(args.before), load(args.after)
    except ValueError as e:
        p.error(str(e))
    if not same_device(before["environment"], after["environment"]) and not args.any_device:
        devices = [tuple(d["environment"].get(k) for k in ("device", "device_type", "cpu_count"))
                   for d in (before, after)]
        p.error(f"the files are from different devices ({devices[0]}, {devices[1]}: name, type, cores); "
                f"--any-device to compare")
    matched, only_before, only_after = compare(before, after, args.threshold, args.match)
    print(_environment_line("before", before["environment"]))
    print(_environment_line("after ", after["environment"]))
    print(format_comparison(matched))
    counts = {v: sum(m["verdict"] == v for m in matched) for v in ("faster", "slower", "~")}
    print(f"{len(matched)} rows: {counts['faster']} faster, {counts['slower']} slower, {counts['~']} within noise "
          f"(threshold {args.threshold:.0%}, p20-p80 ranges apart)")
    for name, keys in (("only before", only_before), ("only after", only_after)):
        for key in keys:
            print(f"{name}: " + " ".join(map(str, key)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": before["environment"], "after": after["environment"], "rows": matched}, f, indent=1)
    return 1 if args.fail_on_regression and counts["slower"] else 0


if __name__ == "__main__":
    sys.exit(main())
