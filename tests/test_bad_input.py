"""Bad input fails before any model is built (no weights loaded, no evaluation): one line on stderr, exit code 2,
nothing created. Checks that need the model's structure run on a skeleton without weights."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def files(tmp):
    """Bad input files, written into ``tmp``: {placeholder: path}."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("a few words only")
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 2000)
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(3, 3)}, tmp / "wrong.safetensors")  # keys and shapes of no ResNet-20
    return {name: str(tmp / name) for name in ("empty.txt", "short.txt", "latin1.txt", "wrong.safetensors")}


CASES = [
    # names and values
    (["task=nope"], r"task/nope.*available: .*demo_lm"),
    (["method=nope"], r"method/nope.*available: .*svd"),
    (["method=svd", "method.ratio=1.5"], r"method.ratio=1.5 is outside \(0, 1\)"),
    (["method=svd", "method.ratio=0"], r"method.ratio=0.0 is outside \(0, 1\)"),
    (["method=magnitude", "method.ratio=-0.1"], r"method.ratio=-0.1 is outside"),
    (["seed=-1"], r"seed=-1 must be >= 0"),
    (["seed=99999999999999999999"], r"seed=99999999999999999999 must be <= 4294967295"),
    (["device=tpu"], r"device='tpu'"),
    (["-m", "method=svd", "method.ratio=0.5,1.5"], r"method.ratio=1.5 is outside"),
    # unknown keys, with or without +; a dict field takes new keys, which are validated
    (["method.foo=1"], r"Could not override 'method.foo'"),
    (["method=svd", "+method.rati=0.9"], r"unknown config key method.rati \(did you mean method.ratio\?\)"),
    (["+foo=1"], r"unknown config key foo"),
    (["task=demo_resnet", "+task.foo=1"], r"unknown config key task.foo"),
    (["task=demo_resnet", "+task.train.epoch=1"], r"unknown config key task.train.epoch \(did you mean"),
    (["task=demo_lm", "+task.eval.text_files.demo={short.txt}"], r"demo named both in datasets and in text_files"),
    # names that become paths
    (["task=demo_resnet", "task.name=../../../x"], r"task.name='../../../x' becomes a file name"),
    (["task=demo_resnet", "task.name=/elsewhere/x"], r"task.name='/elsewhere/x' becomes a file name"),
    (["task=demo_resnet", "task.name=a..b"], r"task.name='a..b'"),
    (["experiment_name=../up"], r"experiment_name='../up' becomes a file name"),
    # missing local paths
    (["task=demo_resnet", "task.checkpoint=/nonexistent/model.safetensors"], r"/nonexistent/model.safetensors"),
    (["task=demo_lm", "+task.eval.text_files.wiki=/nonexistent/wiki.txt"], r"/nonexistent/wiki.txt"),
    # the model's structure, on a skeleton: scope, method vs architecture, checkpoint, positions, text in tokens
    (["task=demo_resnet", "method=svd", "method.scope=nope"], r"method.scope='nope' is unknown; valid: auto"),
    (["task=demo_resnet", "method=dense", "method.scope=nope"], r"method.scope='nope' is unknown"),
    (["task=demo_resnet", "method=fips"], r"fips.*ResNet"),
    (["task=demo_resnet", "method=basis_sharing"], r"basis_sharing needs a transformer adapter"),
    (["task=demo_vit", "method=svd", "method.scope=mlp", "task.model_kwargs.depth=0"], r"scope 'mlp' holds no"),
    (["task=demo_vit", "+task.model_kwargs.nope=1"], r"bad task.model_kwargs"),
    (["task=demo_resnet", "task.checkpoint={wrong.safetensors}"], r"does not fit ResNet: missing: bn1.weight.*; shape: conv1.weight \[3, 3\] \(model \[16, 1, 3, 3\]\)"),
    (["task=demo_lm", "task.seqlen=4096"], r"task.seqlen=4096 exceeds the model's 2048 positions"),
    (["task=demo_lm", "task.calib.seqlen=3000"], r"task.calib.seqlen=3000 exceeds"),
    (["task=demo_lm", "+task.eval.text_files.e={empty.txt}"], r"task.eval.text_files.e: the text is empty"),
    (["task=demo_lm", "+task.eval.text_files.s={short.txt}"], r"task.eval.text_files.s: at most 17 tokens, fewer "
                                                              r"than one window of task.seqlen=128"),
    (["task=demo_lm", "+task.eval.text_files.l={latin1.txt}"], r"cannot be read as UTF-8"),
    (["task=demo_lm", "task.calib.dataset=null", "task.calib.text_files=[{short.txt}]"],
     r"task.calib.text_files: .*tokens, fewer than one window of task.calib.seqlen"),
    # a sweep with one bad point is refused whole: no point starts
    (["-m", "task=demo_resnet", "method=svd,fips"], r"fips.*ResNet"),
    (["-m", "task=demo_resnet,demo_lm", "method=svd", "method.scope=prunable,mlp"], r"scope 'mlp' holds no"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_clear_line(monkeypatch, capsys, tmp_path, argv, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    paths = files(tmp_path / "inputs")
    argv = [re.sub(r"\{([\w.]+)\}", lambda m: paths[m.group(1)], a) for a in argv]
    code, err = call_main(monkeypatch, capsys, *argv, f"out_dir={out}", f"cache_dir={cache}", "logger=none")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not out.exists() and not cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # nothing written anywhere else either


# -- out_dir -------------------------------------------------------------------------------------------------------
def full_disk(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))


def read_only(monkeypatch):
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


OUT_DIRS = [
    ("a file", lambda tmp, mp: (tmp / "f").write_text("x") and tmp / "f", r"out_dir=.*/f is a file"),
    ("under a file", lambda tmp, mp: (tmp / "f").write_text("x") and tmp / "f" / "sub", r"lies under the file"),
    ("read-only", lambda tmp, mp: read_only(mp) or tmp / "ro" / "out", r"is not writable \(Permission denied\)"),
    ("full disk", lambda tmp, mp: full_disk(mp) or tmp / "out", r"no space left on its file system"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in OUT_DIRS], ids=[c[0] for c in OUT_DIRS])
def test_bad_out_dir_is_one_line_before_compute(monkeypatch, capsys, tmp_path, make, message):
    out = make(tmp_path, monkeypatch)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, err = call_main(monkeypatch, capsys, "task=demo_resnet", "method=svd", f"out_dir={out}", "logger=none")
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no lock, no probe, no run folder


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_out_dir_for_real(monkeypatch, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    code, err = call_main(monkeypatch, capsys, "task=demo_resnet", "method=svd", f"out_dir={ro / 'out'}",
                          "logger=none")
    assert code == 2 and "is not writable" in err and not (ro / "out").exists()


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


def test_new_keys_of_a_dict_field_are_accepted(compose_cfg, tmp_path):
    """``+task.eval.text_files.<name>`` and ``+task.model_kwargs.<kw>`` add keys to dict fields: not unknown."""
    from runners.plan import plan

    text = tmp_path / "t.txt"
    text.write_text("word " * 5000)
    p = plan(compose_cfg("task=demo_lm", f"+task.eval.text_files.mine={text}", "task.seqlen=64",
                         f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "logger=none"))
    assert p.run.task.eval.text_files == {"mine": str(text)}
    p = plan(compose_cfg("task=demo_vit", "+task.model_kwargs.qkv_bias=false", f"out_dir={tmp_path / 'out'}",
                         "logger=none"))
    assert p.run.task.model_kwargs["qkv_bias"] is False
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_matching_checkpoint_passes_the_header_check(compose_cfg, tmp_path):
    """The header check compares names and shapes only, and accepts the tied names ``save_model`` drops."""
    from safetensors.torch import save_model

    from runners.plan import plan
    from tasks.models import resnet

    path = tmp_path / "r.safetensors"
    save_model(resnet(20, 10, 1, 16), str(path))
    p = plan(compose_cfg("task=demo_resnet", f"task.checkpoint={path}", f"out_dir={tmp_path / 'out'}",
                         "logger=none"))
    assert p.structure_checked
