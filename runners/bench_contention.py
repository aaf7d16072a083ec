"""The main job on a shared machine: wall time quiet, and with CPU-bound competitors on the same CPUs.

    python -m runners.bench_contention                        # the main job (experiment=demo), quiet then 1 spinner
    python -m runners.bench_contention --competitors 0 1 2 --out results/bench/contention.json
    python -m runners.bench_contention --job "task=demo_lm method=svd method.ratio=0.5"   # a shorter job

Every trial runs ``python -m runners.run -m <job> out_dir=<fresh temporary folder>`` (so nothing is skipped; the
pretrained demo models come from the shared cache) while ``k`` competitor processes spin on pure-Python busy loops
(one CPU each, started before the job and stopped after it). The harness picks its intra-op threads from the free
CPUs (``runners.threads``); ``--threads N`` fixes them (``COMPBENCH_THREADS``) to show what oversubscription costs.
Prints a table (wall seconds and the ratio to the quiet trial) and writes it as JSON with the machine's load.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from runners.record import CODE_ROOT, write_benchmark


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def trial(job: list[str], competitors: int, threads: int | None) -> dict[str, Any]:
    """Wall seconds of one run of ``job`` (runners.run arguments) with ``competitors`` busy-loop processes."""
    stop = mp.get_context("spawn").Event()
    spinners = [mp.get_context("spawn").Process(target=_spin, args=(stop,), daemon=True) for _ in range(competitors)]
    for s in spinners:
        s.start()
    env = dict(os.environ)
    if threads:
        env["COMPBENCH_THREADS"] = str(threads)
    try:
        time.sleep(0.5 if competitors else 0)
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "runners.run", "-m", *job, f"out_dir={out}", "logger=none",
                                   "progress=false"], cwd=CODE_ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            runs = len(list(Path(out, "runs").glob("*/metrics.json")))
    finally:
        stop.set()
        for s in spinners:
            s.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"the job failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"competitors": competitors, "threads": threads or "auto", "wall_s": round(wall, 1), "runs_done": runs,
            "load_1min_at_start": round(load_before, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="experiment=demo", help="runners.run overrides of the job (default: main job)")
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 1], help="busy-loop processes per trial")
    ap.add_argument("--threads", type=int, default=None, help="fix torch's intra-op threads (default: auto)")
    ap.add_argument("--out", type=Path, default=Path("results/bench/contention.json"))
    args = ap.parse_args(argv)
    if any(c < 0 for c in args.competitors) or (args.threads is not None and args.threads < 1):
        raise SystemExit("--competitors must be >= 0 and --threads >= 1")
    job = shlex.split(args.job)
    rows = []
    for k in args.competitors:
        rows.append(trial(job, k, args.threads))
        print(f"competitors={k}: {rows[-1]['wall_s']} s", flush=True)
    quiet = next((r["wall_s"] for r in rows if r["competitors"] == 0), None)
    for r in rows:
        r["vs_quiet"] = round(r["wall_s"] / quiet, 2) if quiet else None
    print(f"\n{'competitors':>11} {'threads':>7} {'wall s':>8} {'x quiet':>8} {'load':>6}")
    for r in rows:
        print(f"{r['competitors']:>11} {str(r['threads']):>7} {r['wall_s']:>8} {str(r['vs_quiet']):>8} "
              f"{r['load_1min_at_start']:>6}")
    return write_benchmark(args.out, torch.device("cpu"), {**vars(args), "cpus": len(os.sched_getaffinity(0))},
                           rows=rows)


if __name__ == "__main__":
    main()
