"""A failed run exits: an unexpected error in the step, in an evaluation, in a DataLoader worker or
on one torchrun rank ends every process within seconds, non-zero, with its traceback and a last line
naming the newest checkpoint and the resume command (issue 28).

Each case runs the real script in a subprocess under a hard time limit, with DataLoader workers
(the processes that used to keep a failed run alive), and measures from the moment the failure
was raised to the moment the process had exited."""
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import torchrun_cmd
from test_faults import tiny_argv, write_voc

REPO = pathlib.Path(__file__).resolve().parents[1]
EXIT_WITHIN = 30.0  # seconds from the failure to the exit of every process
HARD_LIMIT = 300  # seconds for a whole subprocess: startup, a few steps, the failure, the exit
DEADLINE_LINE = "shutting down did not finish"  # the last resort's line: the clean shutdown must suffice

# Runs a script unchanged (as `python scripts/NAME.py ...` would) with one failure injected into
# the process of rank FAIL_RANK; the time of the failure goes to STAMP.rankR, and every process that
# gets to its exit handlers (not one killed by a signal) writes STAMP.rankR.exit.
LAUNCHER = """
import atexit, os, pathlib, runpy, sys, time
sys.path.insert(0, {repo!r})
script, where, stamp = sys.argv[1], sys.argv[2], sys.argv[3]
rank = int(os.environ.get("RANK", "0"))
atexit.register(lambda: pathlib.Path(f"{{stamp}}.rank{{rank}}.exit").write_text(str(time.time())))

def fail(what):
    pathlib.Path(f"{{stamp}}.rank{{rank}}").write_text(str(time.time()))
    raise RuntimeError(f"injected failure {{what}} on rank {{rank}}")

def fail_after_one_batch(real):  # the loader's workers started, and its iterator held by the frame
    def evaluate(model, loader, *args, **kwargs):
        batches = iter(loader)
        next(batches)
        fail("in an evaluation")
    return evaluate

if rank == int(os.environ.get("FAIL_RANK", "0")):
    from more_fast.training import loop, data
    if where == "step":
        step = loop.TrainStep.step
        def failing_step(self, it, batch):
            if it == 2:
                fail("in the step")
            return step(self, it, batch)
        loop.TrainStep.step = failing_step
    elif where == "eval":
        loop.evaluate = fail_after_one_batch(loop.evaluate)
    elif where == "evaluate.py":
        import more_fast.training.evaluate as E
        E.evaluate = fail_after_one_batch(E.evaluate)
    elif where == "worker":
        getitem, calls = data.SeededSamples.__getitem__, []
        def failing_getitem(self, key):
            calls.append(key)
            if len(calls) > 5 and os.getpid() != main_pid:  # in the worker, the third batch
                fail("in a DataLoader worker")
            return getitem(self, key)
        main_pid = os.getpid()
        data.SeededSamples.__getitem__ = failing_getitem
    elif where == "save":
        from more_fast.training import state
        save_atomic, saves = state.save_atomic, []
        def failing_save(obj, path):
            saves.append(path)
            if len(saves) == 2:
                fail("writing a checkpoint")
            return save_atomic(obj, path)
        state.save_atomic = failing_save
    else:
        raise ValueError(where)
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture
def launcher(tmp_path):
    path = tmp_path / "launcher.py"
    path.write_text(LAUNCHER.format(repo=str(REPO)))
    return path


@pytest.fixture
def env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    return {**env, "OMP_NUM_THREADS": "1", "MORE_FAST_THREADS": "1", "MORE_FAST_KERNELS": "reference",
            "PYTHONPATH": str(REPO)}


def tagged(tag: str) -> list[int]:
    """The processes whose environment holds EXIT_TEST_TAG=tag: a run's processes in any session (torchrun
    starts its workers in sessions of their own), also those orphaned by their parent's exit."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"EXIT_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


def run_until_exit(cmd, cwd, env) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` under HARD_LIMIT; a hang kills all its processes and fails. Every process it started
    must be gone when it has exited (no orphaned DataLoader worker or rank)."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "EXIT_TEST_TAG": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def kill_all() -> list[int]:
        pids = tagged(tag)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    try:
        stdout, stderr = proc.communicate(timeout=HARD_LIMIT)
    except subprocess.TimeoutExpired:
        kill_all()
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"still running after {HARD_LIMIT} s: {' '.join(map(str, cmd))}\n{stderr[-3000:]}")
    ended = time.time()
    time.sleep(0.5)  # the last ones are being reaped
    leftover = kill_all()
    assert not leftover, f"processes {leftover} outlived {cmd[:3]}\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), ended


def failed_at(stamp: pathlib.Path, rank: int = 0) -> float:
    path = pathlib.Path(f"{stamp}.rank{rank}")
    assert path.is_file(), "the failure was never injected"
    return float(path.read_text())


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_failed_quickly(proc, ended, stamp, what):
    assert proc.returncode == 1, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback (most recent call last)" in proc.stderr and f"RuntimeError: injected failure {what}" in proc.stderr
    assert DEADLINE_LINE not in proc.stderr, proc.stderr[-3000:]
    took = ended - failed_at(stamp)
    assert took < EXIT_WITHIN, f"exited {took:.1f} s after the failure"


# where the failure is injected; the newest checkpoint then: the step and the worker fail in iteration 3
# (the worker on its third batch), after the checkpoint of iteration 2; the evaluation after
# iteration 2, before its checkpoint; the second checkpoint's writing, of iteration 2
@pytest.mark.parametrize("where, what, newest", [("step", "in the step", 2), ("eval", "in an evaluation", 1),
                                                 ("worker", "in a DataLoader worker", 2),
                                                 ("save", "writing a checkpoint", 1)])
def test_train_py_exits_with_the_traceback_and_the_resume_line(tmp_path, launcher, env, where, what, newest):
    root = write_voc(tmp_path / "voc")
    out = tmp_path / "out"
    argv = tiny_argv(root, out, 6, "--save-every", "1", "--eval-every", "2")
    argv[argv.index("--workers") + 1] = "1"  # persistent training workers, and evaluation workers
    stamp = tmp_path / "failed"
    proc, ended = run_until_exit([sys.executable, str(launcher), str(REPO / "scripts" / "train.py"), where,
                                  str(stamp), *argv], tmp_path, env)
    assert_failed_quickly(proc, ended, stamp, what)
    assert sorted((out / "checkpoints").iterdir())[-1].name == f"ckpt_{newest:08d}.pt"
    newest = out / "checkpoints" / f"ckpt_{newest:08d}.pt"
    line = last_line(proc.stderr)
    assert line.startswith(f"error: the run failed (traceback above); the newest checkpoint is {newest}; resume: "), line
    assert line.endswith(f"--resume {out}"), line
    assert pathlib.Path(f"{stamp}.rank0.exit").is_file()


def test_train_py_failing_before_any_checkpoint_says_so(tmp_path, launcher, env):
    argv = tiny_argv(write_voc(tmp_path / "voc"), tmp_path / "out", 6)  # the first checkpoint would be at 6
    stamp = tmp_path / "failed"
    proc, ended = run_until_exit([sys.executable, str(launcher), str(REPO / "scripts" / "train.py"), "step",
                                  str(stamp), *argv], tmp_path, env)
    assert_failed_quickly(proc, ended, stamp, "in the step")
    line = last_line(proc.stderr)
    assert line.startswith("error: the run failed (traceback above) before writing a checkpoint; start again: "), line
    assert "--resume" not in line


def test_evaluate_py_exits_when_the_evaluation_fails(tmp_path, launcher, env):
    root = write_voc(tmp_path / "voc")
    subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *tiny_argv(root, tmp_path / "run", 1)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=HARD_LIMIT)
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt_00000001.pt"
    stamp = tmp_path / "failed"
    argv = ["--checkpoint", str(checkpoint), "--data", "voc", "--data-root", str(root), "--protocol", "train-val",
            "--crop-size", "32", "--workers", "1"]
    proc, ended = run_until_exit([sys.executable, str(launcher), str(REPO / "scripts" / "evaluate.py"),
                                  "evaluate.py", str(stamp), *argv], tmp_path, env)
    assert_failed_quickly(proc, ended, stamp, "in an evaluation")


def test_ablate_py_exits_and_names_the_command_that_resumes_the_grid(tmp_path, launcher, env):
    root = write_voc(tmp_path / "voc")
    argv = [a for a in tiny_argv(root, tmp_path / "unused", 6, "--save-every", "1") if a]
    i = argv.index("--out")
    argv[i:i + 2] = ["--out", str(tmp_path / "grid")]
    argv[argv.index("--workers") + 1] = "1"
    stamp = tmp_path / "failed"
    proc, ended = run_until_exit([sys.executable, str(launcher), str(REPO / "scripts" / "ablate.py"), "step",
                                  str(stamp), *argv], tmp_path, env)
    assert_failed_quickly(proc, ended, stamp, "in the step")
    newest = tmp_path / "grid" / "baseline" / "checkpoints" / "ckpt_00000002.pt"
    line = last_line(proc.stderr)
    assert line.startswith(f"ablate.py: error: variant baseline failed (traceback above); the newest checkpoint "
                           f"is {newest}; resume: python "), line
    assert "scripts/ablate.py" in line and "--resume" not in line  # the grid resumes unfinished variants itself


@pytest.mark.slow
def test_torchrun_one_failing_rank_ends_the_job(tmp_path, launcher, env):
    """Rank 1 fails in its third step while rank 0 waits for it in DDP's gradient all-reduce."""
    root = write_voc(tmp_path / "voc", num_train=8)
    from more_fast.data.voc import voc_dataset

    for split in ("train_aug", "val"):  # the label cache, written once here rather than by two ranks at once
        voc_dataset(root, split, split == "train_aug", 32)
    out = tmp_path / "out"
    argv = tiny_argv(root, out, 6, "--save-every", "1")  # tiny_argv says --device cpu: gloo
    argv[argv.index("--workers") + 1] = "1"
    stamp = tmp_path / "failed"
    cmd = torchrun_cmd(launcher, REPO / "scripts" / "train.py", "step", stamp, *argv)
    proc, ended = run_until_exit(cmd, tmp_path, {**env, "FAIL_RANK": "1"})
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "RuntimeError: injected failure in the step on rank 1" in proc.stderr
    assert DEADLINE_LINE not in proc.stderr, proc.stderr[-5000:]
    took = ended - failed_at(stamp, rank=1)
    assert took < EXIT_WITHIN, f"torchrun exited {took:.1f} s after the failure\n{proc.stderr[-3000:]}"
    # rank 0 fails too, in the all-reduce that lost its peer, or torchrun's SIGTERM ends it (-15): not
    # torchrun's SIGKILL at the end of its grace period (-9)
    assert "exitcode  : -9" not in proc.stderr, proc.stderr[-5000:]
    # the failing rank's last line: the newest checkpoint when it failed (rank 0 may be writing the next one)
    line = re.search(r"error: rank 1: the run failed \(traceback above\); the newest checkpoint is (\S+); "
                     r"resume: the same torchrun command with --resume (\S+)\n", proc.stderr)
    assert line, proc.stderr[-5000:]
    assert pathlib.Path(line[1]).parent == out / "checkpoints" and pathlib.Path(line[1]).is_file()
    assert line[2] == str(out)
    # torchrun's report: rank 1 is the root cause, with its traceback
    report = proc.stderr[proc.stderr.rindex("Root Cause"):]
    assert "rank      : 1" in report and "injected failure in the step on rank 1" in report, report


def test_exit_deadline_ends_a_process_whose_shutdown_hangs(env):
    """The last resort, alone: a process stuck after arming it exits with its code and one line."""
    code = "from more_fast.training import state; import time; state.exit_deadline(7, 1.0); time.sleep(120)"
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HARD_LIMIT)
    assert proc.returncode == 7 and time.time() - started < 60, proc.stderr
    assert last_line(proc.stderr) == f"error: {DEADLINE_LINE} in 1 s; exiting without waiting for it"


def test_main_in_process_returns_1_and_arms_no_hard_exit(tmp_path, monkeypatch, capsys):
    """A caller of train.py's main() goes on after a failure: the hard exit is the script's alone."""
    import threading

    from more_fast.training import loop
    from test_faults import load_script

    def failing_step(self, it, batch):
        raise RuntimeError("injected failure in the step")

    monkeypatch.setattr(loop.TrainStep, "step", failing_step)
    monkeypatch.setenv("MORE_FAST_KERNELS", "reference")
    out = tmp_path / "out"
    assert load_script("train").main(tiny_argv(write_voc(tmp_path / "voc"), out, 3)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: injected failure in the step" in err
    assert last_line(err).startswith("error: the run failed (traceback above) before writing a checkpoint")
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]
