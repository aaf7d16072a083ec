"""Bad input fails before any model is built: one line on stderr, exit code 2, no run folder."""
import subprocess
import sys
from pathlib import Path

import pytest

from runners import run as run_module

ROOT = Path(__file__).resolve().parents[1]


def call_main(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["runners.run", *argv])
    built = []
    monkeypatch.setattr("tasks.base.Task.build_model", lambda self, seed: built.append(1))
    with pytest.raises(SystemExit) as exc:
        run_module.main()
    err = capsys.readouterr().err.strip()
    assert not built
    return exc.value.code, err


CASES = [
    (["task=nope"], r"task/nope.*available: .*demo_lm"),
    (["method=nope"], r"method/nope.*available: .*svd"),
    (["method=svd", "method.ratio=1.5"], r"method.ratio=1.5 is outside \(0, 1\)"),
    (["method=svd", "method.ratio=0"], r"method.ratio=0.0 is outside \(0, 1\)"),
    (["method=magnitude", "method.ratio=-0.1"], r"method.ratio=-0.1 is outside"),
    (["seed=-1"], r"seed=-1 must be >= 0"),
    (["method.foo=1"], r"Could not override 'method.foo'"),
    (["device=tpu"], r"device='tpu'"),
    (["-m", "method=svd", "method.ratio=0.5,1.5"], r"method.ratio=1.5 is outside"),
    (["task=demo_resnet", "task.checkpoint=/nonexistent/model.safetensors"], r"/nonexistent/model.safetensors"),
    (["task=demo_lm", "+task.eval.text_files.wiki=/nonexistent/wiki.txt"], r"/nonexistent/wiki.txt"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_clear_line(monkeypatch, capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    code, err = call_main(monkeypatch, capsys, *argv, f"out_dir={out}", "logger=none")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists()


def test_cli_exit_code_in_a_fresh_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "runners.run", "method=svd", "method.ratio=2", f"out_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: method.ratio=2.0 is outside (0, 1): it is the fraction of parameters removed"
    assert not out.exists()


def test_value_overrides_are_checked_against_the_swept_tasks():
    """`task.train.epochs` exists in the swept image tasks, not in the default task: the sweep is valid."""
    from core.errors import ConfigError
    from runners.preflight import preflight

    conf = ROOT / "conf"
    ok = ["-m", "task=demo_resnet,demo_vit", "task.train.epochs=1", "method=dense,magnitude", "logger=none"]
    assert preflight(ok, conf) == 4
    with pytest.raises(ConfigError, match="task.train.nope"):
        preflight(["-m", "task=demo_resnet,demo_vit", "task.train.nope=1", "method=dense", "logger=none"], conf)
