"""Re-evaluate a saved compressed model on more perplexity sets or lm-eval tasks, without recompressing.

    python -m runners.eval <run_dir | exported folder> task.eval.datasets=[wikitext2,c4] task.zeroshot.tasks=[piqa]
    python -m runners.eval <run_dir> +task.eval.text_files.mine=notes.txt

The model is rebuilt from the run's ``model.safetensors`` (a run saved with ``save_model=true``) or loaded from a
``runners.export`` folder; the task is the run's own, with the overrides applied (only the evaluation sets and
zero-shot settings may change, so the numbers already recorded keep their protocol). The new metrics and their
``protocol/...`` fields are added to the run's ``metrics.json`` (an export's ``compbench.json``), where the report
reads them; metrics already recorded are never replaced, and ``run.json`` lists every re-evaluation.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.io import file_lock, read_json, write_json_atomic
from runners.export import EXPORT_JSON, load_model, read_source
from runners.record import METRICS_JSON, RUN_JSON
from runners.run import _check_finite, seed_everything

log = logging.getLogger("compbench")
# overrides that add evaluations without changing how the recorded metrics were measured
ALLOWED = ("task.eval.datasets", "task.eval.text_files", "task.zeroshot.", "device", "progress", "cache_dir")


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.lstrip("+").split("=", 1)[0]
        if "=" not in o or not any(key == a or key.startswith(a.rstrip(".") + ".") for a in ALLOWED):
            raise ConfigError(f"runners.eval: {o!r}; only key=value overrides of "
                              f"{', '.join(a.rstrip('.') for a in ALLOWED)} are allowed (others would change the "
                              f"protocol of the metrics already recorded)")


def reevaluate(source: Path, overrides: list[str]) -> dict[str, Any]:
    """Evaluate the model of ``source`` under the run's task with ``overrides``; record and return the new
    metrics (keys not yet in the record)."""
    source = Path(source)
    check_overrides(overrides)
    read_source(source)  # a clear error before anything is built
    with file_lock(source / ".lock", blocking=False) as acquired:
        if not acquired:
            raise ConfigError(f"{source} is being written by another process (a run or an evaluation)")
        p, model, _, _ = load_model(source, overrides)
        seed_everything(p.run.seed)
        result = p.task.evaluate(model)
        _check_finite(result, "metrics")
        entry_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        is_run = (source / RUN_JSON).is_file()
        holder = read_json(source / (METRICS_JSON if is_run else EXPORT_JSON))
        metrics = holder if is_run else holder["metrics"]
        new = {k: v for k, v in result.items() if k not in metrics}
        kept = sorted(k for k, v in result.items() if k in metrics and metrics[k] != v and not k.startswith("protocol/"))
        if kept:
            log.warning("already recorded, not replaced: %s", ", ".join(kept))
        metrics.update(new)
        entry = {"at": entry_at, "overrides": list(overrides), "metrics": sorted(new)}
        if is_run:
            write_json_atomic(source / METRICS_JSON, metrics)
            record = read_json(source / RUN_JSON)
            record.setdefault("reevaluations", []).append(entry)
            write_json_atomic(source / RUN_JSON, record)
        else:
            holder.setdefault("reevaluations", []).append(entry)
            write_json_atomic(source / EXPORT_JSON, holder)
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run folder saved with save_model=true, or an exported folder")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides of {', '.join(ALLOWED)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        new = reevaluate(args.source, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, v in new.items():
        if not k.startswith("protocol/"):
            print(f"{k} = {v}")
    print(f"{len(new)} new metrics recorded in {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
