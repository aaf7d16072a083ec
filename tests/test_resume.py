"""Interrupted runs and failures inside a sweep (CPU, no Slurm).

* a sweep process killed with SIGKILL in the middle of a run, then launched again: finished runs untouched (byte
  for byte), the killed run redone from its compressed-model checkpoint with the metrics of an uninterrupted run;
* stage checkpoints: an interrupted run resumes without recompressing, ``ctx.checkpointed`` computes once, a
  finished (done or failed) run leaves none behind;
* failure reasons: NaN -> ``nan``, out of memory -> ``oom`` with the memory reached, anything else -> ``error``.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import methods.svd
from core.io import read_json
from methods import CompressContext
from runners.record import METRICS_JSON, RUN_JSON
from runners.run import STAGE_DIR, execute, plan
from tests.conftest import ROOT, TINY

# measured on the machine, different from one execution to the next; everything else in metrics.json is a
# deterministic function of the config (quality, accounting, FLOPs, bytes on disk, protocol fields)
MEASURED = {"latency_ms", "latency_iqr_ms", "throughput", "peak_mem_bytes", "compress_s", "latency_repeats",
            "decode_ms_per_token", "decode_iqr_ms", "decode_noisy", "latency_noisy", "process_rss_peak_bytes",
            "speedup/latency", "protocol/threads", *(f"dense/{k}" for k in ("latency_ms", "latency_iqr_ms",
                                                                            "throughput", "latency_repeats",
                                                                            "latency_noisy"))}


def deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in MEASURED and not k.startswith("compress/")}


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``condition()`` until it returns something true; fail if ``proc`` ends first (showing ``log``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}\n{tail}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- kill -9 in the middle of a sweep --------------------------------------------------------------------------------
def test_sweep_killed_with_sigkill_and_relaunched(task_cfg, tmp_path, shared_cache):
    """3-point sweep on demo_resnet; SIGKILL once run 1 is done and run 2 has written its compressed-model
    checkpoint (it is then evaluating / measuring); launch again."""
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "runners.run", "-m", "task=demo_resnet", "method=dense,magnitude,svd",
            "method.ratio=0.5", *TINY["demo_resnet"], "logger=none", "progress=false", f"out_dir={out}",
            f"cache_dir={shared_cache}", "measure.min_run_time_s=0.5", "measure.warmup=1"]
    runs = out / "runs"

    def status(run_dir: Path):
        return (read_json(run_dir / RUN_JSON) or {}).get("status")

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def killable():
                done = [d for d in runs.glob("*/") if status(d) == "done"]
                mid = [d for d in runs.glob("*/") if (d / STAGE_DIR / "compressed.json").is_file()
                       and status(d) == "running"]
                return (done, mid[0]) if done and mid else None

            done, killed = wait_for(killable, 300, "a done run and a run past its compress stage", proc,
                                    tmp_path / "first.log")
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert status(killed) == "running" and read_json(killed / RUN_JSON)["attempt"] == 1
    snapshot = {p: p.read_bytes() for d in done for p in d.rglob("*") if p.is_file()}
    started = {d.name for d in runs.glob("*/")}

    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {p: p.read_bytes() for d in done for p in d.rglob("*") if p.is_file()} == snapshot  # untouched
    records = {d.name: read_json(d / RUN_JSON) for d in runs.glob("*/")}
    assert len(records) == 3 and all(r["status"] == "done" for r in records.values())
    redone = records[killed.name]
    assert redone["attempt"] == 2 and redone["resumed_from"] == "compressed"
    assert all(records[n]["attempt"] == 1 for n in records if n != killed.name)
    assert len(started) == 2 and not (killed / STAGE_DIR).exists()

    # the same point, uninterrupted, in this process
    method = redone["summary"]["method"]
    reference = task_cfg("demo_resnet", f"method={method}", "method.ratio=0.5", "measure.min_run_time_s=0.5")
    p = plan(reference)
    assert p.run_id == killed.name
    assert execute(reference, []) == "done"
    expected = deterministic(read_json(p.run_dir / METRICS_JSON))
    assert deterministic(read_json(killed / METRICS_JSON)) == expected


# -- stage checkpoints -----------------------------------------------------------------------------------------------
class Interrupted(BaseException):
    """Stands for SIGTERM / a requeue's SystemExit: not an ``Exception``, so the run is left ``running``."""


def test_interrupted_run_resumes_without_recompressing(toy_cfg, tmp_path, monkeypatch):
    cfg = toy_cfg("method=svd", "method.ratio=0.5")
    p = plan(cfg)

    def interrupt(*args, **kwargs):
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr("runners.run._measure", interrupt)
        with pytest.raises(Interrupted):
            execute(cfg, [])
    assert read_json(p.run_dir / RUN_JSON)["status"] == "running"
    assert {f.name for f in (p.run_dir / STAGE_DIR).iterdir()} == {"compressed.safetensors", "compressed.json"}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a resumed run recompressed its model")

    with monkeypatch.context() as m:
        m.setattr("methods.svd.SVD.apply", must_not_run)
        assert execute(cfg, []) == "done"
    rec = read_json(p.run_dir / RUN_JSON)
    assert rec["attempt"] == 2 and rec["resumed_from"] == "compressed"
    assert not (p.run_dir / STAGE_DIR).exists()

    fresh = toy_cfg("method=svd", "method.ratio=0.5", f"out_dir={tmp_path / 'fresh'}")
    assert execute(fresh, []) == "done"
    resumed, uninterrupted = (read_json(d / METRICS_JSON) for d in (p.run_dir, plan(fresh).run_dir))
    assert deterministic(resumed) == deterministic(uninterrupted)


def test_checkpointed_computes_once_and_reloads(tmp_path):
    calls = []

    def stats():
        calls.append(1)
        return {"gram": torch.arange(6.0).view(2, 3), "n": 7, "names": ["a", "b"]}

    ctx = CompressContext(task=None, device=torch.device("cpu"), seed=0, stage_dir=tmp_path / "stages")
    first = ctx.checkpointed("calib_stats", stats)
    again = CompressContext(task=None, device=torch.device("cpu"), seed=0, stage_dir=tmp_path / "stages")
    second = again.checkpointed("calib_stats", stats)
    assert len(calls) == 1 and (tmp_path / "stages" / "calib_stats.pt").is_file()
    assert torch.equal(first["gram"], second["gram"]) and second["n"] == 7 and second["names"] == ["a", "b"]
    assert [p.name for p in (tmp_path / "stages").iterdir()] == ["calib_stats.pt"]  # no temporary file left
    CompressContext(task=None, device=torch.device("cpu"), seed=0).checkpointed("x", stats)
    assert len(calls) == 2  # without a stage folder it just computes


def test_failed_run_leaves_no_stage_checkpoint_and_its_redo_starts_afresh(toy_cfg, monkeypatch):
    cfg = toy_cfg("method=svd")
    p = plan(cfg)
    with monkeypatch.context() as m:
        m.setattr("runners.run._measure", lambda *a, **k: 1 / 0)
        assert execute(cfg, []) == "failed"
    assert not (p.run_dir / STAGE_DIR).exists()
    applied = []
    original = methods.svd.SVD.apply

    def counting(self, *args):
        applied.append(1)
        return original(self, *args)

    monkeypatch.setattr("methods.svd.SVD.apply", counting)
    assert execute(cfg, []) == "done"
    rec = read_json(p.run_dir / RUN_JSON)
    assert applied == [1] and rec["attempt"] == 2 and "resumed_from" not in rec


def test_saved_model_is_the_stage_checkpoint(toy_cfg):
    cfg = toy_cfg("method=magnitude", "save_model=true")
    assert execute(cfg, []) == "done"
    run_dir = plan(cfg).run_dir
    assert (run_dir / "model.safetensors").stat().st_size == read_json(run_dir / METRICS_JSON)["bytes_on_disk"]
    assert not (run_dir / STAGE_DIR).exists()


# -- failure reasons -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, reason", [
    (FloatingPointError("training loss is nan at epoch 3"), "nan"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "oom"),
    (MemoryError(), "oom"),
    (KeyError("weight"), "error"),
])
def test_failure_reason_and_the_sweep_goes_on(toy_cfg, monkeypatch, exc, reason):
    def fail(self, model, adapter, ctx):
        raise exc

    monkeypatch.setattr("methods.svd.SVD.apply", fail)
    assert execute(toy_cfg("method=svd"), []) == "failed"
    assert execute(toy_cfg("method=magnitude"), []) == "done"
    rec = read_json(plan(toy_cfg("method=svd")).run_dir / RUN_JSON)
    assert rec["status"] == "failed" and rec["failure_reason"] == reason
    assert type(exc).__name__ in rec["error"] and "Traceback" in rec["traceback"]
    if reason == "oom":  # the memory reached (peak RSS on CPU, CUDA max_memory_allocated on a GPU)
        assert rec["oom_peak_bytes"] > 10 * 2**20
    else:
        assert "oom_peak_bytes" not in rec
