"""Efficiency measurements a reviewer can trust: timing protocol (repeats, IQR, noisy flag, interleaved dense
timing), memory attributed to the model, thread choice, compression sub-stages and measurement identity."""
import time

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.io import read_json
from methods import CompressContext
from runners import measure, threads
from runners.record import METRICS_JSON
from runners.run import execute, plan
from runners.schema import MeasureConfig


class Sleeper(nn.Module):
    """A forward that takes ``ms`` milliseconds and allocates nothing."""

    def __init__(self, ms: float):
        super().__init__()
        self.ms = ms

    def forward(self, x):
        time.sleep(self.ms / 1e3)
        return x


# -- timing protocol -------------------------------------------------------------------------------------------------
def test_latency_takes_at_least_the_requested_repeats_and_flags_noise():
    out = measure.latency(Sleeper(1.0), (torch.zeros(1),), items=4, warmup=1, min_run_time_s=0.01, min_repeats=7)
    assert out["latency_repeats"] >= 7 and out["latency_ms"] >= 1.0 and out["throughput"] > 0
    quiet = measure._summary([1.0, 1.01, 0.99, 1.0], items=1, noisy_rel_iqr=0.1)
    noisy = measure._summary([1.0, 2.0, 0.5, 1.0, 3.0], items=1, noisy_rel_iqr=0.1)
    assert quiet["latency_noisy"] is False and noisy["latency_noisy"] is True
    assert noisy["latency_ms"] == 1000.0 and noisy["latency_repeats"] == 5


def test_timed_blocks_interleave_the_callables():
    calls = []
    measure.timed_blocks([lambda: calls.append("a"), lambda: calls.append("b")], warmup=0, min_run_time_s=0.0,
                         min_repeats=3)
    runs = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]   # blocks of consecutive calls
    assert runs[2:] == ["a", "b"] * 3   # after one calibration call each: A, B, A, B, A, B


def test_paired_latency_ratio_is_dense_time_over_model_time():
    out = measure.paired_latency(Sleeper(2.0), Sleeper(6.0), (torch.zeros(1),), items=1, warmup=1,
                                 min_run_time_s=0.05, min_repeats=5)
    assert 2.0 < out["speedup/latency"] < 3.5
    assert out["dense/latency_ms"] > out["latency_ms"] and out["dense/latency_repeats"] >= 5


# -- memory ----------------------------------------------------------------------------------------------------------
def test_cpu_forward_peak_counts_activations_not_the_process():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).eval()
    out = measure.peak_memory(model, (torch.randn(64, 512),), torch.device("cpu"))
    hidden = 64 * 2048 * 4   # the linear's output and the GELU's output are alive together
    assert out["forward_peak_bytes"] == 2 * hidden
    assert out["peak_mem_bytes"] == measure.weight_bytes(model) + 2 * hidden
    # the process's RSS (interpreter, torch's libraries) dwarfs the model and is recorded apart
    assert out["process_rss_peak_bytes"] > 10 * out["peak_mem_bytes"]
    assert out["protocol/peak_mem"] == "weight_bytes+profiler_cpu_alloc_peak"


def test_compress_stages_time_and_peak_nest():
    ctx = CompressContext(task=None, device=torch.device("cpu"), seed=0, progress=False)
    t0 = time.perf_counter()
    with ctx.stage("fitting"):
        with ctx.stage("eigen"):
            big = torch.ones(64 * 2**20 // 4)   # 64 MiB, touched
            time.sleep(0.01)
            del big
        with ctx.stage("eigen"):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    m = ctx.stage_metrics
    # seconds are exclusive (the outer clock pauses inside an inner stage: they add up to the whole), peaks inclusive
    assert m["compress/eigen_s"] >= 0.01 and m["compress/fitting_s"] >= 0.02
    assert m["compress/eigen_s"] + m["compress/fitting_s"] == pytest.approx(wall, abs=0.01)
    assert m["compress/fitting_peak_bytes"] >= m["compress/eigen_peak_bytes"] >= 64 * 2**20


# -- threads ---------------------------------------------------------------------------------------------------------
def test_threads_follow_config_env_slurm_workers_and_busy_cpus(monkeypatch):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: list(range(8)))
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus, sample_s=0.25: 0.0)
    for var in ("COMPBENCH_THREADS", "COMPBENCH_WORKERS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    assert threads.pick_threads()["protocol/threads"] == 8
    assert threads.pick_threads(3) == {"protocol/threads": 3, "protocol/threads_source": "config"}
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert threads.pick_threads()["protocol/threads"] == 6
    monkeypatch.setenv("COMPBENCH_WORKERS", "2")
    assert threads.pick_threads()["protocol/threads"] == 3
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus, sample_s=0.25: 4.6)   # neighbours keep 5 CPUs busy
    assert threads.pick_threads()["protocol/threads"] == 1
    monkeypatch.setenv("COMPBENCH_THREADS", "5")
    assert threads.pick_threads() == {"protocol/threads": 5, "protocol/threads_source": "env"}
    monkeypatch.setenv("COMPBENCH_THREADS", "zero")
    with pytest.raises(ConfigError, match="COMPBENCH_THREADS"):
        threads.pick_threads()


def test_use_threads_restores_the_previous_count(monkeypatch):
    monkeypatch.setenv("COMPBENCH_THREADS", "1")
    before = torch.get_num_threads()
    with threads.use_threads(2) as chosen:
        assert torch.get_num_threads() == 2 and chosen["protocol/threads"] == 2
    assert torch.get_num_threads() == before


def test_busy_cpus_sees_a_spinning_neighbour():
    import multiprocessing as mp

    cpu = threads.allowed_cpus()[0]
    stop = mp.Event()
    proc = mp.get_context("fork").Process(target=_spin, args=(cpu, stop))
    proc.start()
    try:
        time.sleep(0.2)
        assert threads.busy_cpus([cpu], sample_s=0.3) > 0.5
    finally:
        stop.set()
        proc.join()


def _spin(cpu: int, stop) -> None:
    import os

    os.sched_setaffinity(0, {cpu})
    while not stop.is_set():
        pass


@pytest.mark.parametrize("field,value", [("min_repeats", 0), ("noisy_rel_iqr", 0.0), ("threads", -1),
                                         ("min_run_time_s", -1.0)])
def test_bad_measure_settings_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        MeasureConfig(**{field: value})


# -- measurement identity --------------------------------------------------------------------------------------------
def test_changed_measure_settings_remeasure_a_saved_model_without_recompressing(toy_cfg, caplog):
    base = ("method=svd", "method.ratio=0.5", "save_model=true")
    cfg = toy_cfg(*base)
    assert execute(cfg, []) == "done"
    run_dir = plan(cfg).run_dir
    first = read_json(run_dir / METRICS_JSON)
    assert first["protocol/measure_min_run_time_s"] == 0.01 and first["latency_repeats"] >= 10
    assert first["protocol/threads"] >= 1 and "speedup/latency" in first and "dense/latency_ms" in first
    assert first["compress/save_s"] > 0 and first["compress/peak_bytes"] > 0
    assert execute(toy_cfg(*base), []) == "skipped"
    with caplog.at_level("INFO", logger="compbench"):
        assert execute(toy_cfg(*base, "measure.min_repeats=12", "measure.paired_dense=false"), []) == "remeasured"
    assert "measuring its saved compressed model" in caplog.text
    second = read_json(run_dir / METRICS_JSON)
    assert second["protocol/measure_hash"] != first["protocol/measure_hash"]
    assert second["latency_repeats"] >= 12 and second["protocol/measure_min_repeats"] == 12
    # quality, accounting and the compression record are those of the first (only) compression
    for key in ("mse/toy", "params_stored", "scope/removed_fraction", "compress_s", "compress/save_s", "flops"):
        assert second[key] == first[key], key
    record = read_json(run_dir / "run.json")
    assert record["attempt"] == 1 and record["status"] == "done"
    assert record["remeasured"][0]["measure_hash"] == second["protocol/measure_hash"]
    assert execute(toy_cfg(*base, "measure.min_repeats=12", "measure.paired_dense=false"), []) == "skipped"


def test_changed_measure_settings_without_a_saved_model_recompress_and_say_so(toy_cfg, caplog):
    cfg = toy_cfg("method=svd", "method.ratio=0.5")
    assert execute(cfg, []) == "done"
    with caplog.at_level("INFO", logger="compbench"):
        assert execute(toy_cfg("method=svd", "method.ratio=0.5", "measure.min_repeats=11"), []) == "done"
    assert "no compressed model was saved" in caplog.text and "recompressing" in caplog.text
    run_dir = plan(cfg).run_dir
    assert read_json(run_dir / METRICS_JSON)["protocol/measure_min_repeats"] == 11
    assert read_json(run_dir / "run.json")["attempt"] == 2
