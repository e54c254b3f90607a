#!/usr/bin/env python
"""The paper's ablation grid in one command: baseline, + GCR, + LIR, + GCR + LIR.

    python scripts/ablate.py --iters 200 --amp --compile [any other train.py flag]

Each variant is the same training run (the given train.py flags, so the same data, seed and
schedule) with GCR on or off (--set gcr=on/off; off: class tokens reach the losses and the LAM
without the graph module) and LIR on or off (off: --set w_cre=0 --set w_ure=0, so L_cre and
L_ure are not computed). Variants run one after the other in this process, each in its own
folder <out>/<variant>. A finished variant (results.json at the requested --iters) is not run
again; an unfinished one continues from its newest checkpoint (train.py --resume), so an
interrupted grid resumes where it stopped. A folder written with other settings is an error.

Writes <out>/ablation.md (the mIoU of CAM, aux CAM, LAM and decoder of every variant with the
difference to the baseline, and the artifact ratios: the share of a class's class-patch attention
and of its LAM mass on patches of other classes or background, lower is better),
<out>/ablation.json (the same numbers) and <out>/ablation.png (grouped bars; needs matplotlib:
pip install -e ".[plot]").
"""
import argparse
import datetime
import json
import pathlib
import shlex
import sys
import time
import traceback

VARIANTS = (  # (folder, label, GCR, LIR)
    ("baseline", "baseline", False, False),
    ("gcr", "+ GCR", True, False),
    ("lir", "+ LIR", False, True),
    ("gcr_lir", "+ GCR + LIR", True, True),
)
MAPS = (("cam", "CAM"), ("aux_cam", "aux CAM"), ("lam", "LAM"), ("decoder", "decoder"))
ARTIFACTS = (("attention", "class-patch attention"), ("lam", "LAM"))
# fields that change how a run goes, not what it computes: a finished folder may differ in these
_HOW_NOT_WHAT = {"out", "resume", "iters", "device", "workers", "compile", "kernels", "log_every", "num_panels"}


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="ablate.py", description=doc[0], epilog="\n\n".join(doc[2:]),
                                usage="ablate.py [--out OUT] [any train.py flag ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="folder of the grid (default runs/ablation)")
    return p


def variant_argv(train_flags: list, folder: pathlib.Path, gcr: bool, lir: bool, resume: bool) -> list:
    """train.py's argv of one variant; its --set items come last, so they win over the user's."""
    argv = list(train_flags) + ["--out", str(folder), "--set", f"gcr={'on' if gcr else 'off'}"]
    if not lir:
        argv += ["--set", "w_cre=0", "--set", "w_ure=0"]
    if resume:
        argv += ["--resume", str(folder)]
    return argv


def _comparable(config: dict) -> dict:
    config = json.loads(json.dumps(config))  # tuples -> lists, as config.json holds them
    return {k: v for k, v in config.items() if k not in _HOW_NOT_WHAT and k != "differs_from_recipe"}


def folder_state(folder: pathlib.Path, cfg) -> tuple[str, int]:
    """("done" | "resume" | "fresh", the iteration it starts from); exits 2 when the folder holds a
    run with other settings."""
    from more_fast.training import state as S

    checkpoints = S.list_checkpoints(folder) if folder.is_dir() else []
    config_path = folder / "config.json"
    if checkpoints and config_path.is_file():
        old, new = _comparable(json.loads(config_path.read_text())), _comparable(cfg.to_dict())
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            print(f"ablate.py: error: {folder} holds a run with other settings ({', '.join(differ)}); "
                  f"use another --out or remove the folder", file=sys.stderr)
            raise SystemExit(2)
    results = folder / "results.json"
    if results.is_file() and json.loads(results.read_text()).get("iter", -1) >= cfg.iters:
        return "done", cfg.iters
    if checkpoints:
        return "resume", int(checkpoints[0].stem.split("_")[-1])  # the newest first
    return "fresh", 0


class Progress:
    """Prefixes the trainer's lines with the variant and adds an ETA of the whole grid."""

    def __init__(self, remaining: dict):
        self.remaining = dict(remaining)  # variant -> iterations left to run
        self.t0 = time.perf_counter()
        self.ran = 0
        self.variant, self.prefix, self.last = None, "", 0

    def start(self, variant: str, index: int, label: str, start_iter: int) -> None:
        self.variant, self.prefix, self.last = variant, f"[ablate {index}/{len(VARIANTS)} {label}]", start_iter

    def log(self, msg: str) -> None:
        line = msg.splitlines()[0] if msg else msg
        if line.startswith("it ") and "/" in line:
            done = int(line[3:].split("/")[0])
            self.ran += done - self.last
            self.remaining[self.variant] -= done - self.last
            self.last = done
            left = sum(self.remaining.values())
            if self.ran > 1 and left > 0:
                from more_fast.training.telemetry import format_eta

                eta = format_eta((time.perf_counter() - self.t0) / self.ran * left)
                msg = f"{msg} | grid ETA {eta}"
        print("\n".join(f"{self.prefix} {part}" for part in msg.splitlines()), flush=True)


def _fmt_diff(value, base, digits: int) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if base is None or value is base:
        return text
    return f"{text} ({value - base:+.{digits}f})"


def write_table(path: pathlib.Path, rows: list, command: str, cfg, note: str) -> str:
    base = rows[0]
    head = ["variant", "GCR", "LIR"] + [f"{label} mIoU" for _, label in MAPS] + \
           [f"artifact: {label}" for _, label in ARTIFACTS]
    lines = [
        "# Ablation grid",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `{command}`",
        "",
        f"data {cfg.data}, {cfg.iters} iterations each (schedule {cfg.total_iters}), batch {cfg.batch_size}, "
        f"crop {cfg.crop_size}, seed {cfg.seed}. mIoU in percent on the validation split, in brackets the "
        "difference to the baseline. Artifact ratio: the share of a present class's class-patch attention "
        "(and of its LAM's positive mass) on patches of another class or background, lower is better.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |",
    ]
    for row in rows:
        if row.get("error"):
            cells = [row["label"], "on" if row["gcr"] else "off", "on" if row["lir"] else "off",
                     f"failed: {row['error']}"] + [""] * (len(head) - 4)
        else:
            cells = [row["label"], "on" if row["gcr"] else "off", "on" if row["lir"] else "off"]
            cells += [_fmt_diff(row["miou"].get(k), None if base is row or base.get("error") else base["miou"].get(k), 2)
                      for k, _ in MAPS]
            for k, _ in ARTIFACTS:
                value = (row.get("artifact") or {}).get(k)
                ref = None if base is row or base.get("error") else (base.get("artifact") or {}).get(k)
                cells.append(_fmt_diff(value, ref, 3))
        lines.append("| " + " | ".join(cells) + " |")
    chance = next(((r.get("artifact") or {}).get("uniform") for r in rows
                   if (r.get("artifact") or {}).get("uniform") is not None), None)
    if chance is not None:
        lines += ["", f"Chance level of the artifact ratio (a map spread evenly over the patches): {chance:.3f}."]
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(path: pathlib.Path, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(1, len(ok))
    for ax, keys, field, title in ((axes[0], MAPS, "miou", "mIoU (%), higher is better"),
                                   (axes[1], ARTIFACTS, "artifact", "artifact ratio, lower is better")):
        x = np.arange(len(keys))
        for i, row in enumerate(ok):
            values = [float((row.get(field) or {}).get(k) or 0.0) for k, _ in keys]
            ax.bar(x + (i - (len(ok) - 1) / 2) * width, values, width, label=row["label"])
        ax.set_xticks(x)
        ax.set_xticklabels([label for _, label in keys])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_ylim(0, 1)
    chance = next(((r.get("artifact") or {}).get("uniform") for r in ok
                   if (r.get("artifact") or {}).get("uniform") is not None), None)
    if chance is not None:
        axes[1].axhline(chance, color="grey", linestyle="--", linewidth=1)
        axes[1].text(1.45, chance, "chance", ha="right", va="bottom", color="grey", fontsize="small")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=max(1, len(ok)), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None, hard_exit: bool = False) -> int:
    """hard_exit: as train.py's main (the script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_flags = build_parser().parse_known_args(argv)
    for flag in ("--resume", "--no-gcr"):
        if any(a == flag or a.startswith(flag + "=") for a in train_flags):
            print(f"ablate.py: error: {flag}: the grid sets it per variant", file=sys.stderr)
            return 2
    import torch

    from more_fast.cli import config_from_args
    from more_fast.training import NonFiniteLoss, Trainer
    from more_fast.training import state as S
    from more_fast.training.loop import BadSampleStop, TrainingStopped

    out = pathlib.Path(args.out)
    again = shlex.join(["python", sys.argv[0] or "scripts/ablate.py", *argv])  # finished variants are not rerun
    try:
        import matplotlib  # noqa: F401

        have_plot = True
    except ImportError:
        have_plot = False
        print("ablate.py: note: matplotlib is not installed, ablation.png will not be written "
              "(pip install matplotlib, or pip install -e \".[plot]\")", flush=True)
    plan = []
    for folder_name, label, gcr, lir in VARIANTS:  # every variant's flags are checked before any work
        folder = out / folder_name
        cfg = config_from_args(variant_argv(train_flags, folder, gcr, lir, resume=False))
        state, start = folder_state(folder, cfg)
        plan.append((folder_name, label, gcr, lir, folder, cfg, state, start))
    progress = Progress({p[0]: p[5].iters - p[7] for p in plan})
    rows = []
    for index, (name, label, gcr, lir, folder, cfg, state, start) in enumerate(plan, 1):
        row = {"variant": name, "label": label, "gcr": gcr, "lir": lir, "folder": str(folder)}
        progress.start(name, index, label, start)
        if state == "done":
            progress.log(f"finished earlier: {folder / 'results.json'}")
        else:
            if state == "fresh" and (folder / "metrics.jsonl").is_file():
                (folder / "metrics.jsonl").unlink()  # a run stopped before its first checkpoint
            cfg = config_from_args(variant_argv(train_flags, folder, gcr, lir, resume=state == "resume"))
            if cfg.compile:
                torch._dynamo.reset()  # a fresh model per variant: do not count its graphs against the last one's
            try:
                Trainer(cfg, log=progress.log).run()
            except NonFiniteLoss as err:
                progress.log(f"error: {err}")
                row["error"] = str(err)
            except (FileNotFoundError, ValueError, BadSampleStop) as err:
                print(f"ablate.py: error: {err}", file=sys.stderr)
                return 2
            except TrainingStopped as stop:  # the grid goes on from this variant's checkpoint
                print(f"ablate.py: variant {name}: {stop}; resume: {again}", file=sys.stderr, flush=True)
                return stop.exit_code
            except Exception:  # a bug, an out-of-memory, a driver or a compile error: its traceback is the report
                traceback.print_exc()
                found = S.list_checkpoints(folder) if folder.is_dir() else []
                where = f"the newest checkpoint is {found[0]}" if found else "it wrote no checkpoint"
                print(f"ablate.py: error: variant {name} failed (traceback above); {where}; resume: {again}",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                if hard_exit:
                    S.exit_deadline(1)
                S.shut_down_compile_workers()
                return 1
        if not row.get("error"):
            result = json.loads((folder / "results.json").read_text())
            row["miou"], row["artifact"] = result["miou"], result.get("artifact") or {}
        rows.append(row)
    command = "python scripts/ablate.py " + " ".join(shlex.quote(a) for a in argv)
    note = "" if have_plot else "(ablation.png not written: matplotlib is not installed)"
    table = write_table(out / "ablation.md", rows, command, plan[0][5], note)
    (out / "ablation.json").write_text(json.dumps({"command": command, "variants": rows}, indent=2))
    if have_plot:
        write_plot(out / "ablation.png", rows)
    print(table, end="")
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}" + (f", {out / 'ablation.png'}" if have_plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(hard_exit=True))
