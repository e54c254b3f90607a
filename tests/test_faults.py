"""Faults: stop signals save and resume exactly, unreadable samples stop (or are skipped) in one line,
the checkpoint cadence and retention. Every row of the fault table, on the CPU with a tiny model.

Two rows are covered elsewhere: a torn newest checkpoint after `kill -9` (test_training.py,
test_corrupt_checkpoint_falls_back_to_previous) and an image listed but missing (test_data.py)."""
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import torchrun_cmd, torchrun_worker

from more_fast.cli import config_from_args
from more_fast.data import save_label_png
from more_fast.data.voc import BadSample, voc_dataset
from more_fast.training import Trainer
from more_fast.training import state as S
from more_fast.training.data import ResumableSampler

REPO = pathlib.Path(__file__).resolve().parents[1]
RESUME_STATE = ("model", "optimizer", "scheduler", "rng", "ure_generator", "iteration", "skipped")
NUM_TRAIN, BATCH = 6, 2


def write_voc(root: pathlib.Path, num_train: int = NUM_TRAIN, num_val: int = 3) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    splits = {"train_aug": [], "val": []}
    for i in range(num_train + num_val):
        name = f"2007_{i:06d}"
        h, w = (40, 48) if i % 2 else (48, 40)
        image = rng.integers(80, 150, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        cls = int(rng.integers(0, 20))
        mask[: h // 2, : w // 2] = cls + 1
        image[: h // 2, : w // 2] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        save_label_png(root / "SegmentationClassAug" / f"{name}.png", mask)
        splits["train_aug" if i < num_train else "val"].append(name)
    for split, names in splits.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def tiny_argv(root, out, iters, *extra):
    return ["--data", "voc", "--data-root", str(root), "--backbone", "vit_tiny_patch16_224", "--depth", "2",
            "--patch-size", "16", "--crop-size", "32", "--batch-size", str(BATCH), "--workers", "0",
            "--kernels", "reference", "--cam-scales", "1.0", "--schedule-iters", "40", "--eval-every", "1000",
            "--log-every", "1", "--iters", str(iters), "--out", str(out), "--pretrained", "none",
            "--device", "cpu", *extra]  # bit-exact resume is the CPU's; torchrun's ranks use gloo


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"faults_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def iteration_reading(position: int, seed: int = 0) -> int:
    """The (0-based) iteration whose batch holds sampler position `position`, and that sample's index."""
    stream = iter(ResumableSampler(NUM_TRAIN, seed))
    index = [next(stream)[0] for _ in range(position + 1)][-1]
    return position // BATCH, index


@pytest.fixture
def one_thread():
    """One intra-op thread here and in the child processes: bit-identical float sums across processes
    (and much faster on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")


def final_state(out, iteration):
    state = torch.load(S.checkpoint_path(pathlib.Path(out), iteration), weights_only=False)
    assert state["iteration"] == iteration
    return {k: state[k] for k in RESUME_STATE}


def test_sigterm_to_the_cli_saves_the_step_in_flight_and_resume_ends_bit_for_bit(tmp_path, one_thread):
    root = write_voc(tmp_path / "voc")
    iters = 12
    argv = tiny_argv(root, tmp_path / "stopped", iters)
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *argv], cwd=tmp_path,
                            env=one_thread, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("it      3/"):
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    stopped = [json.loads(r) for r in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    n = [r for r in stopped if "stopped" in r][0]["iter"]
    assert 3 <= n < iters and stopped[-1] == {"iter": n, "stopped": "SIGTERM", "checkpoint": str(
        S.checkpoint_path(tmp_path / "stopped", n))}
    assert f"stopped by SIGTERM after iteration {n} of {iters}" in lines[0]
    assert f"--resume {tmp_path / 'stopped'}" in lines[0] and str(S.checkpoint_path(tmp_path / "stopped", n)) in lines[0]
    # the line's resume command, run here: it ends where an uninterrupted run ends
    resume = lines[0].split("resume: ", 1)[1].split()
    assert resume[:2] == ["python", str(REPO / "scripts" / "train.py")]
    Trainer(config_from_args(tiny_argv(root, tmp_path / "full", iters)), log=lambda m: None).run()
    Trainer(config_from_args(resume[2:]), log=lambda m: None).run()
    differ = S.diff_states(final_state(tmp_path / "full", iters), final_state(tmp_path / "stopped", iters))
    assert not differ, f"final checkpoints differ at {differ[:10]}"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGUSR1, 0)])
def test_sigint_and_sigusr1_exit_codes_and_a_second_signal_while_saving(tmp_path, one_thread, monkeypatch,
                                                                         capfd, sig, code):
    """The signal arrives during step 2; a second one arrives while the checkpoint is being written."""
    from more_fast.training.loop import TrainStep

    real_step, real_save = TrainStep.step, S.save_atomic

    def step(self, it, batch):
        if it == 1:
            os.kill(os.getpid(), sig)
        return real_step(self, it, batch)

    def save(obj, path):
        os.kill(os.getpid(), signal.SIGTERM)  # while saving: noted, ignored
        real_save(obj, path)

    monkeypatch.setattr(TrainStep, "step", step)
    monkeypatch.setattr(S, "save_atomic", save)
    before = signal.getsignal(sig)
    argv = tiny_argv(write_voc(tmp_path / "voc"), tmp_path / "out", 6)
    assert load_script("train").main(argv) == code
    assert signal.getsignal(sig) is before  # handlers restored
    err = capfd.readouterr().err  # the handler writes to the file descriptor
    assert f"stopped by {sig.name} after iteration 2 of 6: checkpoint" in err
    assert "SIGTERM received while stopping: ignored" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["ckpt_00000002.pt"]
    assert final_state(tmp_path / "out", 2)["iteration"] == 2


def test_save_every_is_independent_of_eval_every_and_keep_checkpoints_spares_the_best(tmp_path, one_thread,
                                                                                      monkeypatch):
    written = []
    real_save = S.save_atomic
    monkeypatch.setattr(S, "save_atomic", lambda obj, path: (written.append(obj["iteration"]), real_save(obj, path)))
    argv = tiny_argv(write_voc(tmp_path / "voc"), tmp_path / "out", 7, "--save-every", "2", "--eval-every", "3",
                     "--keep-checkpoints", "1")
    Trainer(config_from_args(argv), log=lambda m: None).run()
    assert written == [2, 3, 4, 6, 7]  # every 2, every evaluation (3), the end
    evals = {r["iter"]: r["eval"]["lam"] for r in map(json.loads, open(tmp_path / "out" / "metrics.jsonl"))
             if "eval" in r}
    best = max(evals, key=lambda i: (evals[i], -i))
    kept = sorted(int(p.name[5:13]) for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert kept == sorted({7, best})
    assert tuple(torch.load(S.checkpoint_path(tmp_path / "out", 7), weights_only=False)["best"]) == (best, evals[best])


def test_checkpoint_cadence_flags_are_validated(tmp_path):
    for argv in (["--save-every", "0"], ["--keep-checkpoints", "-1"], ["--on-bad-sample", "ignore"]):
        with pytest.raises(SystemExit) as err:
            config_from_args(argv)
        assert err.value.code == 2
    cfg = config_from_args(["--data", "voc", "--data-root", str(tmp_path), "--pretrained", "none"])
    assert cfg.save_every == 1000 and cfg.keep_checkpoints is None and cfg.on_bad_sample == "stop"


@pytest.fixture
def bad_voc(tmp_path):
    """A corrupt JPEG first read at iteration 1 and a mask whose size is not its image's first read at
    iteration 2 (0-based; each is read again in the next epoch, iterations 3-5)."""
    root = write_voc(tmp_path / "voc")
    names = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    it_jpeg, jpeg = iteration_reading(2)  # an epoch holds every index once: positions 0-5 are the first
    it_mask, mask = iteration_reading(5)
    assert (it_jpeg, it_mask) == (1, 2)
    jpeg_path = root / "JPEGImages" / f"{names[jpeg]}.jpg"
    jpeg_path.write_bytes(jpeg_path.read_bytes()[:200])  # truncated: the header reads, the data does not
    mask_path = root / "SegmentationClassAug" / f"{names[mask]}.png"
    save_label_png(mask_path, np.zeros((8, 8), np.uint8))
    return root, jpeg_path, mask_path, {jpeg, mask}


def test_corrupt_jpeg_in_a_worker_stops_with_one_line_and_a_checkpoint(tmp_path, bad_voc, one_thread, capsys):
    root, jpeg, _, _ = bad_voc
    argv = tiny_argv(root, tmp_path / "out", 6)
    argv[argv.index("--workers") + 1] = "1"  # read in a DataLoader worker process
    assert load_script("train").main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"image {jpeg} (split 'train_aug') cannot be decoded" in err
    assert "checkpoint of iteration 1" in err and "--on-bad-sample skip" in err
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["ckpt_00000001.pt"]


def test_skip_replaces_bad_samples_and_lists_them(tmp_path, bad_voc, one_thread):
    root, jpeg, mask, bad = bad_voc
    # a bad sample is replaced by the next index of the split, skipping bad ones in a row too
    stream = iter(ResumableSampler(NUM_TRAIN, 0))
    reads = 0
    for _ in range(6 * BATCH):
        index = next(stream)[0]
        while index % NUM_TRAIN in bad:
            reads, index = reads + 1, index + 1
    logs = []
    cfg = config_from_args(tiny_argv(root, tmp_path / "out", 6, "--on-bad-sample", "skip"))
    Trainer(cfg, log=logs.append).run()
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["skipped_samples"] == [str(jpeg), str(mask)] and summary["skipped_samples_total"] == reads
    records = [json.loads(r) for r in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    skipped = [(r["iter"], r["skipped_samples"]) for r in records if "skipped_samples" in r]
    assert skipped[0][0] == 2 and skipped[0][1][0] == str(jpeg) and sum(len(s) for _, s in skipped) == reads
    assert max(it for it, _ in skipped) > 3  # the second epoch (iterations 4-6) reads them again
    assert any(f"skipped {reads} unreadable samples (2 files: {jpeg}, {mask})" in line for line in logs)


def test_mis_sized_mask_names_both_files(bad_voc):
    root, _, mask, _ = bad_voc
    ds = voc_dataset(root, "train_aug", True, 32)
    index = ds.mask_paths.index(mask)
    with pytest.raises(BadSample) as err:
        ds[index]
    assert err.value.path == str(mask) and err.value.split == "train_aug"
    assert str(err.value).startswith(f"mask {mask} is (8, 8), image {ds.image_paths[index]} is (")
    assert str(err.value).endswith(") (split 'train_aug')")


def test_evaluate_and_infer_report_a_bad_image_and_go_on(tmp_path, one_thread, capsys):
    root = write_voc(tmp_path / "voc")
    Trainer(config_from_args(tiny_argv(root, tmp_path / "run", 1)), log=lambda m: None).run()
    checkpoint = S.checkpoint_path(tmp_path / "run", 1)
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    bad = root / "JPEGImages" / f"{val[1]}.jpg"
    bad.write_bytes(b"not a jpeg")
    argv = ["--checkpoint", str(checkpoint), "--data", "voc", "--data-root", str(root), "--split", "val",
            "--protocol", "both", "--crop-size", "32", "--workers", "0", "--json", str(tmp_path / "r.json")]
    assert load_script("evaluate").main(argv) == 0
    err = capsys.readouterr().err
    assert err.count(f"image {bad} (split 'val') cannot be decoded") == 2 and "Traceback" not in err  # once per protocol
    assert json.loads((tmp_path / "r.json").read_text())["published"]["images"] == 2
    images = tmp_path / "images"
    images.mkdir()
    for name in val:
        (images / f"{name}.jpg").write_bytes((root / "JPEGImages" / f"{name}.jpg").read_bytes())
    argv = ["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "panels"),
            "--crop-size", "32", "--scales", "1.0"]
    assert load_script("infer").main(argv) == 0
    chosen, *lines = capsys.readouterr().err.splitlines()
    assert chosen.startswith("kernels ")  # the backend, chosen once before any work
    assert len(lines) == 1 and f"{images / (val[1] + '.jpg')}" in lines[0] and "cannot be decoded" in lines[0]
    assert sorted(json.loads((tmp_path / "panels" / "predictions.json").read_text())) == [val[0], val[2]]


# scripts/train.py's main() under torchrun; rank 1 alone gets SIGTERM, during its third step
DDP_WORKER = """
import json, os, pathlib, signal, sys
sys.path.insert(0, {repo!r})
from more_fast.training import loop
rank, out = int(os.environ["RANK"]), pathlib.Path({out!r})
step = loop.TrainStep.step
def signalled_step(self, it, batch):
    if rank == 1 and it == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, it, batch)
loop.TrainStep.step = signalled_step
run = loop.Trainer.run
def recording_run(self):
    try:
        return run(self)
    except loop.TrainingStopped as stop:
        (out / f"rank{{rank}}.json").write_text(json.dumps({{"iteration": stop.iteration, "code": stop.exit_code}}))
        raise
loop.Trainer.run = recording_run
"""


@pytest.mark.slow
def test_torchrun_ranks_stop_together_with_one_checkpoint(tmp_path, one_thread):
    from more_fast.training.loop import STOP_CHECK_EVERY

    root = write_voc(tmp_path / "voc", num_train=8)
    for split in ("train_aug", "val"):  # the label cache, written once here rather than by two ranks at once
        voc_dataset(root, split, split == "train_aug", 32)
    out = tmp_path / "out"
    out.mkdir()
    worker = torchrun_worker(tmp_path / "worker.py", DDP_WORKER.format(repo=str(REPO), out=str(out)),
                             REPO / "scripts" / "train.py")
    env = {k: v for k, v in one_thread.items() if k != "TRITON_INTERPRET"}
    cmd = torchrun_cmd(worker, *tiny_argv(root, out, STOP_CHECK_EVERY + 2))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # torchrun reports its workers' 143
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"iteration": STOP_CHECK_EVERY, "code": 143}] * 2, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"ckpt_{STOP_CHECK_EVERY:08d}.pt"]
    assert proc.stderr.count(f"stopped by SIGTERM after iteration {STOP_CHECK_EVERY}") == 1
    assert "the same torchrun command with --resume" in proc.stderr


@pytest.mark.slow
def test_torchrun_skip_lists_the_unreadable_samples_of_every_rank(tmp_path, bad_voc, one_thread):
    root, jpeg, mask, bad = bad_voc
    for split in ("train_aug", "val"):  # the label cache, written once here rather than by two ranks at once
        voc_dataset(root, split, split == "train_aug", 32)
    iters, world = 6, 2
    files, reads = [set(), set()], [0, 0]  # per rank, by the skip rule of the single-process test above
    names = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    path_of = {index: str(jpeg) if names[index] == jpeg.stem else str(mask) for index in bad}
    for rank in range(world):
        stream = iter(ResumableSampler(NUM_TRAIN, 0, 0, rank, world))
        for _ in range(iters * BATCH):
            index = next(stream)[0]
            while index % NUM_TRAIN in bad:
                files[rank].add(path_of[index % NUM_TRAIN])
                reads[rank], index = reads[rank] + 1, index + 1
    assert reads[1] > 0, reads  # rank 1 meets a bad sample: its count is not rank 0's
    out = tmp_path / "out"
    worker = torchrun_worker(tmp_path / "worker.py", f"import sys\nsys.path.insert(0, {str(REPO)!r})\n",
                             REPO / "scripts" / "train.py")
    env = {k: v for k, v in one_thread.items() if k != "TRITON_INTERPRET"}
    cmd = torchrun_cmd(worker, *tiny_argv(root, out, iters, "--on-bad-sample", "skip"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["skipped_samples"]) == files[0] | files[1]
    assert summary["skipped_samples_total"] == sum(reads)
    assert f"skipped {sum(reads)} unreadable samples ({len(files[0] | files[1])} files" in proc.stdout
    saved = torch.load(S.checkpoint_path(out, iters), weights_only=False)
    assert [count for _, count in saved["bad_samples_by_rank"]] == reads
    assert saved["bad_count"] == sum(reads)


def test_partial_checkpoints_of_dead_writers_are_removed_at_start(tmp_path):
    root = write_voc(tmp_path / "voc")
    folder = tmp_path / "out" / "checkpoints"
    folder.mkdir(parents=True)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid is dead now: its partial file is left from a save that never finished
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = folder / f".ckpt_00000002.pt.tmp{finished.pid}"
        alive = folder / f".ckpt_00000003.pt.tmp{running.pid}"  # another process saving here now
        kept = [folder / "ckpt_00000001.pt", folder / "notes.txt", alive]
        for path in (dead, *kept):
            path.write_bytes(b"x")
        logs = []
        Trainer(config_from_args(tiny_argv(root, tmp_path / "out", 1)), log=logs.append)
        assert not dead.exists() and all(p.exists() for p in kept)
        assert f"removed {dead}: the partial file of a save that never finished" in logs
        assert S.remove_partial_checkpoints(tmp_path / "out") == []
    finally:
        running.kill()
        running.wait()
    assert S.remove_partial_checkpoints(tmp_path / "out") == [alive]  # its writer is gone now


def test_capped_workers_run_the_loaders_and_config_json_keeps_the_users(tmp_path, monkeypatch):
    from more_fast.training import data as D
    from more_fast.training import loop, threads

    root = write_voc(tmp_path / "voc")
    monkeypatch.setattr(threads, "configure", lambda: threads.ThreadChoice(1, 0, "cpu threads 1 (test)"))
    used = []
    for name in ("train_loader", "eval_loader"):
        real = getattr(D, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            used.append((_name, kwargs["workers"]))
            return _real(*args, **kwargs)
        monkeypatch.setattr(loop, name, spy)
    logs = []
    argv = tiny_argv(root, tmp_path / "out", 1)
    argv[argv.index("--workers") + 1] = "3"
    Trainer(config_from_args(argv), log=logs.append).run()
    assert logs[0] == "cpu threads 1 (test); DataLoader workers 3 -> 0"
    assert used == [("train_loader", 0), ("eval_loader", 0)]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["workers"] == 3
    assert torch.load(S.checkpoint_path(tmp_path / "out", 1), weights_only=False)["config"]["workers"] == 3


@pytest.mark.parametrize("interpret, chosen", [(False, "reference (--kernels auto)"), (True, "triton (--kernels auto)")])
def test_the_header_names_the_backend_chosen_for_the_run(interpret, chosen, tmp_path, monkeypatch):
    import kernels

    monkeypatch.setattr(kernels, "_INTERPRET", interpret)
    argv = tiny_argv(write_voc(tmp_path / "voc"), tmp_path / "out", 1)
    argv[argv.index("--kernels") + 1] = "auto"
    logs = []
    trainer = Trainer(config_from_args(argv), log=logs.append)
    assert trainer.backend == trainer.train_step.backend == chosen.split()[0]
    assert any(f"| kernels {chosen} |" in line for line in logs), logs
