"""CPU thread choice: the cores free to the process, from affinity, cgroup quota and /proc/stat."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from more_fast.training import threads as T

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cpus, quota, local_world, free, default, want", [
    (2, None, 1, 2.0, 2, (2, 2)),  # idle machine: torch's default
    (2, None, 1, 1.02, 2, (1, 1)),  # one busy loop on one of 2 cores
    (2, None, 1, 0.0, 2, (1, 1)),  # everything busy: still one thread
    (2, None, 1, 1.6, 2, (2, 2)),  # a part-time competitor rounds away
    (16, 4.0, 1, 16.0, 8, (4, 4)),  # a cgroup quota of 4 cores caps 16 allowed ones
    (16, 2.5, 1, 16.0, 8, (2, 2)),  # a fractional quota rounds down
    (16, None, 2, 16.0, 8, (8, 8)),  # two torchrun processes share the machine
    (16, None, 4, 6.0, 16, (2, 2)),  # ... and the free cores
    (32, None, 1, 32.0, 16, (16, 32)),  # never above torch's own default (physical cores)
    (2, None, 1, None, 2, (2, 2)),  # no load figure: the allowed cores
])
def test_choose(cpus, quota, local_world, free, default, want):
    assert T.choose(cpus, quota, local_world, free, default) == want


def test_cgroup_v2_and_v1_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(pathlib.Path, "read_text", _reader(tmp_path, pathlib.Path.read_text))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert T.cgroup_cpu_limit(tmp_path) == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert T.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert T.cgroup_cpu_limit(tmp_path) == pytest.approx(3.0)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert T.cgroup_cpu_limit(tmp_path) is None


def _reader(tmp_path, real):
    """/proc/self/cgroup as a process in the root v2 group, whatever this machine has."""
    def read_text(self, *a, **kw):
        if str(self) == "/proc/self/cgroup":
            return "0::/\n"
        return real(self, *a, **kw)
    return read_text


def _stat(times):
    """A /proc/stat text with cpu<i> lines from {i: (busy jiffies, idle jiffies)}."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for i, (busy, idle) in times.items():
        lines.append(f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0")
    return "\n".join(lines + ["intr 1", "procs_running 3"]) + "\n"


def test_free_cores_sums_idle_shares_of_allowed_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(_stat({0: (1000, 1000), 1: (1000, 1000), 2: (0, 0)}))
    # over the window: cpu0 all busy (a busy loop), cpu1 three-quarters idle, cpu2 not ours
    later = _stat({0: (1100, 1000), 1: (1025, 1075), 2: (0, 100)})
    monkeypatch.setattr(T.time, "sleep", lambda s: stat.write_text(later))
    assert T.free_cores([0, 1], seconds=0.0, stat=stat) == pytest.approx(0.75)
    assert T.free_cores([0, 1], seconds=0.0, stat=tmp_path / "missing") is None


def _configure_in_fresh_process(env, tmp_path):
    code = textwrap.dedent("""
        import torch
        from more_fast.training import threads as T
        first, workers = T.apply(4)
        n = torch.get_num_threads()
        torch.set_num_threads(n + 1)
        T.apply(4)  # the decision is made once per process, and applied again
        print(first, "|", n, workers, "|", torch.get_num_threads() == n)
    """)
    full = {k: v for k, v in os.environ.items()
            if k not in ("MORE_FAST_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    full.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=tmp_path,
                          timeout=300)


def test_more_fast_threads_forces_the_count(tmp_path):
    res = _configure_in_fresh_process({"MORE_FAST_THREADS": "3"}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "cpu threads 3 (MORE_FAST_THREADS) | 3 4 | True"


def test_more_fast_threads_rejects_bad_values(tmp_path):
    res = _configure_in_fresh_process({"MORE_FAST_THREADS": "two"}, tmp_path)
    assert res.returncode != 0
    assert "MORE_FAST_THREADS: expected a positive integer, got 'two'" in res.stderr


def test_omp_num_threads_is_left_to_torch(tmp_path):
    res = _configure_in_fresh_process({"OMP_NUM_THREADS": "1"}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "cpu threads 1 (OMP_NUM_THREADS is set) | 1 4 | True"


def test_automatic_choice_stays_within_the_allowed_cores(tmp_path):
    res = _configure_in_fresh_process({}, tmp_path)
    assert res.returncode == 0, res.stderr
    note, numbers, same = (part.strip() for part in res.stdout.split("|"))
    threads, workers = (int(v) for v in numbers.split())
    assert note.startswith(f"cpu threads {threads} ({len(os.sched_getaffinity(0))} cores allowed")
    assert 1 <= threads <= len(os.sched_getaffinity(0)) and 1 <= workers <= 4
    assert same == "True"
