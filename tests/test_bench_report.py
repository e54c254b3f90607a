"""scripts/bench_report.py on small hand-made pytest-benchmark JSON (no benchmark runs)."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "scripts" / "bench_report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

GPU = dict(device="NVIDIA H100 80GB HBM3", driver="550.54.15", sm_clock_mhz=1980, max_sm_clock_mhz=1980,
           mem_clock_mhz=2619, memory_total_MiB=81559)
OP_SHAPE = dict(B=4, N=784, D=768, dtype="float32")


def _bench(name, median_s, **info):
    return {"name": name, "fullname": f"bench/x.py::{name}", "param": None, "params": None,
            "stats": {"median": median_s, "min": median_s, "max": median_s, "rounds": 3},
            "extra_info": info}


def _file(tmp_path, fname, benchmarks, when="2026-01-02T03:04:05.000000+00:00"):
    path = tmp_path / fname
    path.write_text(json.dumps({"machine_info": {"node": "x"}, "commit_info": {}, "datetime": when,
                                "version": "5.2.3", "benchmarks": benchmarks}))
    return path


@pytest.fixture
def gpu_json(tmp_path):
    op = [
        _bench("test_affinity_loss[reference_eager-784]", 0.010, variant="reference_eager", pass_="fwd+bwd",
               shape=OP_SHAPE, **{"GB/s": 12.5}, peak_extra_mem_MiB=40.0, **GPU),
        _bench("test_affinity_loss[reference_compiled-784]", 0.004, variant="reference_compiled", pass_="fwd+bwd",
               shape=OP_SHAPE, **{"GB/s": 31.25}, peak_extra_mem_MiB=20.0, **GPU),
        _bench("test_affinity_loss[fused-784]", 0.001, variant="fused", pass_="fwd+bwd", shape=OP_SHAPE,
               **{"GB/s": 125.0, "TFLOP/s": 2.5}, peak_extra_mem_MiB=1.5, floor_ms=0.25, floor_bound="memory",
               **GPU),
        # another pass of the same shape: its own group, no baseline there
        _bench("test_affinity_loss[fused-784-fwd]", 0.0005, variant="fused", pass_="fwd", shape=OP_SHAPE, **GPU),
    ]
    step_shape = dict(backbone="vit_base_patch16_224", B=4, crop=448, scales=[1.0, 0.5, 0.75, 1.5])
    steps = [
        _bench("test_train_step[reference]", 0.5, variant="reference", pass_="train_step", shape=step_shape,
               img_per_s=8.0, MFU_pct=1.43, peak_mem_MiB=30000.0, compile=False, torch="2.11.0", triton="3.6.0",
               **{"TFLOP/s": 14.15}, **GPU),
        _bench("test_train_step[fast]", 0.025, variant="fast", pass_="train_step", shape=step_shape,
               img_per_s=160.0, MFU_pct=28.6, peak_mem_MiB=9000.0, compile=True, speedup_vs_reference=20.0,
               **{"TFLOP/s": 283.0}, **GPU),
    ]
    return _file(tmp_path, "ops.json", op), _file(tmp_path, "step.json", steps, "2026-01-02T03:10:00+00:00")


def _rows(text):
    return [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| test ", "| ---"))]


def _cells(row):
    return [c.strip() for c in row.strip("|").split(" | ")]


def test_table_rows_speedups_and_header(gpu_json):
    data = report.load([str(p) for p in gpu_json])
    text = report.render(data, command="bash scripts/gpu_check.sh")
    head = text.splitlines()[0]
    for piece in ("NVIDIA H100 80GB HBM3", "driver 550.54.15", "SM clock 1980 MHz (max 1980)",
                  "memory clock 2619 MHz", "torch 2.11.0", "triton 3.6.0", "2026-01-02 03:04 UTC",
                  "to 2026-01-02 03:10 UTC", "`bash scripts/gpu_check.sh`"):
        assert piece in head, (piece, head)
    rows = _rows(text)
    assert len(rows) == 6  # one per case, in input order
    header_cells = _cells([line for line in text.splitlines() if line.startswith("| test ")][0])
    assert header_cells == list(report.COLUMNS)
    eager, compiled, fused, fused_fwd, ref_step, fast_step = (_cells(r) for r in rows)
    assert eager[:5] == ["affinity_loss", "reference_eager", "fwd+bwd", "B=4 N=784 D=768 dtype=float32", "10"]
    assert eager[7] == "12.5 GB/s" and eager[8] == "40 (extra)" and eager[9] == "baseline"
    assert compiled[9] == "2.50x vs reference_eager"
    assert fused[7] == "125 GB/s; 2.5 TFLOP/s" and fused[8] == "1.5 (extra)"
    assert fused[9] == "10.00x vs reference_eager"
    assert fused[5:7] == ["0.25 (memory)", "25%"]  # 0.25 ms floor over the 1 ms median
    assert eager[5:7] == ["-", "-"]  # no floor recorded: unknown, not zero
    assert fused_fwd[9] == "-" and fused_fwd[7] == "-" and fused_fwd[8] == "-"
    assert ref_step[9] == "baseline" and ref_step[8] == "30,000 (total)"
    assert fast_step[4] == "25" and fast_step[9] == "20.00x vs reference"
    assert "160 img/s" in fast_step[10] and "MFU 28.6%" in fast_step[10] and "compile on" in fast_step[10]
    assert "scales=1.0/0.5/0.75/1.5" in fast_step[3]


def test_cpu_header_overhead_note_and_missing_reference(tmp_path):
    cpu = dict(device="cpu", threads=2)
    shape = dict(crop=64, dtype="float32")
    path = _file(tmp_path, "cpu.json", [
        _bench("test_vit_forward[explicit-64]", 0.004, variant="explicit", pass_="fwd", shape=shape, **cpu),
        _bench("test_vit_forward[sdpa-64]", 0.002, variant="sdpa", pass_="fwd", shape=shape, **cpu),
        _bench("test_vit_forward[sdpa+extract-64]", 0.0021, variant="sdpa+extract", pass_="fwd", shape=shape,
               overhead_vs_sdpa_pct=5.0, **cpu),
        _bench("test_train_step[fast]", 2.0, variant="fast", pass_="train_step", shape={"B": 2},
               speedup_vs_reference=None, **dict(cpu, threads=1)),
    ])
    text = report.render(report.load([str(path)]))
    assert text.startswith("**Device**: CPU (2 threads) | date 2026-01-02 03:04 UTC")
    assert "command" not in text.splitlines()[0]
    explicit, sdpa, extract, fast = (_cells(r) for r in _rows(text))
    assert sdpa[9] == "2.00x vs explicit"
    assert extract[10] == "+5.0% vs sdpa"
    assert fast[9] == "n/a (no reference in the run)"
    assert fast[10] == "1 CPU thread" and explicit[10] == ""


def test_pipes_escaped_and_empty_input(tmp_path):
    path = _file(tmp_path, "odd.json", [
        _bench("test_x[a|b]", 0.001, variant="a|b", pass_="fwd", shape={"k": "x|y"}, device="cpu")])
    rows = _rows(report.render(report.load([str(path)])))
    assert "a\\|b" in rows[0] and "x\\|y" in rows[0]
    empty = _file(tmp_path, "empty.json", [])
    assert "No benchmark results" in report.render(report.load([str(empty)]))


def test_junit_failures_and_skips(tmp_path, gpu_json):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="bench.test_gcr" name="test_gcr[fused]"><failure message="AssertionError: bad&#10;more"/>'
        '</testcase>'
        '<testcase classname="bench.test_par" name="test_par[a]"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="bench.test_par" name="test_par[b]"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="bench.test_par" name="test_par[c]"/>'
        '</testsuite></testsuites>')
    failed, skipped = report.junit_summary([str(junit), str(tmp_path / "missing.xml")])
    assert failed[0] == ("bench.test_gcr::test_gcr[fused]", "failure: AssertionError: bad")
    assert "unreadable" in failed[1][1]
    assert skipped == {"needs CUDA": 2}
    text = report.render(report.load([str(gpu_json[0])]), failed=failed[:1], skipped=skipped)
    assert "**Failed or errored cases (1)**" in text and "`bench.test_gcr::test_gcr[fused]`" in text
    assert "- 2 x needs CUDA" in text


def test_main_merges_writes_and_reports_missing(tmp_path, gpu_json, capsys):
    out, merged = tmp_path / "table.md", tmp_path / "merged.json"
    rc = report.main([str(gpu_json[0]), str(gpu_json[1]), str(tmp_path / "absent.json"),
                      "--command", "pytest bench/", "--out", str(out), "--merge-out", str(merged)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "absent.json: no such file" in captured.err
    assert captured.out == out.read_text()
    assert len(json.loads(merged.read_text())["benchmarks"]) == 6
    assert report.main([str(tmp_path / "absent.json")]) == 1
    bad, empty = tmp_path / "bad.json", tmp_path / "empty.json"
    bad.write_text('{"x": 1}')
    empty.write_text("")  # what pytest-benchmark leaves when no case ran
    assert report.main([str(bad)]) == 1
    with pytest.raises(ValueError, match="no 'benchmarks' key"):
        report.load([str(bad)])
    capsys.readouterr()
    assert report.main([str(empty), str(gpu_json[1])]) == 0
    captured = capsys.readouterr()
    assert "empty.json" in captured.err and "(skipped)" in captured.err
    assert len(_rows(captured.out)) == 2


# ------------------------------------------------------------------ bench/common.py floors
def _common():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_floor_is_the_slowest_of_the_three_rates():
    common = _common()
    assert common.floor() == {}
    mem = common.floor(nbytes=3.35e9)  # 3.35 GB at 3.35 TB/s
    assert mem["floor_bound"] == "memory" and mem["floor_ms"] == pytest.approx(1.0)
    both = common.floor(nbytes=3.35e9, flops=2 * 989e9)
    assert both["floor_bound"] == "compute" and both["floor_ms"] == pytest.approx(2.0)
    mufu = common.floor(nbytes=3.35e9, flops=989e9, transcendentals=3e-3 * 16 * 132 * 1.83e9)
    assert mufu["floor_bound"] == "mufu" and mufu["floor_ms"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="non-negative memory count"):
        common.floor(nbytes=-1.0)


def test_measure_records_floor_and_percentage():
    """measure() with a stand-in for pytest-benchmark's fixture: the floor, its bound and the
    median's percentage of it land in extra_info (what the report's two columns read)."""
    import types

    common = _common()
    calls = []

    class FakeBenchmark:
        extra_info: dict = {}
        stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=2e-3))

        def pedantic(self, fn, rounds, iterations, warmup_rounds):
            calls.append(rounds)
            return fn()

    bench = FakeBenchmark()
    bench.extra_info = {}
    common.measure(bench, lambda: 1, variant="fused", pass_="fwd", shape={"n": 1},
                   nbytes=3.35e9, flops=1e9, rounds=1, warmup=0)
    info = bench.extra_info
    assert calls == [1]
    assert info["floor_bound"] == "memory" and info["floor_ms"] == pytest.approx(1.0)
    assert info["pct_of_floor"] == pytest.approx(50.0)  # 1 ms floor, 2 ms median
    assert info["GB/s"] == pytest.approx(1675.0)
    row = _cells(_rows(report.render({"benchmarks": [_bench("test_x", 2e-3, **info)]}))[0])
    assert row[5:7] == ["1 (memory)", "50%"]


# ------------------------------------------------------------------ scripts/gpu_check.sh (no GPU work)
def test_gpu_check_script_parses():
    import subprocess

    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_gpu_check_stops_without_cuda(tmp_path):
    """Without a GPU it prints the versions and stops with exit 2, leaving its console log."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the script would run the whole check")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_SKIP="install")
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "torch " in proc.stdout
    assert (tmp_path / "gpu_check.log").read_text().count("stopping") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log"]
