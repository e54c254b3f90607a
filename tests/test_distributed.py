"""Several processes: `torchrun --nproc_per_node 2 scripts/train.py` on the CPU with gloo."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from helpers import torchrun_cmd, torchrun_worker

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs scripts/train.py's main() unchanged, recording per rank what it returns and who saves.
WORKER = textwrap.dedent("""
    import json, os, pathlib, sys
    sys.path.insert(0, {repo!r})
    from more_fast.training import loop, state
    rank, out = int(os.environ["RANK"]), pathlib.Path({out!r})
    save_atomic = state.save_atomic
    def recording_save(obj, path):
        (out / f"saved_by_rank{{rank}}").write_text(str(path))
        save_atomic(obj, path)
    state.save_atomic = recording_save
    run = loop.Trainer.run
    def recording_run(self):
        results = run(self)
        checksum = [float(p.detach().double().sum()) for p in self.model.parameters()]
        (out / f"rank{{rank}}.json").write_text(json.dumps({{"results": results, "world": self.world,
                                                            "checksum": checksum}}))
        return results
    loop.Trainer.run = recording_run
""")


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    worker = torchrun_worker(tmp_path / "worker.py", WORKER.format(repo=str(REPO), out=str(out)),
                             REPO / "scripts" / "train.py")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MORE_FAST_KERNELS")}
    cmd = torchrun_cmd(worker, "--data", "synthetic", "--data-root", tmp_path / "synthetic", "--iters", "2",
                       "--batch-size", "2", "--crop-size", "32", "--workers", "0", "--eval-every", "2",
                       "--out", out, "--device", "cpu")  # gloo (torchrun_cmd says why)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # evaluation shards the val set and all-reduces the confusion matrices: both ranks agree
    assert ranks[0]["results"] == ranks[1]["results"]
    assert set(ranks[0]["results"]) >= {"cam", "aux_cam", "lam", "decoder"}
    # DDP averaged the gradients: the two replicas hold the same weights
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    # rank 0 alone writes checkpoints, metrics and results; it logs the world size
    assert (out / "saved_by_rank0").is_file() and not (out / "saved_by_rank1").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_00000002.pt"]
    assert json.loads((out / "results.json").read_text())["miou"] == ranks[0]["results"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics if "eval" not in m] == [1, 2]
    assert proc.stdout.count("world size 2") == 1
