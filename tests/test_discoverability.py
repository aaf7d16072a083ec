"""Discoverability: runners.list, runners.run --plan and --help, and progress that suits a log file."""
import io
import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tqdm.auto import tqdm

import methods
from core.progress import LineProgress, progress_bar
from runners import list as listing
from runners import run as runner
from runners.run import execute
from tests.conftest import ROOT


def test_list_names_every_method_with_kind_paper_and_defaults(capsys):
    out = listing.collect(["methods", "tasks", "experiments"])
    by_name = {e["name"]: e for e in out["methods"]}
    assert sorted(by_name) == methods.METHODS.names()
    assert by_name["svd_llm"]["kind"] == "post-training, calibration" and by_name["svd_llm"]["paper"] == "2403.07378"
    assert by_name["svd"]["kind"] == "post-training" and by_name["svd"]["fields"]["rank_multiple"] == 1
    assert by_name["stable_rps"]["kind"] == "train-time" and by_name["stable_rps"]["fields"]["mapping"] == "randomfold"
    assert all(e["description"] for e in out["methods"])
    tasks = {e["name"]: e for e in out["tasks"]}
    assert tasks["demo_lm"]["kind"] == "hf_lm" and tasks["demo_lm"]["fields"]["eval.datasets"] == ["demo"]
    experiments = {e["name"]: e for e in out["experiments"]}
    assert experiments["demo"]["kind"] == "13 points" and "+demo_point" in experiments["demo"]["fields"]
    assert listing.main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "svd_llm" in text and "[arXiv 2403.07378]" in text and "rank_multiple=1" in text


def _plan(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["runners.run", *args, "--plan"])
    code = 0
    try:
        runner.main()
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_lists_points_with_run_id_and_status_and_builds_nothing(monkeypatch, capsys, tmp_path, toy_cfg):
    out_dir = tmp_path / "out"
    common = [f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]", "task=toy", "logger=none",
              f"out_dir={out_dir}", f"cache_dir={tmp_path / 'cache'}"]
    code, out, _ = _plan(monkeypatch, capsys, "-m", *common, "method=dense,svd", "method.ratio=0.2,0.5")
    assert code == 0
    rows = [line.split()[:2] for line in out.splitlines()[:-1]]
    assert [status for status, _ in rows] == ["new", "duplicate", "new", "new"]
    assert rows[0][1] == rows[1][1] and rows[0][1].startswith("toy-dense-")
    assert out.splitlines()[-1] == "4 points: 1 duplicate, 3 new"
    assert not out_dir.exists()
    assert execute(toy_cfg("method=svd", "method.ratio=0.5"), []) == "done"
    _, out, _ = _plan(monkeypatch, capsys, "-m", *common, "method=dense,svd", "method.ratio=0.2,0.5")
    assert [line.split()[0] for line in out.splitlines()[:-1]] == ["new", "duplicate", "new", "done"]
    code, out, err = _plan(monkeypatch, capsys, *common, "method=svd", "method.ratio=1.5")
    assert code == 2 and out == "" and err.startswith("error:") and err.count("\n") == 1


def test_help_lists_the_choosable_groups_not_the_schemas():
    """--help prints ``hydra.help.template`` (conf/run.yaml) with $CONFIG substituted."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            template = compose("run", return_hydra_config=True).hydra.help.template
    finally:
        GlobalHydra.instance().clear()
    assert "schema/" not in template and "$APP_CONFIG_GROUPS" not in template and "--plan" in template
    assert "\nmethod: aafm," in template and "\ntask: " in template and "\nexperiment: demo" in template


def test_progress_writes_a_line_every_n_steps_when_not_a_terminal(monkeypatch):
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    bar = progress_bar(range(95), "stage")
    assert isinstance(bar, LineProgress) and len(bar) == 95
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    lines = err.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("stage: 10/95 (11 %)") and "loss=9.0" in lines[0]
    assert lines[-1].startswith("stage: 95/95 (100 %)") and "\r" not in err.getvalue()
    assert list(progress_bar(iter(range(250)), "gen")) == list(range(250))  # unknown length: every 100
    assert [line.split()[1] for line in err.getvalue().splitlines()[10:]] == ["100", "200", "250"]
    before = err.getvalue()
    assert list(progress_bar(range(5), "off", enabled=False)) == list(range(5)) and err.getvalue() == before


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(range(3), "stage")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
