"""How many CPU threads the training process uses: the cores that are actually free to it.

torch starts one intra-op thread per physical core, whoever else runs there. Its parallel
regions end at a barrier, so when another CPU-bound process takes one of those cores, every
region waits for the thread that shares a core with it: on 2 cores with one competing busy loop
the CPU main job ran at under a third of its idle speed, where a fair share of the cores gives
about half. Using only the cores nobody else is busy on avoids that stall.

The choice, made once per process (a second Trainer in the same process reuses it, so that two
runs of one process never differ in thread count and hence in floating-point reduction order):
- the cores this process may run on: its CPU affinity, capped by a cgroup CPU quota
  (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), divided among the
  processes that torchrun starts on this machine (LOCAL_WORLD_SIZE);
- of those, the ones free now: the idle share of each allowed core over a short window of
  /proc/stat, summed and rounded (where /proc/stat does not exist: cores minus the 1-minute load
  average);
- intra-op threads = that many, at least 1 and never more than torch's own default;
- DataLoader workers: the configured number, capped at the same count.
An explicit choice wins: MORE_FAST_THREADS=N sets the thread count, and OMP_NUM_THREADS /
MKL_NUM_THREADS (which torch reads itself) leave torch's count untouched. The load is sampled
once, before the run starts: a competitor that starts later is not seen.
"""
from __future__ import annotations

import math
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

SAMPLE_SECONDS = 0.5  # the /proc/stat window: long enough to see a busy loop, short next to a run


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    workers_cap: Optional[int]  # None: the configured DataLoader workers stand
    note: str


_CHOICE: Optional[ThreadChoice] = None


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: pathlib.Path = pathlib.Path("/sys/fs/cgroup")) -> Optional[float]:
    """The CPU quota of this process's cgroup in cores, or None when there is none."""
    candidates = [root / "cpu.max"]
    try:
        for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, path = line.split(":", 2)
            if hierarchy == "0":  # cgroup v2: the process's own group
                candidates.insert(0, root / path.lstrip("/") / "cpu.max")
    except OSError:
        pass
    for path in candidates:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """/proc/stat text -> {cpu index: (idle + iowait jiffies, total jiffies)}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (values[3] + values[4], sum(values))
    return out


def free_cores(cpus: Sequence[int], seconds: float = SAMPLE_SECONDS, stat=pathlib.Path("/proc/stat")) -> Optional[float]:
    """The summed idle share of `cpus` over `seconds` (this process sleeps meanwhile), or None."""
    try:
        before = _cpu_times(stat.read_text())
        time.sleep(seconds)
        after = _cpu_times(stat.read_text())
    except OSError:
        return None
    free = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            idle = after[cpu][0] - before[cpu][0]
            total = after[cpu][1] - before[cpu][1]
            free += idle / total if total > 0 else 1.0
    return free


def choose(cpus: int, quota: Optional[float], local_world: int, free: Optional[float], default: int) -> tuple[int, int]:
    """(intra-op threads, DataLoader worker cap) from the numbers that `configure` measures."""
    cap = cpus if quota is None else min(cpus, max(1, math.floor(quota)))
    cap = max(1, cap // max(1, local_world))
    usable = cap if free is None else min(cap, max(1, int(free / max(1, local_world) + 0.5)))
    return max(1, min(default, usable)), usable


def configure() -> ThreadChoice:
    """Set torch's intra-op thread count for this process once; returns the choice and its reason."""
    global _CHOICE
    if _CHOICE is not None:
        torch.set_num_threads(_CHOICE.threads)  # undo whatever changed it since the first Trainer
        return _CHOICE
    default = torch.get_num_threads()
    forced = os.environ.get("MORE_FAST_THREADS", "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"MORE_FAST_THREADS: expected a positive integer, got {forced!r}")
        torch.set_num_threads(int(forced))
        _CHOICE = ThreadChoice(int(forced), None, f"cpu threads {forced} (MORE_FAST_THREADS)")
        return _CHOICE
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            _CHOICE = ThreadChoice(default, None, f"cpu threads {default} ({var} is set)")
            return _CHOICE
    cpus = allowed_cpus()
    quota = cgroup_cpu_limit()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    free = free_cores(cpus)
    if free is None and hasattr(os, "getloadavg"):
        free = max(0.0, (os.cpu_count() or len(cpus)) - os.getloadavg()[0])
    threads, workers_cap = choose(len(cpus), quota, local_world, free, default)
    torch.set_num_threads(threads)
    parts = [f"{len(cpus)} cores allowed"]
    if quota is not None:
        parts.append(f"cgroup quota {quota:g}")
    if local_world > 1:
        parts.append(f"{local_world} processes on this machine")
    if free is not None:
        parts.append(f"{free:.1f} free now")
    _CHOICE = ThreadChoice(threads, workers_cap, f"cpu threads {threads} ({', '.join(parts)})")
    return _CHOICE


def apply(workers: int) -> tuple[str, int]:
    """The Trainer's call: threads for this process; (a log line, the DataLoader workers to use:
    `workers` capped at the free cores). The config keeps the number the user set."""
    choice = configure()
    note = choice.note
    if choice.workers_cap is not None and workers > choice.workers_cap:
        note += f"; DataLoader workers {workers} -> {choice.workers_cap}"
        workers = choice.workers_cap
    return note, workers
