"""What scripts/prepare_voc.py and scripts/prepare_coco.py share: checked inputs, safe writes,
progress with an ETA, a pool of workers.

Every output file is written atomically (a temporary file in the same folder, then os.replace),
so an interrupted run leaves whole files only and a rerun resumes where it stopped. A file that
is already there is compared with what would be written: the same content (for masks: the same
labels, whatever the PNG encoding or palette) is kept untouched; different content is a
`Conflict` unless `force` is set, so nothing the user made is overwritten by accident.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from more_fast.data.labels import read_mask
from more_fast.data.palette import save_label_png

WRITTEN, SAME, REPLACED = "written", "same", "replaced"  # what a write did


class PrepareError(Exception):
    """A one-line reason to stop: the scripts print it and exit with status 2."""


class Conflict(PrepareError):
    """An existing file differs from what would be written (and `force` is off)."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{path} exists and differs from {what}; rerun with --force to overwrite it")
        self.path = path


def require(path: Path, kind: str, expected: str) -> Path:
    """`path` if it is a `kind` ('dir' or 'file'); else a PrepareError naming what is missing."""
    ok = path.is_dir() if kind == "dir" else path.is_file()
    if not ok:
        what = f"{path.name}/ folder" if kind == "dir" else f"{path.name} file"
        raise PrepareError(f"no {what} under {path.parent}: expected {expected}")
    return path


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_STALE = re.compile(r"^\..+\.tmp\d+$")


def remove_stale(folder: Path) -> int:
    """Delete the temporary files that a killed run left in `folder` (only names `_tmp` makes)."""
    removed = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if _STALE.match(path.name) and (path.is_file() or path.is_symlink()):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)  # readers see no file or the whole new one, never a part
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_mask(path: Path, label: np.ndarray, force: bool, what: str) -> str:
    """Write `label` (H x W uint8) as a VOC palette PNG at `path`, unless it already holds it.

    Returns SAME (kept), WRITTEN (new) or REPLACED (differed; `force`). `what` names the source
    in a Conflict's message."""
    if path.exists():
        try:
            old = read_mask(path)
        except (OSError, SyntaxError, ValueError):
            old = None  # unreadable (a foreign or truncated file): it differs
        if old is not None and old.shape == label.shape and np.array_equal(old, label):
            return SAME
        if not force:
            raise Conflict(path, what)
        _replace_atomic(path, lambda tmp: save_label_png(tmp, label))
        return REPLACED
    _replace_atomic(path, lambda tmp: save_label_png(tmp, label))
    return WRITTEN


def write_text(path: Path, text: str, force: bool, what: str) -> str:
    """Write `text` to `path` atomically unless it already holds exactly that (SAME)."""
    data = text.encode()
    if path.exists():
        if path.is_file() and path.read_bytes() == data:
            return SAME
        if not force:
            raise Conflict(path, what)
        status = REPLACED
    else:
        status = WRITTEN
    _replace_atomic(path, lambda tmp: tmp.write_bytes(data))
    return status


def link_dir(link: Path, target: Path, force: bool) -> str:
    """`link` -> `target` as a relative symbolic link to a folder (SAME if it already points there;
    a folder with the same files is also SAME: a copy the user made)."""
    target = target.resolve()
    if link.is_symlink() or link.exists():
        if link.resolve() == target:
            return SAME
        if not link.is_symlink():
            if link.is_dir() and {p.name for p in link.iterdir()} == {p.name for p in target.iterdir()}:
                return SAME  # a copy of the folder (e.g. made with --copy-images)
            raise PrepareError(f"{link} exists and is not a link to {target}: move it away "
                               "(--force replaces links only)")
        if not force:
            raise Conflict(link, f"a link to {target}")
        link.unlink()
        status = REPLACED
    else:
        status = WRITTEN
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(link)
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent.resolve()), tmp, target_is_directory=True)
    os.replace(tmp, link)
    return status


def copy_file(src: Path, dst: Path, force: bool) -> str:
    """Copy `src` to `dst` atomically unless `dst` already has the same bytes."""
    if dst.exists():
        if dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
            return SAME
        if not force:
            raise Conflict(dst, f"{src}")
        status = REPLACED
    else:
        status = WRITTEN
    _replace_atomic(dst, lambda tmp: tmp.write_bytes(src.read_bytes()))
    return status


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`what: done/total (pct), rate/s, elapsed, ETA` on `stream` (stderr): redrawn in place on a
    terminal, else one line every `every` seconds; always a last line when done."""

    def __init__(self, total: int, what: str, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.total, self.what, self.done = total, what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.5 if self.tty else every
        self.start = self.last = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _clock(left) if left == left else "?"
        return (f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), {rate:.1f}/s, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            end = "\n" if self.done >= self.total or not self.tty else ""
            print(("\r" if self.tty else "") + self.line(), end=end, file=self.stream, flush=True)


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int, what: str,
              stream: TextIO | None = None) -> Iterator[Any]:
    """fn(task) for every task, in any order, with progress; `workers` > 1 forks a pool.

    fn returns its result or raises PrepareError (which stops the run: the pool is ended and the
    error raised here, so the caller prints one line)."""
    progress = Progress(len(tasks), what, stream)
    if not tasks:
        progress.update(0)
        return
    if workers <= 1 or len(tasks) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for task in tasks:
            yield fn(task)
            progress.update()
        return
    global _FN
    ctx = multiprocessing.get_context("fork")  # the children inherit _FN: fn need not be importable
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    _FN = fn
    try:
        with ctx.Pool(workers) as pool:
            for result in pool.imap_unordered(_call, tasks, chunksize=chunk):
                if isinstance(result, _Failed):
                    pool.terminate()
                    raise PrepareError(result.message)
                yield result
                progress.update()
    finally:
        _FN = None


_FN: Callable[[Any], Any] | None = None  # the function of the pool in flight (set before the fork)


class _Failed:
    def __init__(self, message: str) -> None:
        self.message = message


def _call(task: Any) -> Any:
    try:
        return _FN(task)
    except PrepareError as err:  # sent back as its message: it names the file
        return _Failed(str(err))


def default_workers() -> int:
    """The cores this process may use, at most 8 (the work is mostly PNG encoding)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def count(statuses: Iterable[str]) -> dict[str, int]:
    out = {WRITTEN: 0, SAME: 0, REPLACED: 0}
    for status in statuses:
        out[status] = out.get(status, 0) + 1
    return out


def describe(counts: dict[str, int]) -> str:
    """'3 written, 2 already there, 0 replaced'."""
    return (f"{counts.get(WRITTEN, 0)} written, {counts.get(SAME, 0)} already there, "
            f"{counts.get(REPLACED, 0)} replaced")
