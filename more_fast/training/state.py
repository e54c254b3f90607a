"""Checkpoints: written atomically, holding everything needed to resume exactly; stop signals."""
from __future__ import annotations

import os
import pathlib
import random
import re
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch

from ..io import save_atomic  # noqa: F401  (re-exported: the Trainer saves through state.save_atomic)

CKPT_RE = re.compile(r"ckpt_(\d{8})\.pt$")
PARTIAL_RE = re.compile(r"^\.ckpt_\d{8}\.pt\.tmp(\d+)$")  # io.save_atomic's temporary file: .NAME.tmpPID


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators: a run's saved RNG state then depends on
    its seed alone, not on the entropy its process started with."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out: pathlib.Path, iteration: int) -> pathlib.Path:
    return out / "checkpoints" / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(folder: pathlib.Path) -> list[pathlib.Path]:
    """Checkpoints in `folder` (or its checkpoints/ subfolder), newest first."""
    folder = pathlib.Path(folder)
    sub = folder / "checkpoints"
    search = sub if sub.is_dir() else folder
    found = [p for p in search.iterdir() if CKPT_RE.search(p.name)] if search.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.search(p.name).group(1)), reverse=True)


def load_latest(folder: pathlib.Path, map_location="cpu") -> tuple[Optional[dict], Optional[pathlib.Path]]:
    """The newest checkpoint that loads; a truncated or corrupt one is reported and skipped."""
    folder = pathlib.Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"--resume: no such folder {folder}")
    for path in list_checkpoints(folder):
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
            if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
                raise ValueError("not a more_fast training checkpoint")
            return state, path
        except Exception as err:  # report it by name and fall back to the previous one
            print(f"warning: checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                  "trying the previous one", file=sys.stderr)
    return None, None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process: alive
        return True
    return True


def remove_partial_checkpoints(out: pathlib.Path) -> list[pathlib.Path]:
    """Delete the temporary files of saves that never finished (a `kill -9` or a power cut while
    save_atomic wrote: `.ckpt_N.pt.tmpPID`). A file whose writer is still running (another process
    saving into the same folder) is left alone. Returns the deleted paths."""
    folder = pathlib.Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    doomed = []
    for path in sorted(folder.iterdir()):
        match = PARTIAL_RE.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            doomed.append(path)
    return doomed


def prune_checkpoints(out: pathlib.Path, keep: int, protect: Optional[int] = None) -> list[pathlib.Path]:
    """Delete all but the newest `keep` checkpoints of `out`, sparing the one at iteration `protect`
    (the best by validation mIoU). Returns the deleted paths."""
    found = list_checkpoints(out) if pathlib.Path(out).exists() else []
    doomed = [p for p in found[keep:] if protect is None or int(CKPT_RE.search(p.name).group(1)) != protect]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def diff_states(a, b, where: str = "") -> list[str]:
    """Where two checkpoint states differ: tensors compared with torch.equal (bit for bit), dicts,
    lists and tuples entry by entry, anything else with ==. An empty list: identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where or "."]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in diff_states(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_states(x, y, f"{where}[{i}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [where or "."]
    return [] if a == b else [where or "."]


# the exit status after a stop signal: 128 + the signal for SIGINT and SIGTERM, as a shell reports a
# process they ended; 0 for SIGUSR1, the pre-emption warning: the run saved and stopped as asked
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 0}


class StopSignals:
    """SIGINT, SIGTERM and SIGUSR1 set `signum` instead of ending the process; the training loop
    polls it after each step, saves and stops. A second signal while stopping changes nothing
    (the checkpoint is written to a temporary file and renamed, and the process exits right after
    it); SIGKILL still ends the process, leaving the previous checkpoints intact."""

    def __init__(self, quiet: bool = False):
        self.signum = 0
        self.quiet = quiet
        self._pid = os.getpid()
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process stops the run
            return
        if self.signum:
            if not self.quiet:  # os.write: a handler may run while the main thread is inside print()
                os.write(2, f"{signal.Signals(signum).name} received while stopping: ignored; the checkpoint "
                            "is being written and the run exits right after it\n".encode())
            return
        self.signum = signum


# how long a failed run may take to shut down before exit_deadline ends it
CLEANUP_SECONDS = 20.0


def exit_deadline(code: int, seconds: float = CLEANUP_SECONDS) -> threading.Timer:
    """End the process with `code` in `seconds` unless it has exited by then: the last resort of a
    failed run, armed once its traceback and message are out and flushed, whose shutdown (DataLoader
    workers, compile workers, the process group) can still block where Python cannot interrupt it,
    e.g. in an NCCL communicator whose peer is gone. A batch job that does not exit holds its GPUs.

    os.write and no flush: the main thread may hold the lock of sys.stderr while it is stuck."""
    def hard_exit() -> None:
        os.write(2, f"error: shutting down did not finish in {seconds:.0f} s; exiting without waiting for it\n"
                 .encode())
        os._exit(code)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True  # never what keeps a process alive, and alive through the exit handlers
    timer.start()
    return timer


def shut_down_compile_workers() -> None:
    """Inductor's compile-worker processes, if this process started any (--compile): a failed run
    ends them before anything that may block, since exit_deadline's hard exit skips the exit
    handlers (inductor's own among them)."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    if async_compile is not None:
        async_compile.shutdown_compile_workers()


def wait_for_next_second() -> None:
    """Sleep into the next whole second of the clock (at most 1 s)."""
    now = time.time()
    time.sleep(int(now) + 1 - now + 0.01)
