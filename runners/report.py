"""Reports: collect run folders into one DataFrame, then write paper-style tables, figures and the comparison with
numbers reported by papers.

    python -m runners.report results/<experiment> [--metrics main,latency_ms] [--reported results/reported]
                             [--x ratio|compression]
    python -m runners.report results/A results/B --out results/A_vs_B

writes ``<dir>/report/`` (or ``--out``): ``results.csv``, ``table.md``, ``table.tex``, ``pareto.{png,pdf}`` (every
task) and ``figures/<task>.{png,pdf}`` (one panel each; see ``runners.figures``), and prints ``table.md``.

Several folders are combined into one report: a ``sweep`` column names each run's folder, and a method run in more
than one of them gets a row per folder (``svd [sweep=B]``), so the sweeps are compared cell by cell.

Table cells (one table per task; rows = methods, columns = (ratio, metric)):

* ``mean ± std (n=k)`` over seeds (sample std); a single seed shows the value alone. Latency and decode columns show
  the median ``± IQR`` of the timed repeats (averaged over seeds). Efficiency columns carry their unit in the header
  (MB = 10^6 bytes, GFLOPs, ms); ``speedup/latency`` (dense time / ours, timed interleaved) and ``xdense/<key>``
  (ours / dense) are in "x dense".
* bold (``**x**`` / ``\\textbf{x}``): best compressed method of the column, for metrics with a known direction
  (the task's main metric uses ``higher_is_better``; ``ppl/``, ``drop/``, latency, memory, FLOPs lower;
  accuracies, throughput higher); accounting columns (``removed_fraction``, ``compression_x``, ...) are never
  marked. Italic (``*x*`` / ``\\textit{x}``): the dense cell, where dense is better than every compressed method.
* ``†``: a noisy timing (``<latency|decode>_noisy`` true, or IQR / median above ``NOISY_IQR``); ``(RSS)``: a
  process resident-set high-water mark (``process_rss_peak_bytes``, or a ``peak_mem_bytes`` whose
  ``protocol/peak_mem`` is an RSS), not the model's memory. Neither is ever bold.
* ``failed (<reason>)``, ``running``, ``missing`` (expected, i.e. the method is in the table and another method
  ran that ratio, but no run exists), ``n/a`` (done, metric absent). Extra runs of a valued cell that failed or are
  still running are noted in brackets, e.g. ``[1 failed (oom)]``; ``[mixed: code]`` (or a protocol key) when the
  cell's seeds come from different code or measurement protocols. The task's line above the table lists every
  such difference among its runs.
* ``(rep x, Δ±d)``: a reported number (``results/reported/*.csv``, ``kind=reported``) and ours − reported.
  ``(rep* x, Δ±d)``: the same for a *claim* (``kind=claim``: an abstract or design-document statement, not a
  table entry); every claim for the task's model is also listed under its table with its source.
* The dense row (ratio 0) is repeated under every ratio.

Metric names are metrics.json keys, plus ``main`` (the task's main metric) and three derived forms:
``drop/<key>`` = dense − ours, ``relchange/<key>`` = ours / dense − 1 and ``xdense/<key>`` = ours / dense, where
"dense" is the run's own ``dense/<key>`` when recorded, else the mean of the task's dense runs.

``results.csv`` has one row per run: run fields, the git sha and dirty flag, the device and torch version, the
method's hyper-parameters that differ from ``conf/method/<name>.yaml`` (JSON), and every metrics.json key
(``protocol/...`` fields included), at full precision.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from core.io import stable_hash, write_bytes_atomic
from runners import figures

log = logging.getLogger(__name__)

RUN_COLUMNS = ["run_id", "status", "failure_reason", "error", "experiment", "sweep", "task", "model", "dataset",
               "family", "method", "ratio", "seed", "main_metric", "higher_is_better", "git_sha", "git_dirty",
               "device", "torch", "method_params"]
REPORTED_COLUMNS = ["paper", "table", "model", "dataset", "method", "ratio", "metric", "value", "kind", "protocol",
                    "source"]
KINDS = ("reported", "claim")
DEFAULT_METRICS = ("main", "scope/removed_fraction", "compression_x")
RATIO_TOL = 1e-6
NOISY_IQR = 0.1  # a timing whose IQR exceeds this fraction of its median is marked noisy
CODE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPORTED = Path("results/reported")
LOWER_IS_BETTER = {"latency_ms", "decode_ms_per_token", "peak_mem_bytes", "peak_mem_reserved_bytes",
                   "forward_peak_bytes", "flops", "macs", "compress_s", "bytes_on_disk", "weight_bytes"}
HIGHER_IS_BETTER = {"throughput", "speedup/latency"}
ACCOUNTING = {"removed_fraction", "compression_x", "params_dense", "params_stored", "params_nonzero",
              "index_overhead"}
# (name, unit, scale): the header is "name (unit)" and cells show value * scale
UNITS: dict[str, tuple[str, str, float]] = {
    "removed_fraction": ("removed", "", 1.0), "compression_x": ("compression", "x", 1.0),
    "params_dense": ("params dense", "M", 1e-6), "params_stored": ("params stored", "M", 1e-6),
    "params_nonzero": ("params non-zero", "M", 1e-6), "index_overhead": ("index", "MB", 1e-6),
    "latency_ms": ("latency", "ms, median ± IQR", 1.0),
    "decode_ms_per_token": ("decode", "ms/token, median ± IQR", 1.0),
    "throughput": ("throughput", "items/s", 1.0), "peak_mem_bytes": ("peak memory", "MB", 1e-6),
    "peak_mem_reserved_bytes": ("peak reserved", "MB", 1e-6), "forward_peak_bytes": ("forward peak", "MB", 1e-6),
    "process_rss_peak_bytes": ("process RSS peak", "MB", 1e-6), "weight_bytes": ("weights", "MB", 1e-6),
    "speedup/latency": ("speedup", "x dense", 1.0),
    "bytes_on_disk": ("on disk", "MB", 1e-6), "flops": ("FLOPs", "G", 1e-9), "macs": ("MACs", "G", 1e-9),
    "compress_s": ("compress time", "s", 1.0)}
IQR_OF = {"latency_ms": "latency_iqr_ms", "decode_ms_per_token": "decode_iqr_ms"}  # cells show median ± IQR
TIMING_OF = {"latency_ms": "latency", "throughput": "latency", "speedup/latency": "latency",
             "decode_ms_per_token": "decode"}  # the timing whose noise a metric inherits
TIMING_KEYS = {"latency": ("latency_ms", "latency_iqr_ms"), "decode": ("decode_ms_per_token", "decode_iqr_ms")}
RSS_ALWAYS = {"process_rss_peak_bytes"}  # the process's resident-set high-water mark, never the model's memory
RSS_IF_PROTOCOL = {"peak_mem_bytes"}  # an RSS where its protocol/peak_mem says so (CPU runs of older code)
# protocol fields that legitimately differ between methods of one comparison (outputs, not settings)
PER_RUN_PROTOCOL = {"latency_repeats", "fused_input_groups", "kernels", "layout"}

LEGEND = (
    "Cells: mean ± std over seeds (n = seeds, shown when > 1; a std that rounds to 0 is left out); latency and "
    "decode: median ± IQR of the timed repeats, averaged over seeds. Ratio headers are the configured `method.ratio`; `removed (scope)` is the fraction "
    "of parameters the method removed inside its scope, `compression (model, x)` dense / stored parameters of the "
    "whole model. MB = 10^6 bytes. **Bold**: best compressed method in the column (accounting columns are not "
    "marked). *Italic* dense: better than every compressed method in the column. †: noisy timing (IQR above "
    f"{NOISY_IQR:.0%} of the median, or flagged by the measurement); (RSS): the process's resident-set high-water "
    "mark on CPU, not the model's memory; neither is ever bold. `failed (<reason>)`, `running`, `missing` (expected "
    "but not run), `n/a` (metric not recorded); `[mixed: ...]`: the cell's seeds differ in code or protocol. "
    "`(rep x, Δ±d)`: number reported by a paper and ours − reported; `rep*`: a claim (abstract or design document, "
    "not a table entry), listed with its source under the table. The dense row is repeated under every ratio.")


class ReportedSchemaError(ValueError):
    """A reported-numbers CSV does not follow the schema of results/reported/README.md."""


# --------------------------------------------------------------------------------------------------------------
# Collecting runs
def _runs_dir(root: Path) -> Path:
    """``root/runs``, or ``root`` itself when it is the runs folder."""
    root = Path(root)
    if (root / "runs").is_dir():
        return root / "runs"
    if root.name == "runs" or any(root.glob("*/run.json")):
        return root
    return root / "runs"


def _report_dir(root: Path) -> Path:
    return _runs_dir(root).parent / "report"


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    """(object, None), or (None, why) for a missing, half-written or non-object file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"unreadable ({exc})"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    return obj, None


def _decode(value: Any) -> Any:
    """NaN/inf were stored as strings; nested values become JSON text."""
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(value.strip().lower().replace("infinity", "inf"))
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


@lru_cache(maxsize=None)
def _method_defaults(name: str) -> dict[str, str] | None:
    """Flattened values of ``conf/method/<name>.yaml`` (its ``defaults`` list left out), or None without one."""
    path = CODE_ROOT / "conf" / "method" / f"{name}.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return _flatten({k: v for k, v in cfg.items() if k != "defaults"}) if isinstance(cfg, dict) else None


def method_params(method_cfg: dict[str, Any]) -> dict[str, Any]:
    """The method's hyper-parameters whose value differs from its yaml in conf/method/ (all of them when it has
    none), ``name`` and ``ratio`` left out; keys dotted for nested values."""
    flat = _flatten({k: v for k, v in method_cfg.items() if k not in ("name", "ratio")})
    defaults = _method_defaults(str(method_cfg.get("name"))) or {}
    return {k: json.loads(v) for k, v in sorted(flat.items()) if defaults.get(k) != v}


def _run_row(run_dir: Path, sweep: str) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run_dir.name, "sweep": sweep}
    rec, why = _read_json(run_dir / "run.json")
    if rec is None:
        warnings.warn(f"run {run_dir.name}: run.json {why}; counted as corrupt", stacklevel=3)
        row.update(status="corrupt", error=f"run.json {why}")
        return row
    config, summary = _as_dict(rec.get("config")), _as_dict(rec.get("summary"))
    git, device = _as_dict(rec.get("git")), _as_dict(rec.get("device"))
    task_cfg, method_cfg = _as_dict(config.get("task")), _as_dict(config.get("method"))
    status = rec.get("status")
    method = summary.get("method") or method_cfg.get("name")
    ratio = summary.get("ratio")
    if ratio is None:  # killed before the summary was written: fall back to the resolved config
        ratio = 0.0 if method == "dense" else method_cfg.get("ratio")
    task = summary.get("task") or task_cfg.get("name")
    seed = summary.get("seed", config.get("seed"))
    row.update(
        run_id=str(rec.get("run_id") or run_dir.name), status=status, failure_reason=rec.get("failure_reason"),
        error=rec.get("error"), experiment=rec.get("experiment"), task=task, model=summary.get("model") or task,
        dataset=summary.get("dataset"), family=summary.get("family") or task_cfg.get("family"), method=method,
        ratio=_as_float(ratio), seed=int(seed) if isinstance(seed, (int, float)) and math.isfinite(seed) else None,
        main_metric=summary.get("main_metric"), higher_is_better=summary.get("higher_is_better"),
        git_sha=git.get("sha"), git_dirty=git.get("dirty"), device=device.get("gpu") or device.get("cpu"),
        torch=_as_dict(rec.get("packages")).get("torch"),
        method_params=json.dumps(method_params(method_cfg), sort_keys=True, default=str) if method_cfg else None,
        task_config=json.dumps(task_cfg, sort_keys=True, default=str),
        method_config=json.dumps({k: v for k, v in method_cfg.items() if k != "ratio"}, sort_keys=True, default=str))
    if status not in ("running", "done", "failed"):
        warnings.warn(f"run {run_dir.name}: unknown status {status!r}; counted as corrupt", stacklevel=3)
        row.update(status="corrupt", error=f"unknown status {status!r}")
    elif status == "done":
        metrics, why = _read_json(run_dir / "metrics.json")
        if metrics is None:
            warnings.warn(f"run {run_dir.name}: done but metrics.json {why}; counted as corrupt", stacklevel=3)
            row.update(status="corrupt", error=f"metrics.json {why}")
        else:
            row.update({k: _decode(v) for k, v in metrics.items() if k not in RUN_COLUMNS})
    return row


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(tree, sort_keys=True, default=str)}


def label_variants(rows: list[dict[str, Any]], column: str, config_field: str) -> None:
    """Runs of one ``column`` name (task or method) whose configs (``config_field``, JSON) differ are different
    experiments, not seeds: their ``column`` becomes ``<name> [key=value, ...]`` with the keys that differ (e.g.
    ``task.train.epochs=6``, ``method.sparsity_block=16`` on the command line), so they get rows or tables of their
    own. ``model`` keeps the task name, and published numbers match a variant by its base name."""
    configs = [row.pop(config_field, None) for row in rows]
    by_name: dict[str, dict[str, dict[str, str]]] = {}
    for row, config in zip(rows, configs):
        if row.get(column) is not None and config is not None:
            by_name.setdefault(row[column], {})[config] = _flatten(json.loads(config))
    for row, config in zip(rows, configs):
        variants = by_name.get(row.get(column), {})
        if len(variants) < 2 or config is None:
            continue
        flats = list(variants.values())
        keys = sorted(k for k in {k for f in flats for k in f} if len({f.get(k) for f in flats}) > 1)
        mine = variants[config]
        differences = ", ".join(f"{k}={mine.get(k, 'unset')}" for k in keys)
        row[column] = f"{row[column]} [{differences}]"


def base_name(label: str) -> str:
    """A task or method label without its variant suffix (``fips [sparsity_block=16]`` -> ``fips``)."""
    return label.split(" [", 1)[0]


def variant_suffix(label: str) -> str:
    """The variant part of a label (``fips [sparsity_block=16]`` -> ``[sparsity_block=16]``), or ""."""
    return label[len(base_name(label)):].strip()


def label_sweeps(rows: list[dict[str, Any]]) -> None:
    """A method label of one task found in several sweeps gets ``[sweep=<name>]`` per sweep, so the sweeps are
    compared row by row instead of averaged as seeds."""
    sweeps: dict[tuple[Any, Any], set[str]] = {}
    for row in rows:
        sweeps.setdefault((row.get("task"), row.get("method")), set()).add(row["sweep"])
    for row in rows:
        if row.get("method") is not None and len(sweeps[(row.get("task"), row["method"])]) > 1:
            row["method"] = f"{row['method']} [sweep={row['sweep']}]"


def _sweep_names(roots: Sequence[Path]) -> list[str]:
    """Folder names of the sweeps, made unique by their parents where two are alike."""
    names = [_runs_dir(r).parent.resolve().name for r in roots]
    for i, r in enumerate(roots):
        if names.count(names[i]) > 1:
            names[i] = "/".join(_runs_dir(r).parent.resolve().parts[-2:])
    return names


def collect_runs(roots: Path | Sequence[Path]) -> pd.DataFrame:
    """One row per ``<root>/runs/<run_id>/`` of every root: run fields, summary fields, code version, the method's
    non-default hyper-parameters and every metrics.json key; ``sweep`` names the root.

    Unreadable run.json (or a done run without readable metrics.json) gives status ``corrupt`` and a warning.
    """
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    rows = []
    for root, sweep in zip(roots, _sweep_names(roots)):
        runs_dir = _runs_dir(root)
        rows += [_run_row(p, sweep) for p in sorted(runs_dir.iterdir()) if p.is_dir()] if runs_dir.is_dir() else []
    label_variants(rows, "task", "task_config")
    label_variants(rows, "method", "method_config")
    if len(roots) > 1:
        label_sweeps(rows)
    df = pd.DataFrame(rows)
    metric_cols = sorted(c for c in df.columns if c not in RUN_COLUMNS)
    df = df.reindex(columns=RUN_COLUMNS + metric_cols)
    if df.empty:
        return df
    df["ratio"] = pd.to_numeric(df["ratio"], errors="coerce")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    order = ["task", "method", "ratio", "seed", "sweep", "run_id"]
    return df.sort_values(order, na_position="last", key=lambda s: s if s.name in ("ratio", "seed") else
                          s.astype(str).where(s.notna(), "~")).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# Reported numbers
def load_reported(dir: Path = DEFAULT_REPORTED) -> pd.DataFrame:  # noqa: A002 (the documented name)
    """Every ``*.csv`` in ``dir`` (schema: results/reported/README.md), validated, plus a ``file`` column."""
    path = Path(dir)
    if not path.is_dir() and not path.is_absolute() and (CODE_ROOT / path).is_dir():
        path = CODE_ROOT / path
    if not path.is_dir():
        raise FileNotFoundError(f"reported-numbers folder {dir} does not exist")
    frames = [_read_reported_csv(f) for f in sorted(path.glob("*.csv"))]
    if not frames:
        return pd.DataFrame(columns=REPORTED_COLUMNS + ["file"])
    return pd.concat(frames, ignore_index=True)


def _read_reported_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ReportedSchemaError(f"{path.name}: not a readable CSV ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REPORTED_COLUMNS if c not in df.columns]
    if missing:
        raise ReportedSchemaError(f"{path.name}: missing column(s) {', '.join(missing)} "
                                  f"(required: {', '.join(REPORTED_COLUMNS)})")
    df = df[REPORTED_COLUMNS].apply(lambda s: s.str.strip())
    problems = []
    for i, r in df.iterrows():
        line = i + 2  # header is line 1
        for col in ("model", "method", "metric", "kind"):
            if not r[col]:
                problems.append(f"line {line}: empty {col}")
        if r["kind"] and r["kind"] not in KINDS:
            problems.append(f"line {line}: kind {r['kind']!r} not in {KINDS}")
        if not math.isfinite(_as_float(r["value"])):
            problems.append(f"line {line}: value {r['value']!r} is not a number")
        if r["ratio"] == "" and r["kind"] == "claim":
            continue  # a claim over a range of ratios
        ratio = _as_float(r["ratio"])
        if not (0.0 <= ratio < 1.0):
            problems.append(f"line {line}: ratio {r['ratio']!r} is not a fraction in [0, 1)")
    if problems:
        raise ReportedSchemaError(f"{path.name}: " + "; ".join(problems[:5]) +
                                  (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    df["ratio"] = pd.to_numeric(df["ratio"].replace("", float("nan")))
    df["value"] = pd.to_numeric(df["value"])
    df["file"] = path.name
    return df


_DATASET_ALIASES = {"imagenet1k": "imagenet", "in1k": "imagenet", "ilsvrc2012": "imagenet",
                    "wikitext2rawv1": "wikitext2", "wikitext2v1": "wikitext2"}


def _norm_dataset(name: Any) -> str:
    s = re.sub(r"[^a-z0-9]", "", str(name).lower()) if isinstance(name, str) else ""
    return _DATASET_ALIASES.get(s, s)


def _match_reported(reported: pd.DataFrame, model: str, dataset: Any, method: str, ratio: float,
                    metric: str) -> list[pd.Series]:
    if reported is None or reported.empty:
        return []
    rows = reported[(reported["model"] == model) & (reported["method"] == base_name(method))
                    & (reported["metric"] == metric)
                    & ((reported["ratio"] - ratio).abs() <= RATIO_TOL)]
    ours = _norm_dataset(dataset)
    return [r for _, r in rows.iterrows() if not ours or not r["dataset"] or _norm_dataset(r["dataset"]) == ours]


# --------------------------------------------------------------------------------------------------------------
# Tables
def _decimals(x: float) -> int:
    """Decimals that show ``x`` with about three significant digits (at most 12 decimals)."""
    a = abs(x)
    if a == 0 or a >= 1000:
        return 0
    if a >= 100:
        return 1
    if a >= 1:
        return 2
    return min(12, max(3, 2 - math.floor(math.log10(a))))


def _fmt(x: float, decimals: int | None = None, sign: bool = False) -> str:
    if not math.isfinite(x):
        return str(x)
    d = _decimals(x) if decimals is None else decimals
    return f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def _ratio_label(r: float) -> str:
    return f"{r:g}"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
          "–": "--", "—": "---", "−": "-", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
          "†": r"$^\dagger$"}


def latex_escape(text: Any) -> str:
    """Escape LaTeX specials (and ±, Δ, †) in plain text."""
    return "".join(_LATEX.get(c, c) for c in str(text))


def _leaf(metric: str) -> tuple[str, str]:
    """(derived-form prefix or "", metrics.json key): ``xdense/latency_ms`` -> ("xdense/", "latency_ms")."""
    for prefix in ("drop/", "relchange/", "xdense/"):
        if metric.startswith(prefix):
            return prefix, metric[len(prefix):]
    return "", metric


def _name_unit_scale(key: str) -> tuple[str, str, float]:
    scope = key.startswith("scope/")
    base = key[len("scope/"):] if scope else key
    if base in UNITS:
        name, unit, scale = UNITS[base]
        if base in ("removed_fraction", "compression_x"):
            unit = ", ".join(u for u in ("scope" if scope else "model", unit) if u)
        elif scope:
            name += " in scope"
        return name, unit, scale
    parts = key.split("/")
    if parts[0] == "ppl" and len(parts) == 2:
        return f"PPL {parts[1]}", "", 1.0
    if parts[0] == "acc" and len(parts) == 2:
        return re.sub(r"^top(\d+)$", r"top-\1", parts[1]) + " acc", "", 1.0
    if parts[0] == "zeroshot" and len(parts) == 3:
        return f"{parts[1]} {parts[2]}", "", 1.0
    return key, "", 1.0


def column_label(metric: str) -> str:
    """Human-readable header with its unit: ``peak_mem_bytes`` -> ``peak memory (MB)``."""
    prefix, key = _leaf(metric)
    name, unit, _ = _name_unit_scale(key)
    if prefix == "xdense/":
        return f"{name} (x dense)"
    if prefix == "relchange/":
        return f"{name} change (rel.)"
    if key in IQR_OF and prefix == "drop/":
        unit = unit.split(",")[0]
    label = f"{name} ({unit})" if unit else name
    return f"drop in {label}" if prefix == "drop/" else label


def _scale(metric: str) -> float:
    prefix, key = _leaf(metric)
    return _name_unit_scale(key)[2] if prefix in ("", "drop/") else 1.0


@dataclass
class Cell:
    """One table cell: seed statistics (in display units) or a status, its marks, and reported numbers beside it."""

    mean: float | None = None
    std: float | None = None  # sample std over seeds, or the IQR for timings
    n: int = 0
    status: str | None = None  # shown when there is no value: missing, running, failed (nan), n/a, corrupt
    extra: list[str] = field(default_factory=list)  # other runs of a valued cell: "1 failed (oom)"; "mixed: code"
    best: bool = False
    dense_best: bool = False  # a dense cell better than every compressed method of its column
    noisy: bool = False
    rss: bool = False
    refs: list[tuple[str, float]] = field(default_factory=list)  # ("rep" | "rep*", value)

    @property
    def markable(self) -> bool:
        return self.mean is not None and not self.noisy and not self.rss

    def render(self, style: str = "plain") -> str:
        esc = latex_escape if style == "latex" else str
        if self.mean is None:
            text = esc(self.status or "missing")
            decimals = None
        else:
            decimals = _decimals(self.mean)
            spread = self.std is not None and round(self.std, decimals) != 0  # one that rounds to 0 is left out
            core = _fmt(self.mean, decimals) + (f" ± {_fmt(self.std, decimals)}" if spread else "")
            wrap = {("markdown", True): "**{}**", ("latex", True): r"\textbf{{{}}}",
                    ("markdown", False): "*{}*", ("latex", False): r"\textit{{{}}}"}
            if self.best or self.dense_best:
                core = wrap.get((style, self.best), "{}").format(esc(core) if style == "latex" else core)
            else:
                core = esc(core)
            text = core + esc(" †" if self.noisy else "") + (" (RSS)" if self.rss else "")
            text += f" (n={self.n})" if self.n > 1 else ""
            if self.extra:
                text += esc(f" [{', '.join(self.extra)}]")
        for tag, value in self.refs:
            ref = f"{tag} {_fmt(value)}"
            if self.mean is not None:
                ref += f", Δ{_fmt(self.mean - value, max(decimals or 0, _decimals(value)), sign=True)}"
            text += " " + esc(f"({ref})")
        return text.replace("|", r"\|") if style == "markdown" else text


@dataclass
class TaskTable:
    """The table of one task: cells keyed by (method, ratio, metric), plus the task's claims."""

    task: str
    model: str
    dataset: str
    main_metric: str | None
    higher_is_better: bool | None
    methods: list[str]
    ratios: list[float]
    metrics: list[str]
    cells: dict[tuple[str, float, str], Cell]
    claims: pd.DataFrame
    counts: dict[str, int]
    mixed: dict[str, list[str]] = field(default_factory=dict)  # key -> its distinct values among the task's runs
    sweeps: dict[str, int] = field(default_factory=dict)  # sweep -> runs, when the task spans several sweeps

    def frame(self, style: str = "plain") -> pd.DataFrame:
        """Rendered strings: index = method, columns = MultiIndex (ratio, metric) with metric keys."""
        cols = pd.MultiIndex.from_tuples([(_ratio_label(r), m) for r in self.ratios for m in self.metrics],
                                         names=["ratio", "metric"])
        data = [[self.cells[(meth, r, m)].render(style) for r in self.ratios for m in self.metrics]
                for meth in self.methods]
        return pd.DataFrame(data, index=pd.Index(self.methods, name="method"), columns=cols)


def _mode(series: pd.Series) -> Any:
    s = series.dropna()
    return s.astype(str).mode().iloc[0] if not s.empty else None


def _direction(metric: str, table_main: str | None, higher_is_better: bool | None) -> bool | None:
    """True: higher is better, False: lower is better, None: do not mark."""
    if metric == table_main:
        return higher_is_better
    if metric.startswith(("ppl/", "drop/")):
        return False
    if metric.startswith(("dense/", "relchange/")):
        return None
    prefix, key = _leaf(metric)
    leaf = key.split("/")[-1]
    if leaf in ACCOUNTING or key in RSS_ALWAYS:
        return None
    if leaf in LOWER_IS_BETTER:
        return False
    return True if {key, leaf} & HIGHER_IS_BETTER or (not prefix and "acc" in leaf) else None


def _numeric(task_runs: pd.DataFrame, key: str) -> pd.Series:
    if key not in task_runs.columns:
        return pd.Series(math.nan, index=task_runs.index, dtype=float)
    return pd.to_numeric(task_runs[key], errors="coerce").astype(float)


def _is_dense(methods: pd.Series) -> pd.Series:
    return methods.map(lambda m: isinstance(m, str) and base_name(m) == "dense")


def _metric_values(task_runs: pd.DataFrame, metric: str) -> pd.Series:
    """Per-run numeric values of ``metric`` (with the derived ``drop/``, ``relchange/``, ``xdense/`` forms), in
    metrics.json units."""
    prefix, key = _leaf(metric)
    ours = _numeric(task_runs, key)
    if not prefix:
        return ours
    dense = _numeric(task_runs, f"dense/{key}")
    is_dense = _is_dense(task_runs["method"]) & (task_runs["status"] == "done")
    dense = dense.fillna(ours[is_dense].mean() if is_dense.any() else math.nan)
    return {"drop/": dense - ours, "relchange/": ours / dense - 1.0, "xdense/": ours / dense}[prefix]


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, (int, float)) and value == 1) or str(value).lower() == "true"


def _noisy(task_runs: pd.DataFrame, metric: str) -> pd.Series:
    """Per run: is the timing behind ``metric`` flagged noisy or its IQR above ``NOISY_IQR`` of its median."""
    timing = TIMING_OF.get(_leaf(metric)[1])
    flags = pd.Series(False, index=task_runs.index)
    if timing is None:
        return flags
    if f"{timing}_noisy" in task_runs.columns:
        flags |= task_runs[f"{timing}_noisy"].map(_truthy)
    median, iqr = (_numeric(task_runs, k) for k in TIMING_KEYS[timing])
    return flags | (iqr / median > NOISY_IQR).fillna(False)


def _rss(task_runs: pd.DataFrame, metric: str) -> pd.Series:
    """Per run: is ``metric`` a process RSS rather than the model's memory."""
    key = _leaf(metric)[1]
    if key in RSS_ALWAYS:
        return pd.Series(True, index=task_runs.index)
    if key not in RSS_IF_PROTOCOL or "protocol/peak_mem" not in task_runs.columns:
        return pd.Series(False, index=task_runs.index)
    return task_runs["protocol/peak_mem"].map(lambda p: isinstance(p, str) and p.startswith("rss"))


def _comparability(task_runs: pd.DataFrame) -> pd.DataFrame:
    """Per run, what must agree for runs to be compared: code version, device, torch, measurement protocol."""
    code = [None if not isinstance(s, str) else s[:10] + ("+dirty" if _truthy(d) else "")
            for s, d in zip(task_runs["git_sha"], task_runs["git_dirty"])]
    protocol = [c for c in task_runs.columns if c.startswith("protocol/")
                and c.split("/", 1)[1].split("/")[0] not in PER_RUN_PROTOCOL]
    out = pd.DataFrame({"code": code, "device": task_runs["device"], "torch": task_runs["torch"]},
                       index=task_runs.index)
    return pd.concat([out, task_runs[protocol].astype(object)], axis=1)


def _mixed(keys: pd.DataFrame) -> dict[str, list[str]]:
    """Columns of ``keys`` with more than one distinct non-missing value, with those values."""
    out = {}
    for col in keys.columns:
        values = sorted({str(v) for v in keys[col] if v is not None and not (isinstance(v, float) and math.isnan(v))})
        if len(values) > 1:
            out[col] = values
    return out


def _cell(group: pd.DataFrame, values: pd.Series, spread: pd.Series | None, noisy: pd.Series, rss: pd.Series,
          keys: pd.DataFrame) -> Cell:
    if group.empty:
        return Cell(status="missing")
    status = group["status"]
    done = (status == "done") & values.notna()
    vals = values[done]
    failed = group[status == "failed"]
    reasons = sorted({str(r) for r in failed["failure_reason"].dropna()})
    failed_text = "failed" + (f" ({', '.join(reasons)})" if reasons else "")
    n_running, n_corrupt = int((status == "running").sum()), int((status == "corrupt").sum())
    if not vals.empty:
        extra = [f"{len(failed)} {failed_text}"] if len(failed) else []
        extra += [f"{n_running} running"] if n_running else []
        extra += [f"{n_corrupt} corrupt"] if n_corrupt else []
        mixed = _mixed(keys[done])
        extra += ["mixed: " + ", ".join(mixed)] if mixed else []
        n = len(vals)
        if spread is not None:
            std = float(spread[done].mean()) if spread[done].notna().any() else None
        else:
            std = float(vals.std(ddof=1)) if n > 1 else None
        return Cell(mean=float(vals.mean()), std=std, n=n, extra=extra, noisy=bool(noisy[done].any()),
                    rss=bool(rss[done].any()))
    if (status == "done").any():
        return Cell(status="n/a")
    if len(failed):
        return Cell(status=failed_text)
    return Cell(status="running" if n_running else "corrupt")


def _ratio_key(r: float) -> float:
    return round(float(r), 9)


def _mark(cells: dict[tuple[str, float, str], Cell], methods: list[str], r: float, metric: str,
          direction: bool) -> None:
    """Bold the best compressed cell(s) of a column; italicise dense where it beats every compressed cell."""
    compressed = [cells[(m, r, metric)] for m in methods if base_name(m) != "dense"]
    valued = [c.mean for c in compressed if c.mean is not None]
    pick = max if direction else min
    candidates = [c for c in compressed if c.markable]
    if candidates:
        best = pick(c.mean for c in candidates)
        for c in candidates:
            c.best = c.mean == best
    for m in methods:
        dense = cells[(m, r, metric)]
        if base_name(m) == "dense" and dense.markable and valued:
            dense.dense_best = pick(valued + [dense.mean]) == dense.mean and dense.mean not in valued


def build_tables(runs: pd.DataFrame, metrics: Sequence[str] | None = None,
                 reported: pd.DataFrame | None = None) -> dict[str, TaskTable]:
    """One ``TaskTable`` per task (sorted by name) from ``collect_runs`` output."""
    metrics = list(metrics or DEFAULT_METRICS)
    tables: dict[str, TaskTable] = {}
    if runs.empty:
        return tables
    runs = runs.reindex(columns=list(dict.fromkeys(RUN_COLUMNS + list(runs.columns))))
    placed = runs[runs["task"].notna() & runs["method"].notna()]
    for task in sorted(placed["task"].astype(str).unique()):
        t = placed[placed["task"] == task].copy()
        t["rkey"] = t["ratio"].fillna(0.0).map(_ratio_key)
        main = _mode(t["main_metric"])
        hib = t["higher_is_better"].dropna()
        higher = bool(hib.astype(bool).mode().iloc[0]) if not hib.empty else None
        model = _mode(t["model"]) or task
        dataset = _mode(t["dataset"]) or ""
        task_metrics = [main if m == "main" else m for m in metrics if not (m == "main" and main is None)]
        task_metrics = list(dict.fromkeys(task_metrics))
        is_dense = _is_dense(t["method"])
        dense_labels = sorted(t.loc[is_dense, "method"].unique())
        others = sorted(m for m in t["method"].unique() if m not in dense_labels)
        methods = dense_labels + others
        ratios = sorted(t.loc[~is_dense, "rkey"].unique()) or [0.0]
        groups = {key: g for key, g in t.groupby(["method", "rkey"])}
        ours = reported[reported["model"] == model] if reported is not None and not reported.empty else None
        keys = _comparability(t)
        cells: dict[tuple[str, float, str], Cell] = {}
        for metric in task_metrics:
            scale = _scale(metric)
            values = _metric_values(t, metric) * scale
            iqr = IQR_OF.get(metric)
            spread = _numeric(t, iqr) * scale if iqr else None
            noisy, rss = _noisy(t, metric), _rss(t, metric)
            for meth in methods:
                dense = meth in dense_labels
                for r in ratios:
                    group = t[t["method"] == meth] if dense else groups.get((meth, r), t.iloc[0:0])
                    idx = group.index
                    cell = _cell(group, values[idx], None if spread is None else spread[idx], noisy[idx], rss[idx],
                                 keys.loc[idx])
                    for ref in _match_reported(ours, model, dataset, meth, 0.0 if dense else r, metric):
                        cell.refs.append(("rep*" if ref["kind"] == "claim" else "rep", float(ref["value"]) * scale))
                    cells[(meth, r, metric)] = cell
            direction = _direction(metric, main, higher)
            if direction is not None:
                for r in ratios:
                    _mark(cells, methods, r, metric, direction)
        claims = pd.DataFrame(columns=REPORTED_COLUMNS)
        if reported is not None and not reported.empty:
            claims = reported[(reported["kind"] == "claim") & (reported["model"] == model)]
            norm = _norm_dataset(dataset)
            claims = claims[[not norm or not d or _norm_dataset(d) == norm for d in claims["dataset"]]]
        counts = t["status"].value_counts().to_dict()
        sweeps = t["sweep"].value_counts().sort_index().to_dict() if t["sweep"].nunique() > 1 else {}
        tables[task] = TaskTable(task, model, dataset, main, higher, methods, ratios, task_metrics, cells, claims,
                                 {k: int(v) for k, v in counts.items()}, _mixed(keys[t["status"] == "done"]),
                                 {str(k): int(v) for k, v in sweeps.items()})
    return tables


def _describe(tt: TaskTable) -> str:
    direction = {True: "higher is better", False: "lower is better"}.get(tt.higher_is_better, "direction unknown")
    runs = ", ".join(f"{tt.counts[s]} {s}" for s in ("done", "failed", "running", "corrupt") if tt.counts.get(s))
    dataset = f", dataset {tt.dataset}" if tt.dataset else ""
    text = f"model {tt.model}{dataset}, main metric {tt.main_metric or 'unknown'} ({direction}); runs: {runs}"
    if tt.sweeps:
        text += "; sweeps: " + ", ".join(f"{s} ({n} runs)" for s, n in tt.sweeps.items())
    if tt.mixed:
        text += "; MIXED " + "; ".join(f"{k}: {', '.join(v)}" for k, v in tt.mixed.items())
    return text


def _claim_lines(tt: TaskTable) -> list[str]:
    lines = []
    for _, c in tt.claims.iterrows():
        ratio = "ratio n/a" if pd.isna(c["ratio"]) else f"ratio {_ratio_label(c['ratio'])}"
        where = ", ".join(x for x in (c["paper"], c["table"], c["source"]) if x)
        lines.append(f"rep* {c['method']}, {ratio}: {c['metric']} = {_fmt(float(c['value']))} "
                     f"({where}{'; ' + c['protocol'] if c['protocol'] else ''})")
    return lines


def render_markdown(tables: dict[str, TaskTable], runs: pd.DataFrame) -> str:
    """The whole ``table.md``: legend, one section per task, then unreadable runs."""
    out = ["# Results", "", LEGEND, ""]
    if not tables:
        out += ["No runs with a known task.", ""]
    for name, tt in tables.items():
        frame = tt.frame("markdown")
        frame.columns = [f"r={r} {column_label(m)}" for r, m in frame.columns]
        table = frame.to_markdown(tablefmt="pipe", disable_numparse=True,
                                  colalign=("left",) + ("right",) * frame.shape[1])
        out += [f"## {name}", "", _describe(tt), "", table, ""]
        claims = _claim_lines(tt)
        if claims:
            out += [f"Claims for {tt.model}:", ""] + [f"- {line}" for line in claims] + [""]
    bad = runs[runs["status"] == "corrupt"] if not runs.empty else runs
    if not bad.empty:
        out += ["## Unreadable runs", ""]
        out += [f"- {r['run_id']}: {r['error']}" for _, r in bad.iterrows()] + [""]
    return "\n".join(out)


def render_latex(tables: dict[str, TaskTable]) -> str:
    """``table.tex``: one booktabs ``tabular`` per task, a ratio group over its metric columns (``\\cmidrule``
    under each group), numeric columns right-aligned; claims as text below it."""
    out = ["% Generated by runners.report; needs \\usepackage{booktabs}.", ""]
    for name, tt in tables.items():
        frame = tt.frame("latex")
        k = len(tt.metrics)
        groups = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{ratio {_ratio_label(r)}}}" for r in tt.ratios)
        rules = " ".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(tt.ratios)))
        heads = " & ".join(latex_escape(column_label(m)) for _ in tt.ratios for m in tt.metrics)
        lines = [rf"\begin{{tabular}}{{l{'r' * frame.shape[1]}}}", r"\toprule", rf" & {groups} \\", rules,
                 rf"Method & {heads} \\", r"\midrule"]
        lines += [" & ".join([latex_escape(meth), *row]) + r" \\" for meth, row in zip(tt.methods, frame.values)]
        lines += [r"\bottomrule", r"\end{tabular}"]
        out += [f"% {latex_escape(name)}: {latex_escape(_describe(tt))}", *lines]
        for line in _claim_lines(tt):
            out.append(r"\par\noindent{\footnotesize " + latex_escape(line) + "}")
        out.append("")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Writing
def _file_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", task).strip("_") or "task"


def write_report(roots: Path | Sequence[Path], metrics: list[str] | None = None, reported_dir: Path | None = None,
                 out: Path | None = None, x: str = "ratio") -> Path:
    """Write ``results.csv``, ``table.md``, ``table.tex``, ``pareto.{png,pdf}`` and ``figures/<task>.{png,pdf}``
    into ``out`` (default ``<root>/report`` for one root); return it. ``reported_dir=None`` uses results/reported
    when it exists; ``x`` is the figures' axis (``ratio`` or ``compression``)."""
    return _write(roots, collect_runs(roots), metrics, reported_dir, out, x)


def _write(roots: Path | Sequence[Path], runs: pd.DataFrame, metrics: list[str] | None, reported_dir: Path | None,
           out: Path | None = None, x: str = "ratio") -> Path:
    if reported_dir is None:
        try:
            reported = load_reported(DEFAULT_REPORTED)
        except FileNotFoundError:
            reported = None
    else:
        reported = load_reported(Path(reported_dir))
    tables = build_tables(runs, metrics, reported)
    if out is None:
        (root,) = [roots] if isinstance(roots, (str, Path)) else roots
        out = _report_dir(Path(root))
    out = Path(out)
    write_bytes_atomic(out / "results.csv", runs.to_csv(index=False))
    write_bytes_atomic(out / "table.md", render_markdown(tables, runs))
    write_bytes_atomic(out / "table.tex", render_latex(tables))
    for fmt in ("png", "pdf"):
        write_bytes_atomic(out / f"pareto.{fmt}", figures.render(tables, runs, x, fmt))
        for name, tt in tables.items():
            if tt.main_metric:
                write_bytes_atomic(out / "figures" / f"{_file_name(name)}.{fmt}",
                                   figures.render({name: tt}, runs, x, fmt))
    return out


# --------------------------------------------------------------------------------------------------------------
# Hydra callback and CLI
class ReportCallback(Callback):
    """Hydra callback: at the end of every multirun, write the sweep's report and print its tables."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        return None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            out_dir = OmegaConf.select(config, "out_dir", throw_on_resolution_failure=True)
            if not out_dir:
                log.warning("report: the config has no out_dir; no report written")
                return
            root = Path(str(out_dir))
            runs = collect_runs(root)
            if runs.empty:
                log.warning("report: no runs under %s", root)
                return
            report = _write(root, runs, None, None)
            print((report / "table.md").read_text(), flush=True)
            log.info("report written to %s", report)
            _log_to_wandb(config, root, report)
        except Exception as exc:  # a report must never fail the sweep
            log.warning("report failed: %s: %s", type(exc).__name__, exc)


def _log_to_wandb(config: DictConfig, root: Path, report: Path) -> None:
    """With ``logger=wandb``, log the sweep's tables to a W&B run of job type ``report`` in the experiment's group."""
    if OmegaConf.select(config, "logger.name") != "wandb":
        return
    from runners.loggers import create_logger
    from runners.schema import LoggerConfig

    logger_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoggerConfig), config.logger))
    experiment = str(OmegaConf.select(config, "experiment_name", default="adhoc"))
    run_id = f"report-{experiment}-{stable_hash(str(root.resolve()), 8)}"
    logger = create_logger(logger_cfg, run_id, report, experiment, {"out_dir": str(root)}, root, job_type="report",
                           name=f"report-{experiment}")
    try:
        logger.table("results", pd.read_csv(report / "results.csv"))
    finally:
        logger.finish()


def _split_metrics(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [m.strip() for m in text.split(",") if m.strip()]
    return items or None


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runners.report",
        description="Write <dir>/report/ (results.csv, table.md, table.tex, pareto.png/.pdf, figures/) and print "
                    "table.md. Several folders are combined into one report in --out.")
    parser.add_argument("dirs", type=Path, nargs="+", metavar="dir",
                        help="an out_dir holding runs/<run_id>/run.json; several are compared side by side")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default <dir>/report; required with several folders)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metrics.json keys; 'main' = the task's main metric; drop/, relchange/ "
                             f"and xdense/ forms (default: {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--reported", type=Path, default=None,
                        help=f"folder of reported-numbers CSVs (default: {DEFAULT_REPORTED} when it exists)")
    parser.add_argument("--x", choices=tuple(figures.X_AXES), default="ratio",
                        help="figures' x axis: ratio removed inside the scope, or whole-model compression (log)")
    args = parser.parse_args(None if argv is None else list(argv))
    for d in args.dirs:
        if not d.is_dir():
            print(f"error: {d} does not exist or is not a directory", file=sys.stderr)
            return 2
    if len(args.dirs) > 1 and args.out is None:
        print("error: several folders are combined into one report: give --out <folder>", file=sys.stderr)
        return 2
    runs = collect_runs(args.dirs)
    if runs.empty:
        print(f"no runs under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 1
    try:
        report = _write(args.dirs, runs, _split_metrics(args.metrics), args.reported, args.out, args.x)
    except (FileNotFoundError, ReportedSchemaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write((report / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
