"""The variant rows of benchmark results files side by side: the table a default is chosen from.

    python -m benchmarks.variants RESULTS.json [MORE.json ...] [-k TEXT] [--threshold 0.02]
                                  [--json OUT.json]

Some benchmarks time one backend under several settings and name the rows backend:setting
(varlen_attention's `triton:dq-separate` / `triton:dq-atomic` and `triton:load-pointers` /
`triton:load-tma`, adaln_norm's `triton:tile4096-per_sm8`, group_norm_silu's
`cuda:three-pass`, ...). This groups every row by (kernel, mode, workload, dtype, backend),
keeps the groups holding at least one such row, and prints each group fastest first: the
median, the p20-p80 range, graph_ms where the row has it (CUDA-graph replay: the device time
without the host's share), the time over the group's fastest, and whether that difference is
past --threshold (2%) with both rows' p20-p80 ranges apart (`slower`) or not (`~`: within the
noise of the runs; on CUDA the ranges are do_bench's quantiles). The
plain backend row, where the group has one, is what runs by default. Several files (one GPU
session's, say) are read as one; they must come from one device (compare.same_device), and a
row key found twice is refused with both files named.
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks import compare


def load_rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(rows, environments) of the files, read with compare.load; ValueError for files from
    different devices or a row key in two files."""
    rows, envs, where = [], [], {}
    for path in paths:
        data = compare.load(path)
        if envs and not compare.same_device(envs[0], data["environment"]):
            raise ValueError(f"{path}: from another device than {paths[0]} "
                             f"({data['environment'].get('device')} vs {envs[0].get('device')})")
        envs.append(data["environment"])
        for row in data["rows"]:
            key = tuple(row[k] for k in compare.KEY)
            if key in where:
                raise ValueError(f"{' '.join(map(str, key))} appears in {where[key]} and {path}")
            where[key] = path
            rows.append(row)
    return rows, envs


def variant_groups(rows: list[dict], match: str = "", threshold: float = 0.02) -> list[dict]:
    """Groups of rows by (kernel, mode, workload, dtype, backend) that hold a backend:setting
    row, each {"key": ..., "rows": [...]} with rows fastest first and, per row, x_fastest and
    a verdict against the fastest ('fastest'; 'slower' past the threshold with the p20-p80
    ranges apart, as compare.verdict; '~' otherwise). A group with one row (a variant whose
    siblings were not timed) is kept. `match` keeps the groups with a row whose key fields,
    joined with spaces, contain it (the whole group: `-k dq-atomic` shows its siblings too)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["kernel"], row["mode"], row["workload"], row["dtype"], row["provider"].split(":")[0])
        groups.setdefault(key, []).append(row)
    out = []
    for key in sorted(groups):
        members = groups[key]
        if not any(":" in r["provider"] for r in members) \
                or not any(match in " ".join(str(r[k]) for k in compare.KEY) for r in members):
            continue
        members = sorted(members, key=lambda r: r["median_ms"])
        best = members[0]
        out.append({"key": dict(zip(("kernel", "mode", "workload", "dtype", "backend"), key)), "rows": [
            {"provider": r["provider"], "default": ":" not in r["provider"], "median_ms": r["median_ms"],
             "p20_ms": r["p20_ms"], "p80_ms": r["p80_ms"], "graph_ms": (r.get("extra") or {}).get("graph_ms"),
             "x_fastest": r["median_ms"] / best["median_ms"],
             "verdict": "fastest" if r is best else ("slower" if compare.verdict(r, best, threshold) == "faster"
                                                     else "~")}
            for r in members]})
    return out


def format_groups(groups: list[dict]) -> str:
    head = ("kernel", "mode", "workload", "provider", "median ms", "p20-p80 ms", "graph ms", "x fastest", "")
    lines = []
    for g in groups:
        k = g["key"]
        for i, r in enumerate(g["rows"]):
            first = i == 0
            lines.append((k["kernel"] if first else "", k["mode"] if first else "", k["workload"] if first else "",
                          r["provider"] + (" (default)" if r["default"] else ""), compare.format_ms(r["median_ms"]),
                          f"{compare.format_ms(r['p20_ms'])}-{compare.format_ms(r['p80_ms'])}",
                          "-" if r["graph_ms"] is None else compare.format_ms(r["graph_ms"]), f"{r['x_fastest']:.2f}x",
                          r["verdict"]))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="results JSON files of one device")
    p.add_argument("-k", dest="match", default="", help="only rows whose kernel / mode / workload / dtype / provider "
                                                         "contain this text")
    p.add_argument("--threshold", type=float, default=0.02, help="relative difference below which rows are '~'")
    p.add_argument("--json", help="write the groups to this file")
    args = p.parse_args(argv)
    if not args.threshold >= 0:      # NaN too
        p.error(f"--threshold: expected a number >= 0, got {args.threshold}")
    try:
        rows, envs = load_rows(args.results)
    except ValueError as e:
        p.error(str(e))
    for path, env in zip(args.results, envs):
        print(compare._environment_line(path, env))
    groups = variant_groups(rows, args.match, args.threshold)
    if groups:
        print(format_groups(groups))
    print(f"{len(groups)} groups of variant rows (backend:setting) among {len(rows)} rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environments": dict(zip(args.results, envs)), "groups": groups}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
