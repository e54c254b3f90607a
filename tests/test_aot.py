"""Ahead-of-time compiles (scripts/aot_report.py) of a representative subset of the kernels, for
sm_90 and sm_80, without a GPU: no register spills on sm_90, tensor-core dots on native
half-precision operands, the fp32 choice of the precision policy in the PTX.

The report runs in a subprocess: it compiles for a GPU, so the Triton interpreter that
tests/conftest.py turns on here must be off there (before triton is imported).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# the backward of L_ptc (fp32 tokens, as training feeds it, and bf16), the logits of L_cre
# (bf16) and GCR's per-row backward (bf16): the largest register users and each MMA path
KERNELS = ("affinity_bwd", "lir_logits", "gcr_bwd_rows")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "aot_report.py"), "--cases", "voc", "--modules", "affinity", "lir",
           "gcr", "--kernels", *KERNELS, "--json", str(out), "--jobs", "2"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def _row(rows, kernel, dtype, cc):
    found = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype and r["cc"] == cc]
    assert len(found) == 1, (kernel, dtype, cc, rows)
    return found[0]


def test_every_kernel_compiled_for_both_targets(rows):
    got = {(r["kernel"], r["dtype"], r["cc"]) for r in rows}
    want = {(k, dt, cc) for k, dts in (("affinity_bwd", ("fp32", "bf16")), ("lir_logits", ("fp32", "bf16")),
                                          ("gcr_bwd_rows", ("bf16",))) for dt in dts for cc in (80, 90)}
    assert got == want
    assert all("error" not in r and r["regs"] > 0 for r in rows), rows


def test_no_spills_on_sm90(rows):
    spilled = [r for r in rows if r["cc"] == 90 and r["spill"] != 0]
    assert not spilled, spilled


def test_no_spills_on_sm80(rows):
    spilled = [r for r in rows if r["cc"] == 80 and r["spill"] != 0]
    assert not spilled, spilled


def test_half_operands_go_to_the_tensor_cores_natively(rows):
    assert "wgmma bf16" in _row(rows, "affinity_bwd", "bf16", 90)["mma"]
    assert "mma.sync bf16" in _row(rows, "affinity_bwd", "bf16", 80)["mma"]
    for cc in (80, 90):
        assert _row(rows, "lir_logits", "bf16", cc)["mma"].endswith("bf16")  # no tf32: no upcast


def test_fp32_dots_follow_the_policy(rows):
    # affinity and LIR: 3xTF32 on the tensor cores for fp32 tokens
    assert "tf32" in _row(rows, "lir_logits", "fp32", 90)["mma"]
    assert "tf32" in _row(rows, "affinity_bwd", "fp32", 80)["mma"]


def test_blocks_fit_on_an_sm(rows):
    assert all(r["ctas"] >= 1 for r in rows), rows
