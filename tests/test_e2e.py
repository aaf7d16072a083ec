"""End to end through the command line, per embedded task, and a multirun that ends by printing its table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("task,method", [("demo_lm", "svd"), ("demo_resnet", "magnitude"), ("demo_vit", "svd")])
def test_one_run_per_embedded_task(tmp_path, shared_cache, task, method):
    out = tmp_path / "out"
    cli("-m", "runners.run", f"task={task}", f"method={method}", "method.ratio=0.5", "logger=none", "progress=false",
        f"out_dir={out}", f"cache_dir={shared_cache}", "measure.min_run_time_s=0.05", *TINY[task])
    (run_dir,) = (out / "runs").iterdir()
    rec = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert rec["status"] == "done"
    main = rec["summary"]["main_metric"]
    assert metrics[main] > 0 and metrics[f"dense/{main}"] > 0
    assert abs(metrics["scope/removed_fraction"] - 0.5) < 0.06
    assert metrics["latency_ms"] > 0 and metrics["flops"] > 0 and metrics["peak_mem_bytes"] > 0
    assert ("decode_ms_per_token" in metrics) == (task == "demo_lm")  # batch-1 decode for generative tasks only


@pytest.mark.slow
def test_multirun_prints_the_table_and_writes_the_report(tmp_path, shared_cache):
    out = tmp_path / "sweep"
    stdout = cli("-m", "runners.run", "-m", "task=demo_resnet", "method=dense,magnitude,svd", "method.ratio=0.2,0.5",
                 "logger=none", "progress=false", f"out_dir={out}", f"cache_dir={shared_cache}",
                 "measure.min_run_time_s=0.02", *TINY["demo_resnet"])
    assert len(list((out / "runs").iterdir())) == 5  # dense once, two methods x two ratios
    for name in ("results.csv", "table.md", "table.tex", "pareto.png"):
        assert (out / "report" / name).stat().st_size > 0
    table = (out / "report" / "table.md").read_text()
    assert "magnitude" in table and "svd" in table and table.strip() in stdout
    # a second launch of the same command skips everything and leaves the records untouched
    before = {p: p.read_bytes() for p in (out / "runs").rglob("*.json")}
    cli("-m", "runners.run", "-m", "task=demo_resnet", "method=dense,magnitude,svd", "method.ratio=0.2,0.5",
        "logger=none", "progress=false", f"out_dir={out}", f"cache_dir={shared_cache}",
        "measure.min_run_time_s=0.02", *TINY["demo_resnet"])
    assert before == {p: p.read_bytes() for p in (out / "runs").rglob("*.json")}
