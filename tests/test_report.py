"""Reports on synthetic run folders: collection, tables (golden markdown), LaTeX, figures, efficiency cells (units,
noise, RSS), code and protocol provenance, combined sweeps, reported numbers, the CLI and the Hydra callback.
Set UPDATE_GOLDEN=1 to rewrite the golden file (then inspect the diff)."""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from runners import figures, report
from runners.report import (
    REPORTED_COLUMNS,
    ReportCallback,
    ReportedSchemaError,
    build_tables,
    collect_runs,
    load_reported,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "report_table.md"

TASKS = {
    "demo_lm": dict(family="lm", dataset="demo", main="ppl/demo", higher=False),
    "demo_img": dict(family="image", dataset="demo-imgs", main="acc/top1", higher=True),
}
DENSE = {"demo_lm": [10.0, 10.2], "demo_img": [0.80, 0.82]}


def _write_run(root: Path, task: str, method: str, ratio: float, seed: int, value: float | None = None,
               status: str = "done", reason: str | None = None, extra: dict | None = None,
               git: dict | None = None) -> None:
    """A synthetic run folder; ``extra`` adds (or replaces) metrics.json keys, ``git`` is run.json's git state."""
    spec = TASKS[task]
    run_id = f"{task}-{method}-{ratio:g}-s{seed}"
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True)
    summary = {"task": task, "model": task, "dataset": spec["dataset"], "family": spec["family"],
               "method": method, "ratio": ratio, "seed": seed, "main_metric": spec["main"],
               "higher_is_better": spec["higher"]}
    rec = {"run_id": run_id, "status": status, "experiment": "synthetic", "failure_reason": reason,
           "error": None if status != "failed" else f"RuntimeError: {reason}",
           "config": {"task": {"name": task, "family": spec["family"]},
                      "method": {"name": method, "ratio": ratio, "scope": "all"}, "seed": seed},
           "summary": summary, "stages": {"load": 0.1}, **({"git": git} if git else {})}
    (run_dir / "run.json").write_text(json.dumps(rec))
    if status == "done":
        removed = round(0.9 * ratio, 4)
        metrics = {spec["main"]: value, f"dense/{spec['main']}": DENSE[task][seed % 2],
                   "protocol/seqlen": 128, "removed_fraction": removed, "scope/removed_fraction": ratio,
                   "params_dense": 1000, "params_stored": int(1000 * (1 - removed)), "latency_ms": 2.0 - ratio,
                   "compression_x": 1000 / int(1000 * (1 - removed)),
                   "bytes_on_disk": 4000, "method/note": "nan" if method == "svd" else 1.5, **(extra or {})}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))


def make_runs(root: Path) -> Path:
    """2 tasks, dense + 2 methods x 2 ratios x 2 seeds, with failed, running, missing and corrupt cases."""
    w = _write_run
    for seed, v in enumerate(DENSE["demo_lm"]):
        w(root, "demo_lm", "dense", 0.0, seed, v)
    for seed, v in enumerate([12.0, 12.4]):
        w(root, "demo_lm", "magnitude", 0.2, seed, v)
    for seed, v in enumerate([20.0, 21.0]):
        w(root, "demo_lm", "magnitude", 0.5, seed, v)
    for seed, v in enumerate([11.0, 11.2]):  # best at 0.2 (lower is better)
        w(root, "demo_lm", "svd", 0.2, seed, v)
    w(root, "demo_lm", "svd", 0.2, 2, status="failed", reason="oom")  # a failed extra seed of a valued cell
    w(root, "demo_lm", "svd", 0.5, 0, status="failed", reason="nan")  # the whole cell failed
    for seed, v in enumerate(DENSE["demo_img"]):
        w(root, "demo_img", "dense", 0.0, seed, v)
    for seed, v in enumerate([0.78, 0.79]):
        w(root, "demo_img", "magnitude", 0.2, seed, v)
    for seed, v in enumerate([0.70, 0.72]):
        w(root, "demo_img", "magnitude", 0.5, seed, v)
    for seed, v in enumerate([0.74, 0.75]):  # best at 0.5 (higher is better)
        w(root, "demo_img", "svd", 0.5, seed, v)
    w(root, "demo_img", "svd", 0.2, 0, status="running")
    w(root, "demo_img", "magnitude", 0.8, 0, 0.5)  # single seed; svd at 0.8 is missing
    bad = root / "runs" / "broken-run"
    bad.mkdir()
    (bad / "run.json").write_text('{"run_id": "broken-run", "status": "do')
    return root


def make_reported(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        # matches demo_lm / svd / 0.2 / ppl/demo
        dict(paper="Paper A", table="Table 1", model="demo_lm", dataset="demo", method="svd", ratio="0.2",
             metric="ppl/demo", value="11.0", kind="reported", protocol="seqlen 128", source="arXiv 0000.00000 T1"),
        # ratio not in our table: never shown
        dict(paper="Paper A", table="Table 1", model="demo_lm", dataset="demo", method="svd", ratio="0.3",
             metric="ppl/demo", value="99.0", kind="reported", protocol="", source="arXiv 0000.00000 T1"),
        # dense reference (ratio 0): shown in every dense cell
        dict(paper="Paper A", table="Table 1", model="demo_lm", dataset="", method="dense", ratio="0",
             metric="ppl/demo", value="10.0", kind="reported", protocol="", source="arXiv 0000.00000 T1"),
        # a claim on a cell of demo_img
        dict(paper="Paper B", table="abstract", model="demo_img", dataset="", method="magnitude", ratio="0.5",
             metric="acc/top1", value="0.7", kind="claim", protocol="", source="arXiv 1111.11111 abstract"),
        # dataset differs from ours: not shown
        dict(paper="Paper B", table="Table 2", model="demo_img", dataset="other-set", method="svd", ratio="0.5",
             metric="acc/top1", value="0.9", kind="reported", protocol="", source="arXiv 1111.11111 T2"),
        # a claim over a range of ratios: listed under the table only
        dict(paper="Paper B", table="abstract", model="demo_img", dataset="", method="svd", ratio="",
             metric="relchange/latency_ms", value="-0.3", kind="claim", protocol="ratio 0.2-0.5",
             source="arXiv 1111.11111 abstract"),
    ]
    with open(folder / "synthetic.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REPORTED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(runs root, report dir, reported dir), written once; tests that write reports use their own copy."""
    tmp_path = tmp_path_factory.mktemp("report")
    root = make_runs(tmp_path / "sweep")
    reported = make_reported(tmp_path / "reported")
    with pytest.warns(UserWarning, match="broken-run"):
        out = write_report(root, reported_dir=reported)
    return root, out, reported


def _row(md: str, task: str, method: str) -> list[str]:
    section = md.split(f"## {task}\n", 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {method} "))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _header(md: str, task: str) -> list[str]:
    section = md.split(f"## {task}\n", 1)[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("| method"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _cell(md: str, task: str, method: str, column: str) -> str:
    return _row(md, task, method)[_header(md, task).index(column)]


# ------------------------------------------------------------------------------------------------------------
def test_collect_runs(tmp_path):
    root = make_runs(tmp_path / "sweep")
    with pytest.warns(UserWarning, match="broken-run"):
        df = collect_runs(root)
    assert len(df) == 21
    assert list(df.columns[:len(report.RUN_COLUMNS)]) == report.RUN_COLUMNS
    assert {"ppl/demo", "acc/top1", "removed_fraction", "protocol/seqlen", "dense/ppl/demo"} <= set(df.columns)
    assert df["status"].value_counts().to_dict() == {"done": 17, "failed": 2, "running": 1, "corrupt": 1}
    assert df.loc[df["run_id"] == "broken-run", "error"].item().startswith("run.json unreadable")
    svd = df[(df["task"] == "demo_lm") & (df["method"] == "svd") & (df["status"] == "done")]
    assert svd["method/note"].map(lambda v: v != v).all()  # "nan" strings become float NaN
    running = df[df["status"] == "running"]
    assert running["acc/top1"].isna().all()
    # the runs folder itself is accepted too
    with pytest.warns(UserWarning):
        assert len(collect_runs(root / "runs")) == 21


def test_runs_of_one_task_with_different_task_configs_get_tables_of_their_own(tmp_path):
    root = tmp_path / "sweep"
    for epochs, value in ((6, 0.8), (160, 0.9)):
        for method in ("dense", "magnitude"):
            _write_run(root / str(epochs), "demo_img", method, 0.0 if method == "dense" else 0.5, 0, value)
            (run_dir,) = (root / str(epochs) / "runs").iterdir()
            rec = json.loads((run_dir / "run.json").read_text())
            rec["config"]["task"]["train"] = {"epochs": epochs, "lr": 0.1}
            (run_dir / "run.json").write_text(json.dumps(rec))
            target = root / "runs" / f"{run_dir.name}-e{epochs}"
            target.parent.mkdir(parents=True, exist_ok=True)
            run_dir.rename(target)
    df = collect_runs(root)
    assert sorted(df["task"].unique()) == ["demo_img [train.epochs=160]", "demo_img [train.epochs=6]"]
    assert set(df["model"]) == {"demo_img"}  # published numbers still match by model
    tables = build_tables(df)
    assert set(tables) == {"demo_img [train.epochs=160]", "demo_img [train.epochs=6]"}


def test_runs_of_one_method_with_different_method_configs_are_not_averaged_as_seeds(tmp_path):
    root = tmp_path / "sweep"
    _write_run(root, "demo_img", "dense", 0.0, 0, 0.9)
    for block, value in ((1, 0.8), (16, 0.7)):
        _write_run(root / str(block), "demo_img", "fips", 0.5, 0, value)
        (run_dir,) = (root / str(block) / "runs").iterdir()
        rec = json.loads((run_dir / "run.json").read_text())
        rec["config"]["method"]["sparsity_block"] = block
        (run_dir / "run.json").write_text(json.dumps(rec))
        run_dir.rename(root / "runs" / f"{run_dir.name}-b{block}")
    df = collect_runs(root)
    assert set(df["method"]) == {"dense", "fips [sparsity_block=1]", "fips [sparsity_block=16]"}
    table = build_tables(df)["demo_img"]
    assert table.methods == ["dense", "fips [sparsity_block=16]", "fips [sparsity_block=1]"]
    cells = {m: table.cells[(m, 0.5, "acc/top1")] for m in table.methods[1:]}
    assert {m: (c.n, c.mean) for m, c in cells.items()} == {"fips [sparsity_block=1]": (1, 0.8),
                                                            "fips [sparsity_block=16]": (1, 0.7)}


def test_results_csv(sweep):
    _, out, _ = sweep
    df = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert len(df) == 21
    assert set(df["task"]) == {"demo_lm", "demo_img", ""}
    assert sorted(df.loc[df["status"] == "failed", "failure_reason"]) == ["nan", "oom"]


def test_table_md_golden(sweep):
    _, out, _ = sweep
    md = (out / "table.md").read_text()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(md)
    assert md == GOLDEN.read_text()


def test_best_marking(sweep):
    _, out, _ = sweep
    md = (out / "table.md").read_text()
    # lower is better (ppl): svd at 0.2, magnitude at 0.5 (svd failed there)
    assert _cell(md, "demo_lm", "svd", "r=0.2 PPL demo").startswith("**11.10 ± 0.14**")
    assert not _cell(md, "demo_lm", "magnitude", "r=0.2 PPL demo").startswith("**")
    assert _cell(md, "demo_lm", "magnitude", "r=0.5 PPL demo").startswith("**20.50 ± 0.71**")
    # higher is better (acc): svd at 0.5, magnitude at 0.2
    assert _cell(md, "demo_img", "svd", "r=0.5 top-1 acc").startswith("**0.745 ± 0.007**")
    assert not _cell(md, "demo_img", "magnitude", "r=0.5 top-1 acc").startswith("**")
    assert _cell(md, "demo_img", "magnitude", "r=0.2 top-1 acc").startswith("**0.785")
    # dense is never bold, and accounting columns are never marked
    assert "**" not in "".join(_row(md, "demo_lm", "dense") + _row(md, "demo_img", "dense"))
    for task in TASKS:
        for method in ("dense", "magnitude", "svd"):
            for col in _header(md, task):
                if col.endswith(("removed (scope)", "compression (model, x)")):
                    assert "*" not in _cell(md, task, method, col)
    # dense is italic where it beats every compressed method of the column
    assert _cell(md, "demo_lm", "dense", "r=0.2 PPL demo").startswith("*10.10 ± 0.14* (n=2)")
    assert _cell(md, "demo_img", "dense", "r=0.5 top-1 acc").startswith("*0.810 ± 0.014*")


def test_status_cells(sweep):
    _, out, _ = sweep
    md = (out / "table.md").read_text()
    assert _cell(md, "demo_lm", "svd", "r=0.5 PPL demo") == "failed (nan)"
    assert _cell(md, "demo_lm", "svd", "r=0.5 removed (scope)") == "failed (nan)"
    assert "[1 failed (oom)]" in _cell(md, "demo_lm", "svd", "r=0.2 PPL demo")
    assert _cell(md, "demo_img", "svd", "r=0.2 top-1 acc") == "running"
    assert _cell(md, "demo_img", "svd", "r=0.8 top-1 acc") == "missing"
    assert _cell(md, "demo_img", "magnitude", "r=0.8 top-1 acc") == "**0.500**"  # single seed: no ±, no n
    # dense is broadcast to every ratio column
    dense = [_cell(md, "demo_img", "dense", f"r={r} top-1 acc") for r in ("0.2", "0.5", "0.8")]
    assert dense == ["*0.810 ± 0.014* (n=2)"] * 3
    assert _row(md, "demo_lm", "dense")[0] == "dense" and _row(md, "demo_img", "magnitude")
    assert "- broken-run: run.json unreadable" in md


def test_reported_values(sweep):
    _, out, _ = sweep
    md = (out / "table.md").read_text()
    assert _cell(md, "demo_lm", "svd", "r=0.2 PPL demo").endswith("(rep 11.00, Δ+0.10)")
    assert "99.00" not in md  # reported at ratio 0.3, which is not in the table
    assert "0.900" not in md  # reported for another dataset
    for r in ("0.2", "0.5"):
        assert _cell(md, "demo_lm", "dense", f"r={r} PPL demo").endswith("(rep 10.00, Δ+0.10)")
    assert "rep" not in _cell(md, "demo_lm", "magnitude", "r=0.2 PPL demo")
    assert _cell(md, "demo_img", "magnitude", "r=0.5 top-1 acc").endswith("(rep* 0.700, Δ+0.010)")
    assert "- rep* svd, ratio n/a: relchange/latency_ms = -0.300" in md


def test_build_tables_frame(tmp_path):
    root = make_runs(tmp_path / "sweep")
    with pytest.warns(UserWarning):
        runs = collect_runs(root)
    tables = build_tables(runs, metrics=["main", "drop/acc/top1", "relchange/latency_ms"])
    img = tables["demo_img"]
    frame = img.frame("markdown")
    assert list(frame.index) == ["dense", "magnitude", "svd"]
    assert frame.columns.names == ["ratio", "metric"]
    assert list(frame.columns[:3]) == [("0.2", "acc/top1"), ("0.2", "drop/acc/top1"), ("0.2", "relchange/latency_ms")]
    # drop = dense/<key> recorded in the run - ours; lower is better
    assert frame.loc["svd", ("0.5", "drop/acc/top1")] == "**0.0650 ± 0.0071** (n=2)"
    assert img.cells[("svd", 0.5, "drop/acc/top1")].best
    # relchange uses the mean of the task's dense runs when dense/<key> is absent
    assert frame.loc["magnitude", ("0.5", "relchange/latency_ms")].startswith("-0.250")


def test_table_tex(sweep):
    _, out, _ = sweep
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 2
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    assert r"\textbf{11.10 $\pm$ 0.14}" in tex
    assert r"(rep 11.00, $\Delta$+0.10)" in tex
    assert "**" not in tex and "±" not in tex and "Δ" not in tex
    # method column left, the 3 x 2 (img) and 2 x 3 (lm) value columns right-aligned
    assert r"\begin{tabular}{lrrrrrrrrr}" in tex and r"\begin{tabular}{lrrrrrr}" in tex
    # a group per ratio with a rule under it, then readable headers with units
    assert r" & \multicolumn{3}{c}{ratio 0.2} & \multicolumn{3}{c}{ratio 0.5} \\" in tex
    assert r"\cmidrule(lr){2-4} \cmidrule(lr){5-7}" + "\n" in tex
    assert "\nMethod & PPL demo & removed (scope) & compression (model, x) & PPL demo" in tex
    assert r"\textit{10.10 $\pm$ 0.14}" in tex  # dense better than every compressed method
    for line in tex.splitlines():  # specials are escaped everywhere (comment lines start with %)
        assert not re.search(r"(?<!\\)[_%#$]", line[1:] if line.startswith("%") else line.replace("$\\pm$", "")
                             .replace("$\\Delta$", ""))
    rows = [ln for ln in tex.splitlines() if ln.endswith("\\\\") and "multicolumn" not in ln]
    # a header and 3 methods per task; 3 ratios (img) or 2 (lm) x 3 metrics
    assert len(rows) == 8 and all(ln.count(" & ") in (9, 6) for ln in rows)


def test_figures_pdf_and_png_at_print_resolution(sweep):
    from PIL import Image

    _, out, _ = sweep
    for name in ("pareto", "figures/demo_lm", "figures/demo_img"):
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        with Image.open(out / f"{name}.png") as png:
            assert round(png.info["dpi"][0]) == figures.DPI == 300
            width_in = png.size[0] / png.info["dpi"][0]
        if name.startswith("figures/"):  # one panel: one column of a two-column paper
            assert 2.5 < width_in <= 3.5
    assert figures.RC["font.size"] >= 7 and figures.RC["legend.fontsize"] >= 6
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_pdf_figures_do_not_log_font_subsetting(tmp_path, caplog):
    """The main job's output is the table, not one INFO line per font table of every PDF."""
    with pytest.warns(UserWarning):
        runs = collect_runs(make_runs(tmp_path / "sweep"))
    caplog.set_level(logging.INFO)
    assert figures.render(build_tables(runs), runs, fmt="pdf")[:5] == b"%PDF-"
    assert not [r for r in caplog.records if r.name.startswith("fontTools")]


def _panel(runs, x="ratio", task="demo_img"):
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    figures.draw_panel(ax, build_tables(runs)[task], runs, x)
    return ax


def test_figure_styles_dense_error_bars_and_log_axis(tmp_path):
    root = make_runs(tmp_path / "sweep")
    with pytest.warns(UserWarning):
        runs = collect_runs(root)
    ax = _panel(runs)
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # each point set is an errorbar container
    # a method's colour and marker do not depend on which other methods a figure shows
    alone = _panel(runs[runs["method"] != "magnitude"])
    svd_alone = next(c.lines[0] for c in alone.containers if c.get_label() == "svd")
    for line in (lines["svd"], svd_alone):
        assert (line.get_color(), line.get_marker()) == (figures.method_style("svd")["color"],
                                                         figures.method_style("svd")["marker"])
    assert figures.method_style("svd")["color"] != figures.method_style("magnitude")["color"]
    pairs = [(figures.method_style(m)["color"], figures.method_style(m)["marker"]) for m in figures.STYLES]
    assert len(set(pairs)) == len(pairs) and all(marker != "*" for _, marker in pairs)  # the star is dense's
    assert figures.method_style("new_method") == figures.method_style("new_method")
    assert figures.method_style("svd [sweep=B]")["color"] == figures.method_style("svd")["color"]
    assert figures.method_style("svd [sweep=B]")["linestyle"] != figures.method_style("svd")["linestyle"]
    # dense: its own star at no compression, above every method
    dense = lines["dense"]
    assert dense.get_marker() == "*" and list(dense.get_xdata()) == [0.0]
    assert dense.get_zorder() > max(ln.get_zorder() for k, ln in lines.items() if k != "dense")
    # error bars: one sample std over the two seeds of magnitude at 0.5
    (bars,) = [c for c in ax.containers if c.get_label() == "magnitude"]
    segments = bars.lines[2][-1].get_segments()  # the y error bars
    spans = sorted(round(float(seg[1][1] - seg[0][1]), 4) for seg in segments)
    assert spans[-1] == round(2 * pd.Series([0.70, 0.72]).std(), 4)
    # the compression axis is logarithmic, dense at 1x
    log_ax = _panel(runs, x="compression")
    assert log_ax.get_xscale() == "log"
    assert [list(c.lines[0].get_xdata()) for c in log_ax.containers if c.get_label() == "dense"] == [[1.0]]


def test_load_reported_rejects_missing_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("paper,model,method,ratio,metric,value\nP,m,svd,0.2,ppl/x,1.0\n")
    with pytest.raises(ReportedSchemaError, match=r"bad\.csv.*missing column.*table.*dataset.*kind"):
        load_reported(tmp_path)


def test_load_reported_rejects_bad_values(tmp_path):
    folder = make_reported(tmp_path / "rep")
    text = (folder / "synthetic.csv").read_text()
    (folder / "synthetic.csv").write_text(text.replace(",reported,", ",table,", 1))
    with pytest.raises(ReportedSchemaError, match=r"synthetic\.csv: line 2: kind 'table'"):
        load_reported(folder)


def test_shipped_reported_csvs_validate():
    folder = ROOT / "results" / "reported"
    files = sorted(folder.glob("*.csv"))
    assert files, "results/reported holds no CSV"
    df = load_reported(folder)
    assert set(df["file"]) == {f.name for f in files}
    assert set(df["kind"]) <= {"reported", "claim"}
    assert (df["source"] != "").all() and (df["paper"] != "").all()
    assert ((df["ratio"] >= 0) & (df["ratio"] < 1) | (df["ratio"].isna() & (df["kind"] == "claim"))).all()
    assert (df.loc[df["method"] == "dense", "ratio"] == 0).all()


def test_cli(sweep, tmp_path, capsys):
    _, _, reported = sweep
    root = make_runs(tmp_path / "sweep")
    with pytest.warns(UserWarning):
        code = report.main([str(root), "--reported", str(reported), "--metrics", "main"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Results") and "r=0.2 removed (scope)" not in printed
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no runs under" in capsys.readouterr().err
    (tmp_path / "badrep").mkdir()
    (tmp_path / "badrep" / "x.csv").write_text("paper,value\n")
    with pytest.warns(UserWarning):
        assert report.main([str(root), "--reported", str(tmp_path / "badrep")]) == 2
    assert "x.csv: missing column" in capsys.readouterr().err


def test_cli_module_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runners.report", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


def test_callback(tmp_path, capsys, caplog):
    root = make_runs(tmp_path / "sweep")
    out = root / "report"
    cfg = OmegaConf.create({"experiment_name": "x", "out_dir": str(root)})
    with pytest.warns(UserWarning):
        ReportCallback().on_multirun_end(cfg)
    assert capsys.readouterr().out.startswith("# Results")
    assert (out / "table.md").exists()
    ReportCallback().on_run_end(cfg)
    # never raises: unresolvable out_dir, or a broken report
    ReportCallback().on_multirun_end(OmegaConf.create({"out_dir": "${missing_key}"}))
    assert "report failed" in caplog.text


def test_default_columns_are_the_scope_ratio_and_compression(sweep):
    _, out, _ = sweep
    md = (out / "table.md").read_text()
    # whole-model removed fraction is 0.9 x ratio in these runs: the table shows the ratio inside the scope
    assert _cell(md, "demo_lm", "magnitude", "r=0.2 removed (scope)") == "0.200 (n=2)"
    assert _cell(md, "demo_lm", "magnitude", "r=0.2 compression (model, x)") == "1.22 (n=2)"
    assert "0.180" not in md and "removed_fraction" not in _header(md, "demo_lm")


def _efficiency_runs(root: Path) -> Path:
    """demo_lm: dense and two methods at 0.5 with latency (one noisy), paired speedup, model and RSS memory."""
    mib = 1_000_000
    timing = {
        "dense": dict(latency_ms=2.0, latency_iqr_ms=0.02, speedup_latency=1.0, weight_bytes=8 * mib, rss=900 * mib),
        "magnitude": dict(latency_ms=2.2, latency_iqr_ms=0.04, speedup_latency=0.9, weight_bytes=6 * mib,
                          rss=800 * mib),
        # the fastest, and the smallest RSS, but its timing is noisy (IQR 25 % of the median; also flagged)
        "svd": dict(latency_ms=1.2, latency_iqr_ms=0.3, speedup_latency=1.6, weight_bytes=4 * mib, rss=700 * mib,
                    noisy=True),
    }
    for method, t in timing.items():
        extra = {"latency_ms": t["latency_ms"], "latency_iqr_ms": t["latency_iqr_ms"],
                 "speedup/latency": t["speedup_latency"], "weight_bytes": t["weight_bytes"],
                 "process_rss_peak_bytes": t["rss"], "peak_mem_bytes": t["rss"],
                 "protocol/peak_mem": "rss_high_water_mark", "dense/latency_ms": 2.0}
        if t.get("noisy"):
            extra["latency_noisy"] = True
        _write_run(root, "demo_lm", method, 0.0 if method == "dense" else 0.5, 0, 10.0, extra=extra)
    return root


def test_efficiency_columns_units_noise_and_rss(tmp_path):
    root = _efficiency_runs(tmp_path / "sweep")
    metrics = "main,latency_ms,speedup/latency,xdense/latency_ms,weight_bytes,peak_mem_bytes,process_rss_peak_bytes"
    out = write_report(root, metrics=metrics.split(","), reported_dir=make_reported(tmp_path / "rep"))
    md = (out / "table.md").read_text()
    assert _header(md, "demo_lm")[1:] == [
        "r=0.5 PPL demo", "r=0.5 latency (ms, median ± IQR)", "r=0.5 speedup (x dense)", "r=0.5 latency (x dense)",
        "r=0.5 weights (MB)", "r=0.5 peak memory (MB)", "r=0.5 process RSS peak (MB)"]
    # median ± IQR in ms; the noisy one is marked and never bold, so the best is the quiet magnitude
    assert _cell(md, "demo_lm", "svd", "r=0.5 latency (ms, median ± IQR)") == "1.20 ± 0.30 †"
    assert _cell(md, "demo_lm", "magnitude", "r=0.5 latency (ms, median ± IQR)") == "**2.20 ± 0.04**"
    assert _cell(md, "demo_lm", "svd", "r=0.5 speedup (x dense)") == "1.60 †"
    assert _cell(md, "demo_lm", "magnitude", "r=0.5 latency (x dense)") == "**1.10**"
    # dense is faster than every compressed method that is not noisy: italic, not bold
    assert _cell(md, "demo_lm", "dense", "r=0.5 latency (ms, median ± IQR)") == "2.00 ± 0.02"  # svd is faster
    # bytes in MB; weights are the model's and get marked
    assert _cell(md, "demo_lm", "svd", "r=0.5 weights (MB)") == "**4.00**"
    assert _cell(md, "demo_lm", "dense", "r=0.5 weights (MB)") == "8.00"
    # an RSS is labelled as such and never marked as best, neither under peak memory nor under its own name
    for col in ("r=0.5 peak memory (MB)", "r=0.5 process RSS peak (MB)"):
        cells = [_cell(md, "demo_lm", m, col) for m in ("dense", "magnitude", "svd")]
        assert cells == ["900.0 (RSS)", "800.0 (RSS)", "700.0 (RSS)"]
    assert "†: noisy timing" in md and "(RSS): the process's resident-set high-water mark" in md
    tex = (out / "table.tex").read_text()
    assert r"1.20 $\pm$ 0.30 $^\dagger$" in tex and r"\textbf{2.20 $\pm$ 0.04}" in tex
    assert "latency (ms, median $\\pm$ IQR)" in tex and "weights (MB)" in tex


def test_dense_italic_when_better_than_every_compressed_method(tmp_path):
    root = tmp_path / "sweep"
    for method, ms in (("dense", 1.0), ("magnitude", 1.5), ("svd", 1.2)):
        _write_run(root, "demo_lm", method, 0.0 if method == "dense" else 0.5, 0, 10.0,
                   extra={"latency_ms": ms, "latency_iqr_ms": 0.01})
    md = (write_report(root, metrics=["latency_ms"], reported_dir=make_reported(tmp_path / "rep")) / "table.md"
          ).read_text()
    assert _cell(md, "demo_lm", "dense", "r=0.5 latency (ms, median ± IQR)") == "*1.00 ± 0.01*"
    assert _cell(md, "demo_lm", "svd", "r=0.5 latency (ms, median ± IQR)") == "**1.20 ± 0.01**"


def test_results_csv_carries_code_version_params_and_flags_mixing(tmp_path):
    root = tmp_path / "sweep"
    _write_run(root, "demo_lm", "dense", 0.0, 0, 10.0, git={"sha": "a" * 40, "dirty": False})
    _write_run(root, "demo_lm", "svd", 0.5, 0, 11.0, git={"sha": "a" * 40, "dirty": False},
               extra={"protocol/measure_device": "cpu"})
    _write_run(root, "demo_lm", "svd", 0.5, 1, 11.2, git={"sha": "b" * 40, "dirty": True},
               extra={"protocol/measure_device": "cuda:0"})
    out = write_report(root, reported_dir=make_reported(tmp_path / "rep"))
    df = pd.read_csv(out / "results.csv")
    svd = df[df["method"] == "svd"].sort_values("seed")
    assert list(svd["git_sha"]) == ["a" * 40, "b" * 40] and list(svd["git_dirty"]) == [False, True]
    # scope "all" differs from conf/method/svd.yaml's "auto"; rank_multiple and name equal it, ratio is a column
    assert json.loads(svd["method_params"].iloc[0]) == {"scope": "all"}
    assert "protocol/measure_device" in df.columns
    md = (out / "table.md").read_text()
    assert "[mixed: code, protocol/measure_device]" in _cell(md, "demo_lm", "svd", "r=0.5 PPL demo")
    assert "MIXED code: aaaaaaaaaa, bbbbbbbbbb+dirty; protocol/measure_device: cpu, cuda:0" in md
    assert "mixed" not in _cell(md, "demo_lm", "dense", "r=0.5 PPL demo")


def test_method_params_against_the_method_yaml():
    assert report.method_params({"name": "svd", "ratio": 0.3, "scope": "auto", "rank_multiple": 64}) == {
        "rank_multiple": 64}
    assert report.method_params({"name": "basis_sharing", "ratio": 0.3, "scope": "auto", "group_size": 2,
                                 "rank_multiple": 1, "update": False,
                                 "shared": {"default": ["q", "k", "v", "gate", "up"], "mistral": ["q"]}}) == {
        "shared.mistral": ["q"]}
    assert report.method_params({"name": "no_such_method", "ratio": 0.3, "k": 1}) == {"k": 1}


def test_several_sweeps_are_compared_in_one_report(tmp_path, capsys):
    for sweep, value in (("A", 11.0), ("B", 13.0)):
        _write_run(tmp_path / sweep, "demo_lm", "dense", 0.0, 0, 10.0)
        _write_run(tmp_path / sweep, "demo_lm", "svd", 0.5, 0, value)
    _write_run(tmp_path / "B", "demo_lm", "magnitude", 0.5, 0, 12.0)
    reported = make_reported(tmp_path / "rep")
    assert report.main([str(tmp_path / "A"), str(tmp_path / "B"), "--reported", str(reported)]) == 2
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "A_vs_B"
    assert report.main([str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(out), "--reported",
                        str(reported), "--x", "compression"]) == 0
    md = (out / "table.md").read_text()
    assert capsys.readouterr().out == md
    assert _cell(md, "demo_lm", "svd [sweep=A]", "r=0.5 PPL demo") == "**11.00**"
    assert _cell(md, "demo_lm", "svd [sweep=B]", "r=0.5 PPL demo") == "13.00"
    assert _cell(md, "demo_lm", "magnitude", "r=0.5 PPL demo") == "12.00"  # in one sweep only: no suffix
    assert _cell(md, "demo_lm", "dense [sweep=B]", "r=0.5 PPL demo").startswith("*10.00* (rep 10.00")
    assert "sweeps: A (2 runs), B (3 runs)" in md
    assert set(pd.read_csv(out / "results.csv")["sweep"]) == {"A", "B"}
    assert (out / "figures" / "demo_lm.pdf").is_file() and not (tmp_path / "A" / "report").exists()
