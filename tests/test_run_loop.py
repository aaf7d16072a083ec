"""The run loop on the toy task: record schema, skip-if-done, redo-if-failed, NaN failures, dense cache."""
import json
from pathlib import Path

import pytest

import tests.toy
from core.io import read_json, stable_hash, write_json_atomic
from runners.record import METRICS_JSON, RUN_JSON, make_run_id
from runners.run import execute, plan

RUN_KEYS = {"run_id", "status", "experiment", "config", "overrides", "seeds", "stages", "error", "traceback",
            "failure_reason", "attempt", "started_at", "finished_at", "git", "packages", "device", "hostname",
            "slurm", "summary"}
ACCOUNTING = ("params_dense", "params_stored", "params_nonzero", "removed_fraction", "compression_x",
              "index_overhead")
MEASURES = ("latency_ms", "latency_iqr_ms", "throughput", "peak_mem_bytes", "flops", "compress_s", "bytes_on_disk")


def run_dirs(cfg):
    return sorted((Path(cfg.out_dir) / "runs").glob("*/"))


def test_record_schema(toy_cfg):
    cfg = toy_cfg("method=svd", "method.ratio=0.5")
    assert execute(cfg, ["method=svd"]) == "done"
    (run_dir,) = run_dirs(cfg)
    rec = json.loads((run_dir / RUN_JSON).read_text())
    assert RUN_KEYS <= set(rec)
    assert rec["status"] == "done" and rec["error"] is None and rec["overrides"] == ["method=svd"]
    assert rec["config"]["method"] == {"name": "svd", "ratio": 0.5, "scope": "auto", "rank_multiple": 1}
    assert set(rec["stages"]) == {"load", "dense_eval", "compress", "eval", "measure", "save"}
    assert rec["summary"]["main_metric"] == "mse/toy" and rec["summary"]["scope"] == "prunable"
    assert {"torch", "transformers", "hydra-core"} <= set(rec["packages"])
    assert rec["device"]["device"] == "cpu" and rec["device"]["cpu"]
    metrics = json.loads((run_dir / METRICS_JSON).read_text())
    for key in ACCOUNTING:
        assert key in metrics and f"scope/{key}" in metrics
    for key in MEASURES:
        assert isinstance(metrics[key], (int, float)), key
    assert metrics["scope/removed_fraction"] == pytest.approx(0.5, abs=0.05)
    assert metrics["dense/mse/toy"] != metrics["mse/toy"]
    assert metrics["flops"] == 2 * metrics["macs"]
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "model.safetensors").exists()


def test_run_id_is_a_stable_function_of_the_semantic_config(toy_cfg):
    a = plan(toy_cfg("method=svd", "method.ratio=0.5"))
    b = plan(toy_cfg("method=svd", "method.ratio=0.5", "logger=wandb", "out_dir=elsewhere", "progress=true"))
    c = plan(toy_cfg("method=svd", "method.ratio=0.2"))
    d = plan(toy_cfg("method=svd", "method.ratio=0.5", "seed=1"))
    assert a.run_id == b.run_id
    assert len({a.run_id, c.run_id, d.run_id}) == 3
    assert a.run_id == make_run_id("toy", "svd", {"task": a.task.semantic_config(),
                                                  "method": a.method.semantic_config(), "seed": 0})
    # dense ignores the ratio, so a sweep over ratios runs it once
    assert plan(toy_cfg("method=dense", "method.ratio=0.2")).run_id == plan(toy_cfg("method=dense")).run_id


def test_done_run_is_skipped_and_untouched(toy_cfg):
    cfg = toy_cfg("method=magnitude")
    assert execute(cfg, []) == "done"
    (run_dir,) = run_dirs(cfg)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert execute(cfg, []) == "skipped"
    assert before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.parametrize("status", ["failed", "running"])
def test_failed_or_running_run_is_redone(toy_cfg, status):
    cfg = toy_cfg("method=magnitude")
    p = plan(cfg)
    write_json_atomic(p.run_dir / RUN_JSON, {"run_id": p.run_id, "status": status, "attempt": 1})
    assert execute(cfg, []) == "done"
    rec = read_json(p.run_dir / RUN_JSON)
    assert rec["status"] == "done" and rec["attempt"] == 2


def test_nan_metric_fails_with_reason_nan(toy_cfg):
    cfg = toy_cfg("method=svd", produce_nan=True)
    assert execute(cfg, []) == "failed"
    (run_dir,) = run_dirs(cfg)
    rec = read_json(run_dir / RUN_JSON)
    assert rec["status"] == "failed" and rec["failure_reason"] == "nan"
    assert "NonFiniteMetric" in rec["error"] and "Traceback" in rec["traceback"]
    assert not (run_dir / METRICS_JSON).exists()


def test_exception_fails_with_traceback_and_sweep_goes_on(toy_cfg, monkeypatch):
    def boom(self, model, adapter, ctx):
        raise RuntimeError("kaputt")

    monkeypatch.setattr("methods.svd.SVD.apply", boom)
    assert execute(toy_cfg("method=svd"), []) == "failed"
    assert execute(toy_cfg("method=magnitude"), []) == "done"
    recs = [read_json(d / RUN_JSON) for d in run_dirs(toy_cfg())]
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["failure_reason"] == "error" and "kaputt" in failed[0]["traceback"]


def test_dense_evaluation_is_cached_per_task_and_seed(toy_cfg):
    tests.toy.Toy.evaluations = 0
    for method in ("magnitude", "svd"):
        for ratio in (0.2, 0.5):
            execute(toy_cfg(f"method={method}", f"method.ratio={ratio}"), [])
    assert tests.toy.Toy.evaluations == 4 + 1  # one dense evaluation for four runs
    execute(toy_cfg("method=svd", "seed=3"), [])
    assert tests.toy.Toy.evaluations == 5 + 2
    assert len(list((Path(toy_cfg().out_dir) / "dense").glob("*.json"))) == 2


def test_tied_weights_are_counted_once_in_a_run(toy_cfg):
    cfg = toy_cfg("method=dense", tie_weights=True)
    execute(cfg, [])
    (run_dir,) = run_dirs(cfg)
    m = read_json(run_dir / METRICS_JSON)
    assert m["params_dense"] == 3 * 32 * 32 + 3 * 32 - 32 * 32
    assert m["removed_fraction"] == 0.0


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object.__new__(type("Unserialisable", (), {"__str__": None}))})
    assert read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_nan_is_stored_as_a_visible_string(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"ppl": float("nan"), "x": 1.0})
    assert read_json(tmp_path / "m.json") == {"ppl": "nan", "x": 1.0}


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
