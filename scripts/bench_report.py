#!/usr/bin/env python
"""pytest-benchmark JSON -> the markdown table of docs/PERF.md.

    pytest bench/ --benchmark-json bench.json
    python scripts/bench_report.py bench.json --command "pytest bench/ --benchmark-json bench.json"

One row per case: test, variant, pass, shape, median ms, the op's floor at the H100's peak rates
with the bound that sets it and the median's percentage of it (from the case's ideal byte / FLOP /
transcendental counts, bench/common.py `floor`; "-" where the case has none), GB/s or TFLOP/s,
peak memory, speedup and notes (img/s and MFU of the training step, overhead of the class-patch map over SDPA). The
header line names the device, driver and clocks (from the cases' extra_info, bench/common.py
device_info), torch / triton versions where recorded, the date of the run and the command.

Speedup: a case's own `speedup_vs_reference` (the training step, measured in the same session)
when present; otherwise the baseline's median over this median, the baseline being the case of
the same test, pass and shape whose variant is `reference_eager`, `reference` or `explicit`.

Several JSON files (one per bench file, as scripts/gpu_check.sh writes them) are merged into one
table; `--merge-out` writes the merged JSON. `--junit` lists failed cases and skip reasons from
pytest's junit XML files, so a table made after a partly failed run says what is missing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Iterable, Optional, Sequence

BASELINES = ("reference_eager", "reference", "explicit")
COLUMNS = ("test", "variant", "pass", "shape", "median ms", "H100 floor ms", "% of floor", "GB/s or TFLOP/s",
           "peak MiB", "speedup", "notes")


# ---------------------------------------------------------------------------------- loading
def load(paths: Sequence[str], errors: Optional[list] = None) -> dict:
    """Read and merge pytest-benchmark JSON files (benchmarks concatenated, in file order).

    A file that cannot be read (pytest-benchmark leaves an empty one when no case ran) is left out
    and described in `errors` when a list is given; it raises ValueError otherwise, as does an
    input with no readable file at all."""
    merged: Optional[dict] = None
    dates = []
    for path in paths:
        try:
            data = json.loads(pathlib.Path(path).read_text())
            if not isinstance(data, dict) or "benchmarks" not in data:
                raise ValueError("not a pytest-benchmark JSON file (no 'benchmarks' key)")
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            if errors is None:
                raise ValueError(f"{path}: {err}") from None
            errors.append(f"{path}: {err}")
            continue
        if data.get("datetime"):
            dates.append(data["datetime"])
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "benchmarks"}
            merged["benchmarks"] = []
        merged["benchmarks"].extend(data["benchmarks"])
    if merged is None:
        raise ValueError("no readable benchmark JSON in the input")
    if dates:
        merged["datetime"] = min(dates)
        merged["datetime_last"] = max(dates)
    return merged


def junit_summary(paths: Iterable[str]) -> tuple[list[tuple[str, str]], Counter]:
    """(failed or errored cases with their first message line, skip reasons with counts)."""
    failed: list[tuple[str, str]] = []
    skipped: Counter = Counter()
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as err:
            failed.append((str(path), f"unreadable junit XML: {err}"))
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    message = (node.get("message") or node.text or tag).strip().splitlines()
                    failed.append((name, f"{tag}: {message[0][:200] if message else tag}"))
            node = case.find("skipped")
            if node is not None:
                reason = (node.get("message") or "").strip()
                skipped[reason[:160] or "(no reason)"] += 1
    return failed, skipped


# ---------------------------------------------------------------------------------- formatting
def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(x: float) -> str:
    """Four significant digits, no exponent for ordinary magnitudes."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def format_shape(shape) -> str:
    if not isinstance(shape, dict):
        return "" if shape is None else str(shape)
    parts = []
    for key, value in shape.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = "/".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def test_name(bench: dict) -> str:
    name = bench.get("name") or bench.get("fullname", "?")
    name = name.split("[", 1)[0]
    return name[5:] if name.startswith("test_") else name


def median_ms(bench: dict) -> Optional[float]:
    stats = bench.get("stats") or {}
    if stats.get("median") is not None:
        return float(stats["median"]) * 1e3
    value = (bench.get("extra_info") or {}).get("median_ms")
    return float(value) if value is not None else None


def _key(bench: dict) -> tuple:
    info = bench.get("extra_info") or {}
    return test_name(bench), info.get("pass_"), json.dumps(info.get("shape"), sort_keys=True)


def throughput(info: dict) -> str:
    parts = []
    if info.get("GB/s") is not None:
        parts.append(f"{_num(info['GB/s'])} GB/s")
    if info.get("TFLOP/s") is not None:
        parts.append(f"{_num(info['TFLOP/s'])} TFLOP/s")
    return "; ".join(parts)


def floor_cells(info: dict, ms: Optional[float]) -> tuple[str, str]:
    """("<floor ms> (<bound>)", "<median's % of the floor>"), "-" for what is unknown."""
    value = info.get("floor_ms")
    if value is None:
        return "-", "-"
    cell = f"{_num(value)} ({info['floor_bound']})" if info.get("floor_bound") else _num(value)
    return cell, (f"{_num(100.0 * value / ms)}%" if ms else "-")


def peak_memory(info: dict) -> str:
    if info.get("peak_mem_MiB") is not None:
        return f"{_num(info['peak_mem_MiB'])} (total)"
    if info.get("peak_extra_mem_MiB") is not None:
        return f"{_num(info['peak_extra_mem_MiB'])} (extra)"
    return "-"


def speedup(bench: dict, baselines: dict) -> str:
    info = bench.get("extra_info") or {}
    if "speedup_vs_reference" in info:
        value = info["speedup_vs_reference"]
        return f"{value:.2f}x vs reference" if value is not None else "n/a (no reference in the run)"
    if info.get("variant") in BASELINES:
        return "baseline"
    base = baselines.get(_key(bench))
    mine = median_ms(bench)
    if base is None or not mine:
        return "-"
    base_ms, base_variant = base
    return f"{base_ms / mine:.2f}x vs {base_variant}"


def notes(info: dict, threads=None) -> str:
    parts = []
    if info.get("device") == "cpu" and info.get("threads") is not None and info["threads"] != threads:
        parts.append(f"{info['threads']} CPU thread{'s' if info['threads'] != 1 else ''}")
    if info.get("img_per_s") is not None:
        parts.append(f"{_num(info['img_per_s'])} img/s")
    if info.get("MFU_pct") is not None:
        parts.append(f"MFU {info['MFU_pct']:.1f}%")
    if info.get("overhead_vs_sdpa_pct") is not None:
        parts.append(f"{info['overhead_vs_sdpa_pct']:+.1f}% vs sdpa")
    if info.get("compile") is not None and "img_per_s" in info:
        parts.append(f"compile {'on' if info['compile'] else 'off'}")
    if info.get("nonfinite_terms"):
        parts.append(f"non-finite: {','.join(info['nonfinite_terms'])}")
    return "; ".join(parts)


def _date(text: Optional[str]) -> str:
    if not text:
        return "unknown date"
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if when.tzinfo is not None:
        when = when.astimezone(_dt.timezone.utc)
        return when.strftime("%Y-%m-%d %H:%M UTC")
    return when.strftime("%Y-%m-%d %H:%M")


def header(data: dict, command: Optional[str]) -> str:
    infos = [b.get("extra_info") or {} for b in data["benchmarks"]]
    dev = next((i for i in infos if i.get("device")), {})
    device = dev.get("device", "unknown device")
    parts = []
    if device == "cpu":
        threads = dev.get("threads")
        parts.append(f"**Device**: CPU{f' ({threads} threads)' if threads else ''}")
    else:
        parts.append(f"**GPU**: {device}")
        if dev.get("driver"):
            parts.append(f"driver {dev['driver']}")
        if dev.get("sm_clock_mhz") is not None:
            top = f" (max {dev['max_sm_clock_mhz']})" if dev.get("max_sm_clock_mhz") is not None else ""
            parts.append(f"SM clock {dev['sm_clock_mhz']} MHz{top}")
        if dev.get("mem_clock_mhz") is not None:
            parts.append(f"memory clock {dev['mem_clock_mhz']} MHz")
        if dev.get("memory_total_MiB") is not None:
            parts.append(f"{dev['memory_total_MiB']} MiB")
        if dev.get("nvml_error"):
            parts.append(f"NVML: {dev['nvml_error']}")
    for lib in ("torch", "triton"):
        version = next((i[lib] for i in infos if i.get(lib)), None)
        if version:
            parts.append(f"{lib} {version}")
    date = _date(data.get("datetime"))
    last = data.get("datetime_last")
    if last and _date(last) != date:
        date = f"{date} to {_date(last)}"
    parts.append(f"date {date}")
    if command:
        parts.append(f"command `{command}`")
    return " | ".join(parts)


def render(data: dict, command: Optional[str] = None, failed: Sequence[tuple[str, str]] = (),
           skipped: Optional[Counter] = None) -> str:
    benches = data["benchmarks"]
    baselines: dict = {}
    for bench in benches:
        info = bench.get("extra_info") or {}
        variant = info.get("variant")
        if variant in BASELINES and median_ms(bench):
            key = _key(bench)
            # the first baseline in BASELINES order wins when a group has several
            old = baselines.get(key)
            if old is None or BASELINES.index(variant) < BASELINES.index(old[1]):
                baselines[key] = (median_ms(bench), variant)
    lines = [header(data, command), ""]
    first = next((b.get("extra_info") or {} for b in benches if (b.get("extra_info") or {}).get("device")), {})
    header_threads = first.get("threads")
    if benches:
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
        for bench in benches:
            info = bench.get("extra_info") or {}
            ms = median_ms(bench)
            row = (test_name(bench), info.get("variant", bench.get("param") or ""), info.get("pass_", ""),
                   format_shape(info.get("shape")), _num(ms) if ms is not None else "-",
                   *floor_cells(info, ms), throughput(info) or "-", peak_memory(info), speedup(bench, baselines),
                   notes(info, header_threads) or "")
            lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    else:
        lines.append("No benchmark results in the input.")
    if failed:
        lines += ["", f"**Failed or errored cases ({len(failed)})**, not in the table:", ""]
        lines += [f"- `{name}`: {_cell(msg)}" for name, msg in failed]
    if skipped:
        total = sum(skipped.values())
        lines += ["", f"Skipped cases ({total}):", ""]
        lines += [f"- {count} x {reason}" for reason, count in skipped.most_common()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    p.add_argument("--command", help="the command that produced the JSON, for the header line")
    p.add_argument("--junit", nargs="*", default=[], help="pytest --junitxml file(s): list failures and skips")
    p.add_argument("--merge-out", help="also write the merged JSON here")
    p.add_argument("--out", help="write the markdown here (default: stdout)")
    args = p.parse_args(argv)
    present = [path for path in args.json if pathlib.Path(path).is_file()]
    missing = [path for path in args.json if path not in present]
    for path in missing:
        print(f"bench_report: {path}: no such file (skipped)", file=sys.stderr)
    if not present:
        print("bench_report: no benchmark JSON to report", file=sys.stderr)
        return 1
    errors: list[str] = []
    try:
        data = load(present, errors)
    except ValueError as err:
        for line in errors:
            print(f"bench_report: {line} (skipped)", file=sys.stderr)
        print(f"bench_report: {err}", file=sys.stderr)
        return 1
    for line in errors:
        print(f"bench_report: {line} (skipped)", file=sys.stderr)
    failed, skipped = junit_summary([j for j in args.junit if pathlib.Path(j).is_file()])
    text = render(data, args.command, failed, skipped)
    if args.merge_out:
        pathlib.Path(args.merge_out).write_text(json.dumps(data, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
