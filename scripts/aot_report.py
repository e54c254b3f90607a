"""Ahead-of-time compile report of every Triton kernel: no GPU needed.

    python scripts/aot_report.py                    # markdown table on stdout
    python scripts/aot_report.py --out table.md     # and into a file
    python scripts/aot_report.py --perf docs/PERF.md  # replace this triton version's table there

Each op module under kernels/ exposes `aot_configs(case) -> list[KernelConfig]` (the contract in
kernels/_launch.py): the kernels its launcher runs for a production case, with the block sizes,
warps and stages chosen by the same config functions the launcher calls, and the arguments
specialized as Triton's JIT does at run time. Every kernel is compiled with Triton's own compiler
for sm_80 and sm_90 (`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`), then the
PTX goes through the ptxas that Triton bundles (`ptxas -v`) for registers and spills. Shared
memory is Triton's (the kernel metadata), the MMA kind comes from the PTX (wgmma / mma.sync and
the operand type, or none), CTAs per SM from registers, shared memory and threads
(sm_80: 65536 registers, 164 KB shared memory per SM, 163 KB per block; sm_90: 65536 registers,
228 KB per SM, 227 KB per block; 1 KB reserved per block; 2048 threads and 32 blocks per SM).

Cases: VOC (B = 4, K = 20, N = 784, D = 768, the 448 crop; energy at 224 x 224, C = 21), COCO
(K = 80, C = 81) and N = 3136 (the 896 crop; energy at 448 x 448). Dtypes: what the bf16-autocast
training step feeds each op (TRAINING_DTYPES), plus bf16 for the ops that get fp32 there but run
tensor-core dots (EXTRA_DTYPES), to show the native half-precision path.

Works with triton 3.6 and 3.8. A module without `aot_configs` is listed as such.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# the report compiles for a GPU: never under the interpreter (it must be off before triton loads).
# Only as a script: a test process that imports this module for its helpers keeps its interpreter.
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

MODULES = ("affinity", "lir", "gcr", "attention", "energy", "par")
# what the training step under bf16 autocast feeds each op: LayerNorm outputs stay fp32 (the
# patch and class tokens of L_ptc / L_cre), the GCR projections and the attention's q, k are
# bf16 linear outputs, L_reg and PAR get fp32 images and probabilities
TRAINING_DTYPES = {"affinity": "fp32", "lir": "fp32", "gcr": "bf16", "attention": "bf16", "energy": "fp32",
                   "par": "fp32"}
EXTRA_DTYPES = {"affinity": ("bf16",), "lir": ("bf16",)}
TARGETS = (90, 80)

SM = {  # per SM: registers, shared memory; per block: shared memory
    80: dict(regs=65536, smem=164 * 1024, smem_block=163 * 1024),
    90: dict(regs=65536, smem=228 * 1024, smem_block=227 * 1024),
}
MAX_THREADS_SM, MAX_CTAS_SM, SMEM_RESERVED = 2048, 32, 1024


def cases():
    from kernels._launch import AotCase

    return [
        AotCase("voc"),
        AotCase("coco", K=80, C=81, T=4 + 80 + 784),
        AotCase("n3136", N=3136, T=4 + 20 + 3136, H=448, W=448),
    ]


def ctas_per_sm(cc: int, regs: int, smem: int, warps: int) -> int:
    """Resident blocks per SM that registers (allocated per warp in units of 256), shared memory
    and threads allow."""
    spec = SM[cc]
    if smem > spec["smem_block"]:
        return 0
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (4 * ((spec["regs"] // 4) // per_warp)) // warps  # 4 SM sub-partitions
    by_smem = spec["smem"] // (smem + SMEM_RESERVED) if smem else MAX_CTAS_SM
    return min(by_regs, by_smem, MAX_THREADS_SM // (32 * warps), MAX_CTAS_SM)


def ptxas_path() -> str:
    import triton

    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists():
        raise FileNotFoundError(f"ptxas: not found at {path} (triton ships it with its CUDA backend)")
    return str(path)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_stats(ptx: str, cc: int) -> dict:
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", str(src), "-o", str(pathlib.Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
    out = {}
    for key, rx in _PTXAS_RE.items():
        found = [int(v) for v in rx.findall(res.stderr)]
        out[key] = max(found) if found else 0
    return out


# accumulator type, then the A operand type: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32,
# wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16
_MMA_RE = re.compile(r"\b(wgmma\.mma_async|mma\.sync)[\w.]*?\.m\d+n\d+k\d+[\w.]*?\.(?:f32|f16|s32|f64)\."
                     r"(f16|bf16|tf32|f64|e4m3|e5m2|s8|u8)\b")


def mma_kind(ptx: str) -> str:
    kinds = sorted({(("wgmma" if m.group(1).startswith("wgmma") else "mma.sync"), m.group(2))
                    for m in _MMA_RE.finditer(ptx)})
    if kinds:
        return ", ".join(f"{k} {t}" for k, t in kinds)
    if "wgmma" in ptx:
        return "wgmma"
    return "mma.sync" if "mma.sync" in ptx else "none"


def compile_one(cfg, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(cfg.fn, dict(cfg.signature), dict(cfg.constexprs), dict(cfg.attrs or {}))
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = kernel.asm["ptx"]
    stats = ptxas_stats(ptx, cc)
    smem = int(getattr(kernel.metadata, "shared", 0) or 0)
    return dict(regs=stats["regs"], spill=stats["spill_st"] + stats["spill_ld"], spill_st=stats["spill_st"],
                smem=smem, mma=mma_kind(ptx), ctas=ctas_per_sm(cc, stats["regs"], smem, cfg.num_warps))


def _blocks(cfg) -> str:
    parts = [f"{k}={v}" for k, v in cfg.constexprs.items()
             if isinstance(v, int) and not isinstance(v, bool) and v != 1 and k.isupper()]
    return " ".join(parts)


def run_task(task) -> list[dict]:
    """Compile the kernels of one (module, case, dtype, cc): rows of the table."""
    module, case, dtype, cc, names = task
    mod = importlib.import_module(f"kernels.{module}")
    if not hasattr(mod, "aot_configs"):
        return [dict(kernel=f"{module} (no aot_configs)", case=case.name, shapes="", dtype=dtype, cc=cc)]
    rows = []
    for cfg in mod.aot_configs(dataclasses.replace(case, dtype=dtype, cc=cc)):
        if names and cfg.name not in names:
            continue
        row = dict(kernel=cfg.name, case=case.name, shapes=cfg.shapes, dtype=dtype, cc=cc, blocks=_blocks(cfg),
                   warps=cfg.num_warps, stages=cfg.num_stages)
        try:
            row.update(compile_one(cfg, cc))
        except Exception as err:  # a kernel that does not compile is a row of the report, not a crash
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:160] if str(err).strip() else ''}"
        rows.append(row)
    return rows


def tasks(modules=MODULES, case_names=None, targets=TARGETS, extra=True, names=None, dtypes=None):
    out = []
    for case in cases():
        if case_names and case.name not in case_names:
            continue
        for module in modules:
            chosen = (TRAINING_DTYPES[module],) + (EXTRA_DTYPES.get(module, ()) if extra else ())
            for dtype in chosen:
                if dtypes and dtype not in dtypes:
                    continue
                for cc in targets:
                    out.append((module, case, dtype, cc, tuple(names or ())))
    return out


def collect(task_list, jobs: int) -> list[dict]:
    if jobs <= 1:
        results = [run_task(t) for t in task_list]
    else:
        with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(run_task, task_list))
    rows = [r for res in results for r in res]
    order = {m: i for i, m in enumerate(MODULES)}
    case_order = {c.name: i for i, c in enumerate(cases())}
    return sorted(rows, key=lambda r: (order.get(r["kernel"].split("_")[0].split(" ")[0].replace("cpa", "attention"), 99),
                                       r["kernel"], case_order[r["case"]], r["dtype"] != "bf16", -r["cc"]))


HEADER = ("| kernel | case | shapes | dtype | cc | blocks | warps | stages | regs | spill B | smem B | MMA | CTAs/SM |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table(rows: list[dict]) -> str:
    lines = [HEADER]
    for r in rows:
        if "regs" not in r:
            status = r.get("error", "no aot_configs")
            lines.append(f"| {r['kernel']} | {r['case']} | {r.get('shapes', '')} | {r['dtype']} | {r['cc']} | "
                         f"{r.get('blocks', '')} | {r.get('warps', '')} | {r.get('stages', '')} | {status} | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['case']} | {r['shapes']} | {r['dtype']} | {r['cc']} | {r['blocks']} | "
                     f"{r['warps']} | {r['stages']} | {r['regs']} | {r['spill']} | {r['smem']} | {r['mma']} | "
                     f"{r['ctas']} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    done = [r for r in rows if "regs" in r]
    spills = [r for r in done if r["spill"]]
    failed = [r for r in rows if "error" in r]
    missing = sorted({r["kernel"] for r in rows if r["kernel"].endswith("(no aot_configs)")})
    lines = [f"{len(done)} compiles; spilling: " + (", ".join(
        f"{r['kernel']} {r['case']} {r['dtype']} sm_{r['cc']} ({r['spill']} B)" for r in spills) or "none")]
    if failed:
        lines.append("failed: " + ", ".join(f"{r['kernel']} {r['case']} {r['dtype']} sm_{r['cc']}" for r in failed))
    if missing:
        lines.append("not compiled: " + ", ".join(missing))
    return "\n".join(lines)


def provenance(argv) -> str:
    import triton

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    cmd = "python scripts/aot_report.py" + ("" if not argv else " " + " ".join(argv))
    return f"Generated {date} by `{cmd}` with triton {triton.__version__} (no GPU: Triton's compiler and ptxas)."


def write_perf(path: pathlib.Path, body: str) -> None:
    """Replace this triton version's generated block of docs/PERF.md (between its markers;
    appended at the end when absent), so that one block per triton version can coexist."""
    import triton

    tag = "aot-report triton " + ".".join(triton.__version__.split(".")[:2])
    BEGIN, END = f"<!-- {tag}: begin -->", f"<!-- {tag}: end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.add_argument("--perf", help="replace the generated block of this markdown file (docs/PERF.md)")
    p.add_argument("--modules", nargs="+", choices=MODULES, default=list(MODULES))
    p.add_argument("--cases", nargs="+", choices=("voc", "coco", "n3136"))
    p.add_argument("--cc", nargs="+", type=int, choices=TARGETS, default=list(TARGETS))
    p.add_argument("--training-dtypes-only", action="store_true", help="no extra bf16 rows")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16", "fp32"), help="only these of the dtypes above")
    p.add_argument("--kernels", nargs="+", metavar="NAME", help="only these kernels (e.g. affinity_bwd)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = p.parse_args(argv)
    rows = collect(tasks(args.modules, args.cases, tuple(args.cc), not args.training_dtypes_only, args.kernels,
                         args.dtypes), args.jobs)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    body = f"{provenance(argv)}\n\n{table(rows)}\n\n{summary(rows)}"
    print(body)
    if args.out:
        pathlib.Path(args.out).write_text(body + "\n")
    if args.perf:
        write_perf(pathlib.Path(args.perf), body)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
