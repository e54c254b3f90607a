"""dense_energy_loss (L_reg) alone: reference eager, reference compiled, fused (and, on CUDA, the
fused kernel's deterministic mode); forward and forward+backward. Plus, on any machine, the
predicted H100 time of the old and the new forward kernel from their compiled inner loops
(`test_predicted_h100_time`, `python bench/test_energy.py --predict`).

Production shape: L_reg runs at half the 448 crop, so B = 4 images of 224 x 224, C = 21 (VOC
classes + background), fp32 probabilities, sigma_rgb = 15, sigma_xy = 50. The exact Gaussian
touches every pixel pair: B * (HW)^2 = 1.0e10 pairs, each an exponential plus a C-wide
multiply-add, which is an attention with head size 5 and value size C.

On the CPU the production shape (1e10 exponentials per call, minutes on 2 cores) skips with
that reason, and a CPU stand-in shape (B = 4, 32 x 32, C = 21) runs the reference variants
instead, marked `cpu_standin` in its shape.
"""
import collections
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from common import DEVICE, VARIANTS, fwd_bwd, measure, op_variant

B, C, SIZE = 4, 21, 224
SIGMA_RGB, SIGMA_XY = 15.0, 50.0
CPU_STANDIN_SIZE = 32
CASES = [("production", SIZE)]
if DEVICE.type != "cuda":
    CASES.append(("cpu_standin", CPU_STANDIN_SIZE))


def _ideal_bytes(hw: int, backward: bool) -> float:
    """fp32 image, probs and gate read once and AS (fp32) written once; the backward reads AS
    and writes grad_probs."""
    fwd = B * (3 + C + 1) * hw * 4 + B * C * hw * 4
    return fwd + (2 * B * C * hw * 4 if backward else 0)


def _flops(hw: int) -> float:
    """Per pixel pair: 5 differences, 5 multiply-adds and a scale for the distance (~16 with the
    exponential counted as one), and 2C for the weighted sum over the C channels."""
    return B * float(hw) * hw * (16 + 2 * C)


@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("case, size", CASES, ids=[f"{n}-{s}x{s}" for n, s in CASES])
@pytest.mark.parametrize("variant", VARIANTS + ("fused_deterministic",))
def test_dense_energy_loss(benchmark, variant, case, size, pass_):
    if DEVICE.type != "cuda" and not variant.startswith("fused") and case == "production":
        pytest.skip("the reference at 4 x 224 x 224 evaluates 1e10 exponentials per call: minutes "
                    "on the CPU (the cpu_standin case runs instead)")
    # fused_deterministic: every tile pair from both sides, no atomics (what
    # torch.use_deterministic_algorithms(True) selects), to weigh the atomics of the default
    fn = op_variant("dense_energy_loss", "fused" if variant == "fused_deterministic" else variant)
    if variant == "fused_deterministic":
        plain = fn

        def fn(*args):
            with _deterministic():
                return plain(*args)
    gen = torch.Generator(device="cpu").manual_seed(0)
    image = (torch.rand(B, 3, size, size, generator=gen) * 255).to(DEVICE)
    probs = torch.randn(B, C, size, size, generator=gen).softmax(1).to(DEVICE)
    gate = torch.rand(B, size, size, generator=gen).to(DEVICE)
    hw = size * size
    shape = dict(case=case, B=B, C=C, H=size, W=size, dtype="float32")
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(image, probs, gate, SIGMA_RGB, SIGMA_XY)
    else:
        probs.requires_grad_()
        run = fwd_bwd(lambda: fn(image, probs, gate, SIGMA_RGB, SIGMA_XY), probs)
    measure(
        benchmark, run, variant=variant, pass_=pass_, shape=shape,
        nbytes=_ideal_bytes(hw, pass_ != "fwd"), flops=_flops(hw),
    )


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------------------------------------
# Predicted H100 time from the compiled inner loop (no GPU needed)
#
# Each forward kernel is compiled ahead of time for sm_90 as scripts/aot_report.py compiles it
# (its compile_one; arguments specialized as a launch specializes them, kernels._launch.aot_kernel);
# the SASS of its main loop (the longest backward branch) is counted per opcode. One loop iteration covers TILE pairs per CTA, i.e. TILE / threads pairs per thread,
# so per pair and per SM:
#   MUFU     ex2 (MUFU.*) thread-instructions / 16 per clock
#   tensor   HGMMA FMAs (64 x N x K per warpgroup instruction) / 2048 per clock (fp16, bf16) or
#            1024 (tf32)
#   issue    all thread-instructions / 128 per clock (4 schedulers x 32 lanes)
#   RED      bytes of REDG (atomic adds to L2) / an ASSUMED 2.75 TB/s of L2 reduction bandwidth
#            (a guess, about half a plausible L2 bandwidth; neither measured nor published)
# pairs evaluated x the largest of these / (132 SMs x 1.83 GHz) is the prediction (the pipes
# overlap); the sum is the no-overlap bound. The O(B C HW) work around the kernel (features,
# fp16 copies, AS, E) is added at 3.35 TB/s of HBM.
# ---------------------------------------------------------------------------------------------
H100 = dict(sms=132, clock_hz=1.83e9, mufu=16, issue=128, fma_fp16=2048, fma_tf32=1024,
            l2_red_bytes_s=2.75e12, hbm_bytes_s=3.35e12)
PREDICT_CASES = (("voc", 21), ("coco", 81))
TARGET_MS = {"voc": 2.5, "coco": 5.0}


def _loop_histogram(sass: str) -> collections.Counter:
    """Opcode counts (predicates dropped) of the longest loop of a disassembled kernel."""
    label_at, instrs, pending = {}, [], []
    for line in sass.splitlines():
        lab = re.match(r"^\s*(\.L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            for name in pending:
                label_at[name] = len(instrs)
            pending = []
            instrs.append(ins.group(1))
    loops = []
    for k, ins in enumerate(instrs):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
        if m and label_at.get(m.group(1), k + 1) <= k:
            loops.append((label_at[m.group(1)], k))
    if not loops:
        raise RuntimeError("no loop found in the SASS")
    lo, hi = max(loops, key=lambda t: t[1] - t[0])
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0] for ins in instrs[lo:hi + 1])


def _aot_report():
    """scripts/aot_report.py as a module: the compile, ptxas statistics and CTAs-per-SM count of
    the project's ahead-of-time report, so that this bench and the report cannot disagree."""
    scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import aot_report

    return aot_report


def _compile(kc, cc):
    """(SASS text, the report's row) of a KernelConfig (argument specialization included: its
    attrs, from kernels._launch.aot_kernel) compiled for sm_cc by the installed triton. The row
    (regs, spill, smem, mma, ctas) is scripts/aot_report.py's compile_one; the SASS is the same
    compile's cubin (a cache hit) through the nvdisasm bundled with triton."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = _aot_report().compile_one(kc, cc)
    src = triton.compiler.ASTSource(kc.fn, dict(kc.signature), dict(kc.constexprs), dict(kc.attrs or {}))
    comp = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=kc.num_warps, num_stages=kc.num_stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = f"/tmp/more_fast_energy_{os.getpid()}_{cc}.cubin"
    with open(path, "wb") as fh:
        fh.write(comp.asm["cubin"])
    try:
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(path)
    return sass, row


def _model(hist, tile_pairs, threads, num_warps, pairs, red_width=4):
    per_thread = tile_pairs / threads
    fma = 0
    for op, n in hist.items():
        m = re.match(r"HGMMA\.64x(\d+)x(\d+)\.F32(\.TF32)?", op)
        if m:  # one per warp in each warpgroup: n (per warp) instructions per warpgroup
            rate = H100["fma_tf32"] if m.group(3) else H100["fma_fp16"]
            fma += n * 64 * int(m.group(1)) * int(m.group(2)) * (num_warps // 4) * (H100["fma_fp16"] / rate)
    mufu = sum(n for op, n in hist.items() if op.startswith("MUFU"))
    total = sum(hist.values())
    red = sum(n * (16 if "F32x4" in op else 8 if "x2" in op else 4) for op, n in hist.items() if op.startswith("RED"))
    clk = dict(
        mufu=mufu / per_thread / H100["mufu"],
        tensor=fma / tile_pairs / H100["fma_fp16"],
        issue=total / per_thread / H100["issue"],
        # bytes per pair at the assumed GPU-wide L2 rate, as SM clocks per pair like the others
        red=red / per_thread / H100["l2_red_bytes_s"] * H100["clock_hz"] * H100["sms"],
    )
    sec = {k: v * pairs / (H100["sms"] * H100["clock_hz"]) for k, v in clk.items()}
    return dict(
        per_pair=dict(ex2=mufu / per_thread, tensor_fma=fma / tile_pairs,
                      other=(total - mufu - sum(n for op, n in hist.items() if "GMMA" in op)) / per_thread,
                      red_bytes=red / per_thread),
        ms={k: round(v * 1e3, 3) for k, v in sec.items()},
        pairs=pairs,
    )


def _resources(row: dict) -> dict:
    return {k: row[k] for k in ("regs", "spill", "smem", "mma", "ctas")}


def _predict_pairs(kc, aot, c, hw, cc) -> dict:
    import triton

    cfg = kc.constexprs
    block, block_q = cfg["BLOCK"], cfg["BLOCK_Q"]
    n_pix = triton.cdiv(hw, max(block, block_q)) * max(block, block_q)
    n_tiles = n_pix // block
    n_c = cfg["C_TOTAL"] // (cfg["BLOCK_C"] + cfg["BLOCK_C2"])
    if cfg["SYMMETRIC"]:  # d = 0 .. n / 2, the d = n / 2 pairs by half the programs
        tile_pairs = n_tiles * (n_tiles // 2 + 1) - (n_tiles // 2 if n_tiles % 2 == 0 else 0)
        pairs = aot.B * n_c * tile_pairs * block * block
    else:
        pairs = aot.B * n_c * n_pix * n_pix
    sass, row = _compile(kc, cc)
    hist = _loop_histogram(sass)
    # side work at HBM speed: features (K fp16 x2), S16, row (+ col), AS, E's reads
    n_acc = 2 if cfg["SYMMETRIC"] else 1
    side = aot.B * (2 * n_pix * cfg["K"] * 2 * 2 + n_pix * cfg["C_TOTAL"] * (2 * 2 + 4 * 2 * n_acc) + c * hw * 4 * 4)
    return dict(config=dict(cfg), num_warps=kc.num_warps, resources=_resources(row),
                loop=dict(hist.most_common()),
                **_model(hist, block * block_q, 32 * kc.num_warps, kc.num_warps, pairs),
                side_ms=round(side / H100["hbm_bytes_s"] * 1e3, 3))


def _kernels(aot) -> dict:
    """The energy kernels aot_configs lists for `aot`, by name."""
    from kernels import energy

    return {kc.name: kc for kc in energy.aot_configs(aot)}


# the old kernel (HEAD before the rewrite; its code kept as the direct kernel) as it was launched
# then: 128 x 64 pixel tiles of up to 128 channels, 8 warps, the real (contiguous) gate
def _old_config(c: int) -> dict:
    import triton

    return dict(BLOCK_P=128, BLOCK_Q=64, BLOCK_C=min(max(16, triton.next_power_of_2(c)), 128), num_warps=8,
                num_stages=2)


def predict(cc: int = 90) -> dict:
    """The old (direct) and new (pairs) forward at VOC and COCO: counts, registers, predicted ms."""
    import triton

    from kernels import energy
    from kernels._launch import AotCase

    out = {"triton": triton.__version__, "cc": cc, "model": H100, "cases": {}}
    for name, c in PREDICT_CASES:
        aot = AotCase(name, B=B, C=c, H=SIZE, W=SIZE, dtype="fp32", cc=cc)
        hw = aot.H * aot.W
        rows = {}
        # the new kernel, as its launcher configures it (default and deterministic mode)
        kernels = _kernels(aot)
        rows["new"] = _predict_pairs(kernels["energy_pairs"], aot, c, hw, cc)
        rows["new_deterministic"] = _predict_pairs(kernels.get("energy_pairs_det", kernels["energy_pairs"]),
                                                   aot, c, hw, cc)
        old_cfg = _old_config(c)
        sass, row = _compile(energy.direct_aot_config(aot, old_cfg, name="energy_old"), cc)
        hist = _loop_histogram(sass)
        bp, bq = old_cfg["BLOCK_P"], old_cfg["BLOCK_Q"]
        pairs_old = aot.B * triton.cdiv(c, old_cfg["BLOCK_C"]) * triton.cdiv(hw, bp) * bp * triton.cdiv(hw, bq) * bq
        rows["old"] = dict(config=old_cfg, num_warps=8, resources=_resources(row), loop=dict(hist.most_common()),
                           **_model(hist, bp * bq, 256, 8, pairs_old), side_ms=0.0)
        for row in rows.values():
            ms = row["ms"]
            row["predicted_ms"] = round(max(ms.values()) + row["side_ms"], 3)
            row["no_overlap_ms"] = round(sum(ms.values()) + row["side_ms"], 3)
        out["cases"][name] = rows
    return out


def resources() -> dict:
    """Registers, spills, shared memory, MMA kind and CTAs per SM (scripts/aot_report.py's
    numbers) of every energy kernel aot_configs lists at VOC and COCO (the pairs kernel in the
    default and the deterministic mode, the direct kernel, the backward), for sm_80 and sm_90,
    plus the tensor-core instructions in the pairs kernel's main loop."""
    import triton

    from kernels._launch import AotCase

    out = {"triton": triton.__version__}
    for cc in (80, 90):
        for name, c in PREDICT_CASES:
            for kname, kc in _kernels(AotCase(name, B=B, C=c, H=SIZE, W=SIZE, dtype="fp32", cc=cc)).items():
                sass, row = _compile(kc, cc)
                res = dict(_resources(row), num_warps=kc.num_warps)
                if kname.startswith("energy_pairs"):
                    res["loop_tensor_core_ops"] = sum(n for op, n in _loop_histogram(sass).items()
                                                      if op.startswith(("HGMMA", "HMMA")))
                out[f"sm_{cc} {name} {kname}"] = res
    return out


def test_predicted_h100_time(record_property):
    """Compiles both forward kernels for sm_90 (no GPU needed), prints the prediction and records it
    as a junit property (`energy_prediction`): a model, not a timing, so not a benchmark row."""
    pytest.importorskip("triton")
    result = _run_self("--predict")
    for name, rows in result["cases"].items():
        for which, row in rows.items():
            print(f"{name:5s} {which}: predicted {row['predicted_ms']:.2f} ms (no overlap {row['no_overlap_ms']:.2f}), "
                  f"pipes {row['ms']}, per pair {row['per_pair']}, resources {row['resources']}")
        for which in ("new", "new_deterministic"):
            assert rows[which]["resources"]["spill"] == 0, (name, which)
            assert any("GMMA" in op for op in rows[which]["loop"]), (name, which)
    record_property("energy_prediction", json.dumps(result))


def _run_self(flag: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "bench"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), flag], capture_output=True, text=True,
                          env=env, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pairs_kernel_resources(record_property):
    """No spills on sm_80 and sm_90 at C = 21 and 81 for every energy kernel (the pairs kernel in
    both modes), tensor-core ops in the pairs loop and MMAs in the direct kernel, and at least 2
    CTAs per SM on sm_90 (the compile is the installed triton's; run this file with another
    triton's python for that version)."""
    pytest.importorskip("triton")
    result = _run_self("--resources")
    for key, row in result.items():
        if key == "triton":
            continue
        print(f"triton {result['triton']} {key}: {row}")
        assert row["spill"] == 0, key
        if "energy_pairs" in key:
            assert row["loop_tensor_core_ops"] > 0, key
        if "energy_direct" in key:
            assert row["mma"] != "none", key
        if key.startswith("sm_90"):
            assert row["ctas"] >= 2, key
    record_property("energy_resources", json.dumps(result))


if __name__ == "__main__" and "--predict" in sys.argv:
    print(json.dumps(predict(int(os.environ.get("ENERGY_CC", "90")))))
if __name__ == "__main__" and "--resources" in sys.argv:
    print(json.dumps(resources()))
