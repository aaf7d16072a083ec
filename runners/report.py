"""Reports: collect run folders into one DataFrame, then write paper-style tables, a Pareto plot and the
comparison with numbers reported by papers.

    python -m runners.report results/<experiment> [--metrics main,removed_fraction] [--reported results/reported]

writes ``<dir>/report/{results.csv, table.md, table.tex, pareto.png}`` and prints ``table.md``.

Table cells (one table per task; rows = methods, columns = (ratio, metric)):

* ``mean ± std (n=k)`` over seeds (sample std); a single seed shows the value alone.
* bold (``**x**`` / ``\\textbf{x}``): best compressed method of the column, for metrics with a known direction
  (the task's main metric uses ``higher_is_better``; ``ppl/``, ``drop/``, latency, memory, FLOPs lower;
  accuracies, throughput higher); dense and accounting columns (``removed_fraction``, ...) are never marked.
* ``failed (<reason>)``, ``running``, ``missing`` (expected, i.e. the method is in the table and another method
  ran that ratio, but no run exists), ``n/a`` (done, metric absent). Extra runs of a valued cell that failed or are
  still running are noted in brackets, e.g. ``[1 failed (oom)]``.
* ``(rep x, Δ±d)``: a reported number (``results/reported/*.csv``, ``kind=reported``) and ours − reported.
  ``(rep* x, Δ±d)``: the same for a *claim* (``kind=claim``: an abstract or design-document statement, not a
  table entry); every claim for the task's model is also listed under its table with its source.
* The dense row (ratio 0) is repeated under every ratio.

Metric names are metrics.json keys, plus ``main`` (the task's main metric) and two derived forms:
``drop/<key>`` = dense − ours and ``relchange/<key>`` = ours / dense − 1, where "dense" is the run's own
``dense/<key>`` when recorded, else the mean of the task's dense runs.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from core.io import stable_hash, write_bytes_atomic

log = logging.getLogger(__name__)

RUN_COLUMNS = ["run_id", "status", "failure_reason", "error", "experiment", "task", "model", "dataset", "family",
               "method", "ratio", "seed", "main_metric", "higher_is_better"]
REPORTED_COLUMNS = ["paper", "table", "model", "dataset", "method", "ratio", "metric", "value", "kind", "protocol",
                    "source"]
KINDS = ("reported", "claim")
DEFAULT_METRICS = ("main", "removed_fraction")
RATIO_TOL = 1e-6
CODE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPORTED = Path("results/reported")
LOWER_IS_BETTER = {"latency_ms", "decode_ms_per_token", "peak_mem_bytes", "flops", "macs", "compress_s", "bytes_on_disk"}
HIGHER_IS_BETTER = {"throughput", "compression_x"}

LEGEND = (
    "Cells: mean ± std over seeds (n = seeds, shown when > 1). **Bold**: best compressed method in the column "
    "(dense and accounting columns are not marked). `failed (<reason>)`, `running`, `missing` (expected but not "
    "run), `n/a` (metric not recorded). `(rep x, Δ±d)`: number reported by a paper and ours − reported; "
    "`rep*`: a claim (abstract or design document, not a table entry), listed with its source under the table. "
    "The dense row is repeated under every ratio.")


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


def _run_row(run_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run_dir.name}
    rec, why = _read_json(run_dir / "run.json")
    if rec is None:
        warnings.warn(f"run {run_dir.name}: run.json {why}; counted as corrupt", stacklevel=3)
        row.update(status="corrupt", error=f"run.json {why}")
        return row
    config, summary = _as_dict(rec.get("config")), _as_dict(rec.get("summary"))
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


def collect_runs(root: Path) -> pd.DataFrame:
    """One row per ``<root>/runs/<run_id>/``: run fields, summary fields and every metrics.json key.

    Unreadable run.json (or a done run without readable metrics.json) gives status ``corrupt`` and a warning.
    """
    runs_dir = _runs_dir(Path(root))
    rows = [_run_row(p) for p in sorted(runs_dir.iterdir()) if p.is_dir()] if runs_dir.is_dir() else []
    label_variants(rows, "task", "task_config")
    label_variants(rows, "method", "method_config")
    df = pd.DataFrame(rows)
    metric_cols = sorted(c for c in df.columns if c not in RUN_COLUMNS)
    df = df.reindex(columns=RUN_COLUMNS + metric_cols)
    if df.empty:
        return df
    df["ratio"] = pd.to_numeric(df["ratio"], errors="coerce")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    return df.sort_values(["task", "method", "ratio", "seed", "run_id"], na_position="last",
                          key=lambda s: s if s.name in ("ratio", "seed") else s.astype(str).where(s.notna(), "~")).reset_index(drop=True)


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
    a = abs(x)
    return 0 if a >= 1000 else 2 if a >= 1 else 4


def _fmt(x: float, decimals: int | None = None, sign: bool = False) -> str:
    if not math.isfinite(x):
        return str(x)
    d = _decimals(x) if decimals is None else decimals
    return f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def _ratio_label(r: float) -> str:
    return f"{r:g}"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
          "–": "--", "—": "---", "−": "-", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def latex_escape(text: Any) -> str:
    """Escape LaTeX specials (and ±, Δ) in plain text."""
    return "".join(_LATEX.get(c, c) for c in str(text))


@dataclass
class Cell:
    """One table cell: seed statistics or a status, plus reported numbers beside it."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    status: str | None = None  # shown when there is no value: missing, running, failed (nan), n/a, corrupt
    extra: list[str] = field(default_factory=list)  # other runs of a valued cell: "1 failed (oom)"
    best: bool = False
    refs: list[tuple[str, float]] = field(default_factory=list)  # ("rep" | "rep*", value)

    def render(self, style: str = "plain") -> str:
        esc = latex_escape if style == "latex" else str
        if self.mean is None:
            text = esc(self.status or "missing")
            decimals = None
        else:
            decimals = _decimals(self.mean)
            core = _fmt(self.mean, decimals) + (f" ± {_fmt(self.std, decimals)}" if self.n > 1 else "")
            if self.best:
                core = f"**{core}**" if style == "markdown" else rf"\textbf{{{esc(core)}}}" if style == "latex" \
                    else core
            elif style == "latex":
                core = esc(core)
            text = core + (f" (n={self.n})" if self.n > 1 else "")
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

    def frame(self, style: str = "plain") -> pd.DataFrame:
        """Rendered strings: index = method, columns = MultiIndex (ratio, metric)."""
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
    leaf = metric.split("/")[-1]
    if leaf in LOWER_IS_BETTER:
        return False
    return True if leaf in HIGHER_IS_BETTER or "acc" in leaf else None


def _numeric(task_runs: pd.DataFrame, key: str) -> pd.Series:
    if key not in task_runs.columns:
        return pd.Series(math.nan, index=task_runs.index, dtype=float)
    return pd.to_numeric(task_runs[key], errors="coerce").astype(float)


def _metric_values(task_runs: pd.DataFrame, metric: str) -> pd.Series:
    """Per-run numeric values of ``metric`` (with the derived ``drop/`` and ``relchange/`` forms)."""
    for prefix in ("drop/", "relchange/"):
        if metric.startswith(prefix):
            key = metric[len(prefix):]
            ours = _numeric(task_runs, key)
            dense = _numeric(task_runs, f"dense/{key}")
            is_dense = (task_runs["method"] == "dense") & (task_runs["status"] == "done")
            dense = dense.fillna(ours[is_dense].mean() if is_dense.any() else math.nan)
            return dense - ours if prefix == "drop/" else ours / dense - 1.0
    return _numeric(task_runs, metric)


def _cell(group: pd.DataFrame, values: pd.Series) -> Cell:
    if group.empty:
        return Cell(status="missing")
    status = group["status"]
    vals = values[status == "done"].dropna()
    failed = group[status == "failed"]
    reasons = sorted({str(r) for r in failed["failure_reason"].dropna()})
    failed_text = "failed" + (f" ({', '.join(reasons)})" if reasons else "")
    n_running, n_corrupt = int((status == "running").sum()), int((status == "corrupt").sum())
    if not vals.empty:
        extra = [f"{len(failed)} {failed_text}"] if len(failed) else []
        extra += [f"{n_running} running"] if n_running else []
        extra += [f"{n_corrupt} corrupt"] if n_corrupt else []
        n = len(vals)
        return Cell(mean=float(vals.mean()), std=float(vals.std(ddof=1)) if n > 1 else None, n=n, extra=extra)
    if (status == "done").any():
        return Cell(status="n/a")
    if len(failed):
        return Cell(status=failed_text)
    return Cell(status="running" if n_running else "corrupt")


def _ratio_key(r: float) -> float:
    return round(float(r), 9)


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
        others = sorted(m for m in t["method"].unique() if m != "dense")
        methods = (["dense"] if (t["method"] == "dense").any() else []) + others
        ratios = sorted(t.loc[t["method"] != "dense", "rkey"].unique()) or [0.0]
        groups = {key: g for key, g in t.groupby(["method", "rkey"])}
        dense_runs = t[t["method"] == "dense"]
        ours = reported[reported["model"] == model] if reported is not None and not reported.empty else None
        cells: dict[tuple[str, float, str], Cell] = {}
        for metric in task_metrics:
            values = _metric_values(t, metric)
            for meth in methods:
                dense = meth == "dense"
                for r in ratios:
                    group = dense_runs if dense else groups.get((meth, r), t.iloc[0:0])
                    cell = _cell(group, values[group.index])
                    for ref in _match_reported(ours, model, dataset, meth, 0.0 if dense else r, metric):
                        cell.refs.append(("rep*" if ref["kind"] == "claim" else "rep", float(ref["value"])))
                    cells[(meth, r, metric)] = cell
            direction = _direction(metric, main, higher)
            if direction is None:
                continue
            for r in ratios:
                valued = [cells[(m, r, metric)] for m in others if cells[(m, r, metric)].mean is not None]
                if valued:
                    best = (max if direction else min)(c.mean for c in valued)
                    for c in valued:
                        c.best = c.mean == best
        claims = pd.DataFrame(columns=REPORTED_COLUMNS)
        if reported is not None and not reported.empty:
            claims = reported[(reported["kind"] == "claim") & (reported["model"] == model)]
            ours = _norm_dataset(dataset)
            claims = claims[[not ours or not d or _norm_dataset(d) == ours for d in claims["dataset"]]]
        counts = t["status"].value_counts().to_dict()
        tables[task] = TaskTable(task, model, dataset, main, higher, methods, ratios, task_metrics, cells, claims,
                                 {k: int(v) for k, v in counts.items()})
    return tables


def _describe(tt: TaskTable) -> str:
    direction = {True: "higher is better", False: "lower is better"}.get(tt.higher_is_better, "direction unknown")
    runs = ", ".join(f"{tt.counts[s]} {s}" for s in ("done", "failed", "running", "corrupt") if tt.counts.get(s))
    dataset = f", dataset {tt.dataset}" if tt.dataset else ""
    return f"model {tt.model}{dataset}, main metric {tt.main_metric or 'unknown'} ({direction}); runs: {runs}"


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
        frame.columns = [f"r={r} {m}" for r, m in frame.columns]
        out += [f"## {name}", "", _describe(tt), "",
                frame.to_markdown(tablefmt="pipe", disable_numparse=True, stralign="left"), ""]
        claims = _claim_lines(tt)
        if claims:
            out += [f"Claims for {tt.model}:", ""] + [f"- {line}" for line in claims] + [""]
    bad = runs[runs["status"] == "corrupt"] if not runs.empty else runs
    if not bad.empty:
        out += ["## Unreadable runs", ""]
        out += [f"- {r['run_id']}: {r['error']}" for _, r in bad.iterrows()] + [""]
    return "\n".join(out)


def render_latex(tables: dict[str, TaskTable]) -> str:
    """``table.tex``: one ``tabular`` per task (needs ``\\usepackage{booktabs}``), claims as text below it."""
    out = ["% Generated by runners.report; needs \\usepackage{booktabs}.", ""]
    for name, tt in tables.items():
        frame = tt.frame("latex")
        frame.index = [latex_escape(m) for m in frame.index]
        frame.columns = pd.MultiIndex.from_tuples([(r, latex_escape(m)) for r, m in frame.columns],
                                                  names=["ratio", "method"])  # the names head the index column
        body = frame.to_latex(escape=False, multicolumn=True, multicolumn_format="c",
                              column_format="l" + "l" * frame.shape[1])
        out += [f"% {latex_escape(name)}: {latex_escape(_describe(tt))}", body.rstrip()]
        for line in _claim_lines(tt):
            out.append(r"\par\noindent{\footnotesize " + latex_escape(line) + "}")
        out.append("")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Pareto plot
def render_pareto(tables: dict[str, TaskTable], runs: pd.DataFrame) -> bytes:
    """PNG bytes: per task, main metric vs removed_fraction, one line per method, dense as a reference line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n, tt in tables.items() if tt.main_metric]
    ncols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(5 * ncols, 4 * nrows))
    FigureCanvasAgg(fig)
    if not names:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no runs with a main metric", ha="center", va="center")
        ax.set_axis_off()
    for i, name in enumerate(names):
        tt = tables[name]
        ax = fig.add_subplot(nrows, ncols, i + 1)
        t = runs[(runs["task"] == name) & (runs["status"] == "done")].copy()
        t["x"], t["y"] = _numeric(t, "removed_fraction"), _numeric(t, tt.main_metric)
        t = t[t["x"].map(math.isfinite) & t["y"].map(math.isfinite)]
        ys = []
        for meth in tt.methods:
            m = t[t["method"] == meth]
            if m.empty:
                continue
            if meth == "dense":
                ax.axhline(m["y"].mean(), color="black", linestyle="--", linewidth=1, label="dense")
                ys.append(m["y"].mean())
                continue
            g = m.groupby(m["ratio"].map(_ratio_key)).agg(x=("x", "mean"), y=("y", "mean"), e=("y", "std"))
            g = g.sort_values("x")
            ax.errorbar(g["x"], g["y"], yerr=g["e"].fillna(0.0), marker="o", capsize=3, label=meth)
            ys += list(g["y"])
        if ys and min(ys) > 0 and max(ys) / min(ys) > 50:
            ax.set_yscale("log")
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(tt.higher_is_better, "")
        ax.set_title(name)
        ax.set_xlabel("removed_fraction")
        ax.set_ylabel(tt.main_metric + arrow)
        ax.grid(alpha=0.3)
        if ys:
            ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Writing
def write_report(root: Path, metrics: list[str] | None = None, reported_dir: Path | None = None) -> Path:
    """Write ``results.csv``, ``table.md``, ``table.tex`` and ``pareto.png`` into ``<root>/report``; return it.

    ``reported_dir=None`` uses results/reported when it exists.
    """
    return _write(Path(root), collect_runs(Path(root)), metrics, reported_dir)


def _write(root: Path, runs: pd.DataFrame, metrics: list[str] | None, reported_dir: Path | None) -> Path:
    if reported_dir is None:
        try:
            reported = load_reported(DEFAULT_REPORTED)
        except FileNotFoundError:
            reported = None
    else:
        reported = load_reported(Path(reported_dir))
    tables = build_tables(runs, metrics, reported)
    out = _report_dir(root)
    write_bytes_atomic(out / "results.csv", runs.to_csv(index=False))
    write_bytes_atomic(out / "table.md", render_markdown(tables, runs))
    write_bytes_atomic(out / "table.tex", render_latex(tables))
    write_bytes_atomic(out / "pareto.png", render_pareto(tables, runs))
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
    logger = create_logger(logger_cfg, run_id, report, experiment, {"out_dir": str(root)}, root, job_type="report")
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
    parser = argparse.ArgumentParser(prog="python -m runners.report",
                                     description="Write <dir>/report/ (results.csv, table.md, table.tex, pareto.png) "
                                                 "and print table.md.")
    parser.add_argument("dir", type=Path, help="an out_dir holding runs/<run_id>/run.json")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metrics.json keys; 'main' = the task's main metric "
                             f"(default: {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--reported", type=Path, default=None,
                        help=f"folder of reported-numbers CSVs (default: {DEFAULT_REPORTED} when it exists)")
    args = parser.parse_args(None if argv is None else list(argv))
    if not args.dir.is_dir():
        print(f"error: {args.dir} does not exist or is not a directory", file=sys.stderr)
        return 2
    runs = collect_runs(args.dir)
    if runs.empty:
        print(f"no runs under {args.dir}", file=sys.stderr)
        return 1
    try:
        report = _write(args.dir, runs, _split_metrics(args.metrics), args.reported)
    except (FileNotFoundError, ReportedSchemaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write((report / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
