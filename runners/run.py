"""One run: load the task -> evaluate the dense model (cached) -> apply the method -> evaluate -> measure ->
write the run record -> log.

    python -m runners.run task=demo_lm method=svd method.ratio=0.5 seed=0 out_dir=results/x
    python -m runners.run -m experiment=demo

Every point of a command line (and of an experiment's sweep) is composed and validated before anything is
built, so a bad name, ratio, seed, path or key fails at once with one line on stderr and exit code 2.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from core import memory
from core.errors import ConfigError
from core.io import file_lock, lock_holder, read_json, write_json_atomic
from methods import CompressContext, kernels
from methods.fuse import inference_layout
from runners import accounting, measure, threads
from runners.checkpoint import load_compressed, save_compressed
from runners.loggers import create_logger
from runners.plan import CONF_DIR, Plan, plan
from runners.preflight import preflight
from runners.record import METRICS_JSON, RUN_JSON, RunRecord, make_run_id, record_problem, run_status
from tasks.adapters import create_adapter

log = logging.getLogger("compbench")
# <run_dir>/stages/: checkpoints of a run in progress (compressed model, training state, method statistics), so a
# killed or requeued run resumes where it was; removed when the run ends (done or failed: a redo starts afresh)
STAGE_DIR = "stages"
LOCK = ".lock"  # <run_dir>/.lock: flock held while a process runs the point; holds the holder's pid and host
#: exit codes of a single run (a multirun exits 0 and shows failures in its table): 2 is bad input (ConfigError)
EXIT_CODES = {"failed": 1, "busy": 3}


class NonFiniteMetric(FloatingPointError):
    """A metric came out NaN/inf: the run fails with reason ``nan`` instead of leaving a bad row. Training loops
    raise ``FloatingPointError`` for a non-finite loss, which fails the same way."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_finite(metrics: dict[str, Any], where: str) -> None:
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteMetric(f"non-finite {where}: {', '.join(bad)}")


def dense_quality(p: Plan, model: torch.nn.Module) -> dict[str, Any]:
    """The dense model's quality metrics, computed once per (task, seed) for the whole out_dir and cached."""
    path = p.dense_path
    with file_lock(path.with_suffix(".lock")):
        cached = read_json(path)
        if cached is not None:
            log.info("dense metrics from cache %s", path)
            return cached
        seed_everything(p.run.seed)
        metrics = p.task.evaluate(model)
        _check_finite(metrics, "dense metrics")
        write_json_atomic(path, metrics)
        return metrics


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, FloatingPointError):
        return "nan"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower():
        return "oom"
    return "error"


def memory_reached(device: torch.device) -> dict[str, int]:
    """What a run that ran out of memory had reached: ``oom_peak_bytes`` (CUDA ``max_memory_allocated`` on a GPU,
    the process's peak RSS on CPU) and, on a GPU, ``oom_device_total_bytes``."""
    if device.type == "cuda":
        return {"oom_peak_bytes": torch.cuda.max_memory_allocated(device),
                "oom_device_total_bytes": torch.cuda.get_device_properties(device).total_memory}
    return {"oom_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def execute(cfg: DictConfig, overrides: list[str]) -> str:
    """Run one point; return ``done``, ``failed``, ``skipped`` (already done), ``remeasured`` (done, measured again
    under changed measurement settings) or ``busy`` (running elsewhere)."""
    p = plan(cfg)
    if run_status(p.run_dir) == "done" and not measurement_stale(p):
        log.info("skip %s: already done", p.run_id)
        return "skipped"
    if run_status(p.run_dir) == "damaged":
        log.warning("redo %s: its record is damaged (%s)", p.run_id, record_problem(p.run_dir))
    with file_lock(p.run_dir / LOCK, blocking=False) as acquired:
        if not acquired:
            log.warning("skip %s: busy, %s holds it", p.run_id, lock_holder(p.run_dir / LOCK))
            return "busy"
        with threads.use_threads(p.run.measure.threads) as chosen:
            log.info("torch intra-op threads: %s", chosen)
            if run_status(p.run_dir) == "done":
                return _remeasure(p, cfg, overrides, chosen) if measurement_stale(p) else "skipped"
            return _execute_locked(p, cfg, overrides, chosen)


def measurement_stale(p: Plan) -> bool:
    """Whether a done run's efficiency metrics came from other measurement settings than ``p``'s (runs recorded
    before measurement identity carry no ``protocol/measure_hash`` and are kept)."""
    recorded = (read_json(p.run_dir / METRICS_JSON) or {}).get("protocol/measure_hash")
    return recorded is not None and recorded != _measure_hash(p)


def _measure_hash(p: Plan) -> str:
    return measure.settings_hash(asdict(p.run.measure), asdict(p.run.task.measure))


def _remeasure(p: Plan, cfg: DictConfig, overrides: list[str], chosen: dict[str, Any]) -> str:
    """Redo only the measurements of a done run whose measurement settings changed: from its saved compressed
    model (``save_model=true``), else by running it again (compression included), as the log says."""
    saved = p.run_dir / "model.safetensors"
    if not saved.is_file():
        log.info("re-measure %s: measurement settings changed and no compressed model was saved "
                 "(save_model=true keeps one): recompressing", p.run_id)
        return _execute_locked(p, cfg, overrides, chosen)
    log.info("re-measure %s: measurement settings changed; measuring its saved compressed model", p.run_id)
    seed_everything(p.run.seed)
    model = p.task.build_model(p.run.seed)
    adapter = create_adapter(model)
    scope_paths = list(adapter.scope(adapter.resolve_scope(p.method.cfg.scope)))
    dense_counts = accounting.dense_counts(model, {s: model.get_submodule(s) for s in scope_paths})
    model = load_compressed(model, saved).eval()
    metrics = read_json(p.run_dir / METRICS_JSON)
    metrics.update(_measure(p, model, create_adapter(model), scope_paths, dense_counts, chosen))
    _check_finite(metrics, "metrics")
    write_json_atomic(p.run_dir / METRICS_JSON, metrics)
    record = read_json(p.run_dir / RUN_JSON)
    record.setdefault("remeasured", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": "model.safetensors",
                                                "measure_hash": metrics["protocol/measure_hash"]})
    write_json_atomic(p.run_dir / RUN_JSON, record)
    return "remeasured"


def _execute_locked(p: Plan, cfg: DictConfig, overrides: list[str], chosen: dict[str, Any]) -> str:
    run, task, method = p.run, p.task, p.method
    config = OmegaConf.to_container(cfg, resolve=True)
    stage_dir = p.run_dir / STAGE_DIR
    if run_status(p.run_dir) != "running":  # only an interrupted run resumes from its stage checkpoints
        shutil.rmtree(stage_dir, ignore_errors=True)
    record = RunRecord.start(p.run_dir, p.run_id, config, overrides, run.seed, p.device, run.experiment_name)
    handler = logging.FileHandler(p.run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logger = None
    ok = False
    log.info("run %s -> %s", p.run_id, p.run_dir)
    record.data["threads"] = chosen
    try:
        logger = create_logger(run.logger, p.run_id, p.run_dir, run.experiment_name, config, Path(run.out_dir))
        seed_everything(run.seed)
        with record.stage("load"):
            model = task.build_model(run.seed)
            adapter = create_adapter(model)
            method.check(adapter)
            if not p.structure_checked:  # no skeleton before: the checks run on the loaded model, before any eval
                task.check_model(model)
            scope_name = adapter.resolve_scope(method.cfg.scope)
            scope_paths = list(adapter.scope(scope_name))
            dense_counts = accounting.dense_counts(model, {s: model.get_submodule(s) for s in scope_paths})
        main_metric, higher_is_better = task.main_metric()
        record.data["summary"] = {
            **task.summary(), "task": run.task.name, "family": run.task.family, "method": method.name,
            "ratio": float(run.method.ratio) if method.uses_ratio else 0.0, "seed": run.seed, "scope": scope_name,
            "main_metric": main_metric, "higher_is_better": higher_is_better}
        with record.stage("dense_eval"):
            dense = dense_quality(p, model)
        ctx = CompressContext(task=task, device=p.device, seed=run.seed, progress=run.progress, stage_dir=stage_dir)
        compressed = stage_dir / "compressed.safetensors"
        with record.stage("compress"):
            saved = read_json(stage_dir / "compressed.json") if compressed.is_file() else None
            if saved is not None:  # an earlier attempt compressed (and trained) it: load instead of recomputing
                try:  # a damaged checkpoint fails before the model is touched, and is recomputed
                    model = load_compressed(model, compressed).eval()
                    method_metrics, compress_s = saved["method_metrics"], saved["compress_s"]
                    ctx.stage_metrics.update(saved["stages"])
                except (ConfigError, KeyError) as e:
                    log.warning("stage checkpoint of %s is damaged (%s); compressing again", p.run_id, e)
                    saved = None
            if saved is not None:
                adapter = create_adapter(model)
                record.data["resumed_from"] = "compressed"
                log.info("resumed %s from its compressed-model checkpoint", p.run_id)
            else:
                seed_everything(run.seed)
                t0 = time.perf_counter()
                with ctx.stage("other"):  # the method's named sub-stages nest inside
                    if method.train_time:
                        model = task.fresh_model(run.seed)
                        adapter = create_adapter(model)
                        method_metrics = method.apply(model, adapter, ctx)
                        method_metrics.update(task.train(model, run.seed, after_step=method.after_optimizer_step,
                                                         log=logger.log, ckpt_path=stage_dir / "train_state.pt"))
                    else:
                        method_metrics = method.apply(model, adapter, ctx)
                model.eval()
                compress_s = time.perf_counter() - t0
                _check_finite(method_metrics, "method metrics")
                with ctx.stage("save"):
                    save_compressed(model, compressed, {"run_id": p.run_id, "method": method.name})
                write_json_atomic(stage_dir / "compressed.json", {"method_metrics": method_metrics,
                                                                  "compress_s": compress_s,
                                                                  "stages": ctx.stage_metrics})
        with record.stage("eval"):
            seed_everything(run.seed)
            quality = task.evaluate(model)
            _check_finite(quality, "metrics")
        metrics: dict[str, Any] = {**quality, **{f"dense/{k}": v for k, v in dense.items()
                                                 if not k.startswith("protocol/")}}
        metrics.update(method_metrics)
        metrics["compress_s"] = compress_s
        metrics.update(compress_stage_metrics(ctx))
        with record.stage("measure"):
            metrics.update(_measure(p, model, adapter, scope_paths, dense_counts, chosen))
        with record.stage("save"):
            metrics["bytes_on_disk"] = compressed.stat().st_size
            if run.save_model:
                os.replace(compressed, p.run_dir / "model.safetensors")
        _check_finite(metrics, "metrics")
        record.finish(metrics)
        shutil.rmtree(stage_dir, ignore_errors=True)
        logger.summary(metrics)
        logger.table("metrics", pd.DataFrame([metrics]))  # one row, a column per metric
        log.info("done %s: %s=%s removed=%.3f", p.run_id, main_metric, metrics.get(main_metric),
                 metrics["scope/removed_fraction"])
        ok = True
        return "done"
    except Exception as exc:  # recorded, and the sweep goes on
        reason = failure_reason(exc)
        try:
            record.fail(reason, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                        memory_reached(p.device) if reason == "oom" else None)
        except OSError as e:  # e.g. the disk is still full: the run stays `running` and is redone next time
            log.error("run %s: cannot record its failure: %s", p.run_id, e)
        shutil.rmtree(stage_dir, ignore_errors=True)
        log.error("run %s failed (%s): %s", p.run_id, reason, exc)
        return "failed"
    finally:  # also on SystemExit / KeyboardInterrupt (a requeue, Ctrl-C): the run stays `running`, resumable
        if logger is not None:
            try:
                logger.finish(failed=not ok)
            except Exception as exc:  # noqa: BLE001
                # the JSON record is the source of truth: a mirror that cannot close (e.g. its service process was
                # killed by a requeue) does not change the run's outcome
                log.warning("logger did not finish cleanly: %s", exc)
        logging.getLogger().removeHandler(handler)
        handler.close()


def compress_stage_metrics(ctx: CompressContext) -> dict[str, Any]:
    """``compress/<stage>_s`` and ``compress/<stage>_peak_bytes`` of the compression's sub-stages (``other_s``:
    seconds in no named stage), the whole compression's ``compress/peak_bytes``, and what the peaks measure
    (``protocol/compress_peak``)."""
    out = {k: v for k, v in ctx.stage_metrics.items() if k != "compress/other_peak_bytes"}
    if "compress/other_peak_bytes" in ctx.stage_metrics:
        out["compress/peak_bytes"] = ctx.stage_metrics["compress/other_peak_bytes"]
    out["protocol/compress_peak"] = memory.peak_kind(ctx.device)
    return out


def _measure(p: Plan, model, adapter, scope_paths: list[str], dense_counts: dict[str, int],
             chosen: dict[str, Any]) -> dict[str, Any]:
    """Accounting and efficiency of ``model``; with ``measure.paired_dense`` the dense model is rebuilt and timed
    interleaved with it (``dense/latency_ms``, ``speedup/latency``)."""
    out: dict[str, Any] = accounting.compressed_counts(
        model, {s: model.get_submodule(s) for s in scope_paths}, dense_counts)
    inputs = p.task.example_inputs()
    items = p.task.items_per_forward()
    mcfg = p.run.measure
    out.update({f"protocol/measure_{k}": v for k, v in asdict(p.run.task.measure).items()})
    out.update({f"protocol/measure_{k}": v for k, v in asdict(mcfg).items()})
    out["protocol/measure_hash"] = _measure_hash(p)
    out["protocol/measure_device"] = str(p.device)
    out["protocol/threads"] = chosen["protocol/threads"]
    out["protocol/threads_source"] = chosen["protocol/threads_source"]
    with kernels.backend(mcfg.kernels):
        out.update(inference_layout(model, adapter, p.device))
        out["weight_bytes"] = measure.weight_bytes(model)
        if mcfg.flops:
            out.update(measure.flops(model, inputs))
        if mcfg.memory:
            out.update(measure.peak_memory(model, inputs, p.device))
        timing = (mcfg.warmup, mcfg.min_run_time_s, mcfg.min_repeats, mcfg.noisy_rel_iqr)
        if mcfg.latency and mcfg.paired_dense and p.method.name != "dense":
            dense = p.task.build_model(p.run.seed).eval()
            inference_layout(dense, create_adapter(dense), p.device)
            out.update(measure.paired_latency(model, dense, inputs, items, *timing))
            del dense
        elif mcfg.latency:
            out.update(measure.latency(model, inputs, items, *timing))
            if p.method.name == "dense":
                out["speedup/latency"] = 1.0
        if mcfg.decode != "none" and p.task.generates:
            out.update(measure.decode_latency(model, p.task.decode_prompt(mcfg.decode_prompt), mcfg.decode_tokens,
                                              mcfg.decode, mcfg.warmup, mcfg.noisy_rel_iqr))
    return out


# -- entry point ---------------------------------------------------------------------------------------------------
@hydra.main(config_path="../conf", config_name="run", version_base="1.3")
def hydra_main(cfg: DictConfig) -> str:
    try:
        status = execute(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if HydraConfig.get().mode == RunMode.RUN and status in EXIT_CODES:
        sys.exit(EXIT_CODES[status])
    return status


def main() -> None:
    try:
        if "--plan" in sys.argv[1:]:  # the points, their run ids and statuses; nothing built, nothing run
            from runners.list import plan_points, render_plan

            print(render_plan(plan_points([a for a in sys.argv[1:] if a != "--plan"], CONF_DIR)))
            return
        preflight(sys.argv[1:], CONF_DIR)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
