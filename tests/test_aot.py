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


# ---------------------------------------------------------------- no compile: the helpers
def test_aot_kernel_specializes_as_the_jit():
    """Integers equal to 1 become constexprs, multiples of 16 carry divisibility 16, pointers
    are aligned; every argument of the kernel must be given."""
    from kernels import affinity
    from kernels._launch import aot_kernel

    args = dict(x_ptr="*bf16", rn_ptr="*fp32", R=3136, N=784, D=768, sxb=808 * 768, sxn=768, sxd=1, eps=1e-8,
                BLOCK_R=8, BLOCK_D=256)
    cfg = aot_kernel("rownorm", affinity._affinity_rownorm_kernel, args, 4, 3)
    names = list(cfg.signature)
    assert cfg.signature["sxd"] == "constexpr" and cfg.constexprs["sxd"] == 1
    assert cfg.signature["eps"] == "fp32" and cfg.signature["x_ptr"] == "*bf16" and cfg.signature["N"] == "i32"
    div16 = {names[i[0]] for i in cfg.attrs}
    assert div16 == {"x_ptr", "rn_ptr", "R", "N", "D", "sxb", "sxn"}
    with pytest.raises(ValueError, match="^args: rownorm misses"):
        aot_kernel("rownorm", affinity._affinity_rownorm_kernel, {k: v for k, v in args.items() if k != "eps"}, 4, 3)


def test_ctas_per_sm():
    sys.path.insert(0, str(ROOT / "scripts"))
    import aot_report

    assert aot_report.ctas_per_sm(90, 255, 0, 8) == 1  # 255 -> 256 registers a thread, 256 threads
    assert aot_report.ctas_per_sm(90, 32, 0, 4) == 16  # threads: 2048 / 128
    assert aot_report.ctas_per_sm(90, 64, 100 * 1024, 4) == 2  # shared memory: 228 KB / 101 KB
    assert aot_report.ctas_per_sm(80, 64, 100 * 1024, 4) == 1  # 164 KB / 101 KB
    assert aot_report.ctas_per_sm(80, 64, 200 * 1024, 4) == 0  # over sm_80's 163 KB a block


def test_precision_policy():
    import torch

    from kernels._launch import dot_config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    # half operands: native on a GPU; under the interpreter only bf16 is upcast
    assert dot_config(bf16, cuda, "tf32x3", cuda=True) == (False, "tf32")
    assert dot_config(fp16, cuda, "ieee", cuda=True) == (False, "tf32")
    assert dot_config(bf16, cpu, "tf32x3") == (True, "ieee")
    assert dot_config(fp16, cpu, "tf32x3") == (False, "ieee")
    # fp32: the op's choice on a GPU, IEEE under the interpreter
    assert dot_config(fp32, cuda, "tf32x3", cuda=True) == (False, "tf32x3")
    assert dot_config(fp32, cuda, "ieee", cuda=True) == (False, "ieee")
    assert dot_config(fp32, cpu, "tf32x3") == (False, "ieee")
    # mixed and fp64-in-fp32: upcast, the fp32 choice; fp64 compute: IEEE in fp64
    assert dot_config((fp32, fp16), cuda, "tf32x3", cuda=True) == (True, "tf32x3")
    assert dot_config(fp64, cuda, "tf32x3", cuda=True) == (True, "tf32x3")
    assert dot_config(fp64, cuda, "ieee", compute=fp64, cuda=True) == (False, "ieee")
    with pytest.raises(ValueError, match="^mode:"):
        from kernels._launch import f32_precision

        f32_precision(cpu, "tf32")
