#!/usr/bin/env python
"""Plot a training run's metrics.jsonl: loss terms, mIoU and artifact ratios over iterations, one PNG.

    python scripts/plot_metrics.py runs/synthetic            # writes runs/synthetic/metrics.png
    python scripts/plot_metrics.py runs/synthetic --out plot.png

Needs matplotlib (pip install matplotlib, or pip install -e ".[plot]"). A resumed run repeats
the records after its checkpoint; the last record of each iteration is the one drawn.
"""
import argparse
import json
import pathlib
import sys

TERMS = ("loss", "cls", "aux", "mct", "ptc", "cre", "ure", "seg", "reg")
MAPS = (("cam", "CAM"), ("aux_cam", "aux CAM"), ("lam", "LAM"), ("decoder", "decoder"),
        ("background", "all-background"))
ARTIFACTS = (("attention", "class-patch attention"), ("lam", "LAM"))


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="plot_metrics.py", description=doc[0], epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training output folder holding metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default RUN_DIR/metrics.png)")
    return p


def read_metrics(path: pathlib.Path) -> tuple[dict, dict]:
    """({iter: step record}, {iter: evaluation record}); later records of an iteration win."""
    steps, evals = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {number}: not JSON") from None
        if "iter" not in record:
            continue
        (evals if "eval" in record else steps)[int(record["iter"])] = record
    return dict(sorted(steps.items())), dict(sorted(evals.items()))


def plot(steps: dict, evals: dict, out: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_artifact = any(r.get("artifact") for r in evals.values())
    n = 3 if has_artifact else 2
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4))
    ax = axes[0]
    for term in TERMS:
        points = [(it, r[term]) for it, r in steps.items() if r.get(term) is not None]
        if points:
            ax.plot(*zip(*points), label=term, linewidth=2.0 if term == "loss" else 1.0)
    ax.set_yscale("symlog", linthresh=1e-2)  # terms span 1e-3 .. 10, and L_reg can be negative
    ax.set_title("loss terms (unweighted) and total")
    ax.set_xlabel("iteration")
    ax.legend(fontsize="small", ncol=2)
    ax = axes[1]
    for key, label in MAPS:
        points = [(it, r["eval"][key]) for it, r in evals.items() if key in r["eval"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=label, linestyle=":" if key == "background" else "-")
    ax.set_title("mIoU (%) on the validation split")
    ax.set_xlabel("iteration")
    ax.legend(fontsize="small")
    if has_artifact:
        ax = axes[2]
        for key, label in ARTIFACTS:
            points = [(it, r["artifact"][key]) for it, r in evals.items()
                      if (r.get("artifact") or {}).get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_ylim(0, 1)
        ax.set_title("artifact ratio (lower is better)")
        ax.set_xlabel("iteration")
        ax.legend(fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = pathlib.Path(args.run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        print(f"plot_metrics.py: error: RUN_DIR: no metrics.jsonl in {run}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_metrics.py: error: matplotlib is not installed (pip install matplotlib, "
              "or pip install -e \".[plot]\")", file=sys.stderr)
        return 1
    try:
        steps, evals = read_metrics(path)
    except ValueError as err:
        print(f"plot_metrics.py: error: {err}", file=sys.stderr)
        return 2
    if not steps and not evals:
        print(f"plot_metrics.py: error: {path} holds no records", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if args.out else run / "metrics.png"
    plot(steps, evals, out, str(run))
    print(f"wrote {out} ({len(steps)} logged iterations, {len(evals)} evaluations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
