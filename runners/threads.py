"""How many intra-op threads torch may use: the CPUs this process may run on, shared fairly with its neighbours.

On a node shared with other jobs (a cluster node, CI, several local sweep workers) torch's default of one thread
per core oversubscribes: OpenMP's barriers wait for a thread that another process has pre-empted, and a forward
runs 10-30x slower. ``pick_threads`` starts from the CPUs the process may use (``os.sched_getaffinity``, capped by
``SLURM_CPUS_PER_TASK``), divides them among ``COMPBENCH_WORKERS`` concurrent workers of one sweep, and leaves out
the CPUs other processes keep busy right now (sampled from ``/proc/stat`` over a fraction of a second). An explicit
count (``measure.threads`` or ``COMPBENCH_THREADS``) wins over all of that.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from core.errors import ConfigError

THREADS_ENV = "COMPBENCH_THREADS"
WORKERS_ENV = "COMPBENCH_WORKERS"


def _positive_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r} must be a positive integer")
    return value


def allowed_cpus() -> list[int]:
    """The CPU ids this process may run on (affinity mask; all CPUs where the platform has none)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """(busy, total) jiffies per CPU id from /proc/stat, or None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted, out = set(cpus), {}
    for line in lines:
        head, *fields = line.split()
        if not head.startswith("cpu") or head == "cpu":
            continue
        cpu = int(head[3:])
        if cpu in wanted:
            ticks = [int(f) for f in fields[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            out[cpu] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_cpus(cpus: list[int], sample_s: float = 0.25) -> float:
    """How many of ``cpus`` other processes keep busy: summed busy fraction over ``sample_s`` seconds (this
    process sleeps meanwhile, so the load is its neighbours'). 0 where /proc/stat is unavailable."""
    before = _cpu_times(cpus)
    if not before:
        return 0.0
    time.sleep(sample_s)
    after = _cpu_times(cpus) or {}
    busy = 0.0
    for cpu, (b0, t0) in before.items():
        b1, t1 = after.get(cpu, (b0, t0))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy


def pick_threads(requested: int = 0) -> dict[str, Any]:
    """Decide torch's intra-op thread count. ``requested`` > 0 (``measure.threads``) is used as given; else
    ``COMPBENCH_THREADS``; else ``auto``: usable CPUs // workers, minus the CPUs that are busy now, at least 1.

    Returns ``protocol/threads`` (the count), ``protocol/threads_source`` (config | env | auto) and, for ``auto``,
    ``protocol/threads_cpus`` (usable CPUs) and ``protocol/threads_busy`` (busy CPUs seen at the start)."""
    if requested < 0:
        raise ConfigError(f"measure.threads={requested} must be >= 0 (0: pick from the usable CPUs)")
    if requested:
        return {"protocol/threads": requested, "protocol/threads_source": "config"}
    env = _positive_env(THREADS_ENV)
    if env is not None:
        return {"protocol/threads": env, "protocol/threads_source": "env"}
    cpus = allowed_cpus()
    usable = len(cpus)
    slurm = _positive_env("SLURM_CPUS_PER_TASK")
    if slurm is not None:
        usable = min(usable, slurm)
    share = max(1, usable // (_positive_env(WORKERS_ENV) or 1))
    busy = busy_cpus(cpus)
    free = usable - round(busy)
    return {"protocol/threads": max(1, min(share, free)), "protocol/threads_source": "auto",
            "protocol/threads_cpus": usable, "protocol/threads_busy": round(busy, 2)}


@contextmanager
def use_threads(requested: int = 0) -> Iterator[dict[str, Any]]:
    """Set torch's intra-op threads to ``pick_threads(requested)`` inside the block (restored after it); yields the
    ``protocol/threads*`` fields to record."""
    chosen, before = pick_threads(requested), torch.get_num_threads()
    torch.set_num_threads(chosen["protocol/threads"])
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)
