"""Run folders: ``<out_dir>/runs/<run_id>/{run.json, metrics.json}``, written atomically.

``run_id`` is a stable hash of the semantic configuration (task, method, seed), never a timestamp, so
launching a sweep again finds its finished runs and skips them. A per-run ``flock`` guards against two
processes running the same point; a process that dies releases it, so its ``running`` run is redone.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from core.io import read_json, stable_hash, write_json_atomic

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
STATUSES = ("running", "done", "failed")
PACKAGES = ("torch", "torchvision", "timm", "transformers", "tokenizers", "lm-eval", "datasets", "hydra-core",
            "hydra-submitit-launcher", "submitit", "wandb", "safetensors", "numpy", "pandas", "scikit-learn")
CODE_ROOT = Path(__file__).resolve().parents[1]


def record_problem(run_dir: Path) -> str | None:
    """Why the record of a run folder is not a readable, valid one (None when it is, or when there is none): a
    ``run.json`` that is unreadable, names another run or an unknown status, or a ``done`` run whose
    ``metrics.json`` is missing, unreadable, not a flat object of numbers / strings / booleans / nulls, or lacks the
    run's main metric or ``scope/removed_fraction``."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_JSON).exists():
        return None
    rec = read_json(run_dir / RUN_JSON)
    if rec is None:
        return f"{RUN_JSON} is unreadable"
    if rec.get("run_id") != run_dir.name or rec.get("status") not in STATUSES:
        return f"{RUN_JSON} names run {rec.get('run_id')!r} with status {rec.get('status')!r}"
    if rec["status"] != "done":
        return None
    metrics = read_json(run_dir / METRICS_JSON)
    if metrics is None:
        return f"{METRICS_JSON} is missing or unreadable"
    bad = [k for k, v in metrics.items() if v is not None and not isinstance(v, (int, float, str, bool))]
    if bad:
        return f"{METRICS_JSON} has non-scalar values: {', '.join(sorted(bad)[:3])}"
    main = (rec.get("summary") or {}).get("main_metric")
    missing = [k for k in ("scope/removed_fraction", main) if k is not None and k not in metrics]
    if missing or main is None:
        return f"{METRICS_JSON} lacks {', '.join(missing) or 'the summary main metric'}"
    return None


def run_status(run_dir: Path) -> str | None:
    """``running``, ``done`` or ``failed`` as ``run.json`` says; ``damaged`` when ``record_problem`` finds one (the
    run is redone); None when the run never started."""
    if record_problem(run_dir) is not None:
        return "damaged"
    rec = read_json(Path(run_dir) / RUN_JSON)
    return rec.get("status") if rec else None


def make_run_id(task_name: str, method_name: str, semantic: dict[str, Any]) -> str:
    """``<task>-<method>-<hash>``: readable, and a pure function of the semantic config."""
    return f"{task_name}-{method_name}-{stable_hash(semantic)}"


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=CODE_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info.update(gpu=torch.cuda.get_device_name(idx), gpu_count=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version(),
                    gpu_memory_bytes=torch.cuda.get_device_properties(idx).total_memory)
    return info


def write_benchmark(path: Path, device: torch.device, settings: dict[str, Any], **results: Any) -> dict[str, Any]:
    """A benchmark's JSON (date, torch version, device, settings and ``results``), written atomically; returned."""
    import datetime

    out = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": device_info(device),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}, **results}
    write_json_atomic(path, out)
    return out


def slurm_ids() -> dict[str, str] | None:
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
            "restart_count": "SLURM_RESTART_COUNT", "node": "SLURMD_NODENAME"}
    ids = {k: os.environ[v] for k, v in keys.items() if v in os.environ}
    return ids or None


class RunRecord:
    """The ``run.json`` of one run; every change is written through atomically."""

    def __init__(self, run_dir: Path, data: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.data = data
        self._stage_start: dict[str, float] = {}

    @classmethod
    def start(cls, run_dir: Path, run_id: str, config: dict[str, Any], overrides: list[str], seed: int,
              device: torch.device, experiment: str) -> "RunRecord":
        previous = read_json(Path(run_dir) / RUN_JSON) or {}
        data = {
            "run_id": run_id, "status": "running", "experiment": experiment, "config": config,
            "overrides": list(overrides), "seeds": {"seed": seed}, "stages": {}, "error": None, "traceback": None,
            "failure_reason": None, "attempt": int(previous.get("attempt", 0)) + 1,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_at": None,
            "git": git_state(), "packages": package_versions(), "device": device_info(device),
            "hostname": socket.gethostname(), "slurm": slurm_ids(), "pid": os.getpid(),
        }
        rec = cls(run_dir, data)
        rec.save()
        return rec

    def save(self) -> None:
        write_json_atomic(self.run_dir / RUN_JSON, self.data)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (seconds, wall clock) into ``stages``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.data["stages"][name] = round(time.perf_counter() - t0, 4)
            self.save()

    def finish(self, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / METRICS_JSON, metrics)
        self.data.update(status="done", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.save()

    def fail(self, reason: str, error: str, tb: str, extra: dict[str, Any] | None = None) -> None:
        self.data.update(status="failed", failure_reason=reason, error=error, traceback=tb,
                         finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if extra:
            self.data.update(extra)
        self.save()
