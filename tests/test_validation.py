"""Damage and contention after a run started: a damaged record is redone, a damaged cache or stage checkpoint is
rebuilt, a full disk is a recorded reason, files honour the umask, a busy run exits with its own code."""
import errno
import json
import logging
import os
import sys

import pytest
import torch

from core.io import file_lock, lock_holder, read_json, write_json_atomic
from runners.record import METRICS_JSON, RUN_JSON, record_problem
from runners.run import LOCK, STAGE_DIR, execute, plan


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "metrics deleted": lambda d: (d / METRICS_JSON).unlink(),
    "metrics truncated": lambda d: truncate(d / METRICS_JSON),
    "metrics a list": lambda d: (d / METRICS_JSON).write_text("[1, 2]"),
    "metrics nested": lambda d: write_json_atomic(d / METRICS_JSON, {**read_json(d / METRICS_JSON), "x": {"y": 1}}),
    "metrics without the main metric": lambda d: write_json_atomic(
        d / METRICS_JSON, {k: v for k, v in read_json(d / METRICS_JSON).items() if k != "mse/toy"}),
    "run.json truncated": lambda d: truncate(d / RUN_JSON),
    "run.json of another run": lambda d: write_json_atomic(d / RUN_JSON, {**read_json(d / RUN_JSON), "run_id": "x"}),
}


@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_a_damaged_done_run_is_redone_and_said_so(toy_cfg, caplog, damage):
    cfg = toy_cfg("method=magnitude")
    p = plan(cfg)
    assert execute(cfg, []) == "done"
    reference = read_json(p.run_dir / METRICS_JSON)
    damage(p.run_dir)
    assert record_problem(p.run_dir) is not None
    with caplog.at_level(logging.WARNING, logger="compbench"):
        assert execute(cfg, []) == "done"
    assert f"redo {p.run_id}: its record is damaged" in caplog.text
    assert record_problem(p.run_dir) is None
    assert read_json(p.run_dir / METRICS_JSON)["mse/toy"] == reference["mse/toy"]
    assert execute(cfg, []) == "skipped"


def test_a_truncated_stage_checkpoint_is_recomputed(toy_cfg, caplog, monkeypatch):
    cfg = toy_cfg("method=svd", "method.ratio=0.5")
    p = plan(cfg)

    class Interrupted(BaseException):
        pass

    def interrupt(*args, **kwargs):
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr("runners.run._measure", interrupt)
        with pytest.raises(Interrupted):
            execute(cfg, [])
    truncate(p.run_dir / STAGE_DIR / "compressed.safetensors")
    with caplog.at_level(logging.WARNING, logger="compbench"):
        assert execute(cfg, []) == "done"
    assert "stage checkpoint of" in caplog.text and "compressing again" in caplog.text
    rec = read_json(p.run_dir / RUN_JSON)
    assert rec["attempt"] == 2 and "resumed_from" not in rec


def test_a_damaged_checkpointed_value_is_recomputed(tmp_path):
    from methods import CompressContext

    ctx = CompressContext(task=None, device=torch.device("cpu"), seed=0, stage_dir=tmp_path)
    assert ctx.checkpointed("stats", lambda: torch.ones(1000)).sum() == 1000
    truncate(tmp_path / "stats.pt")
    assert ctx.checkpointed("stats", lambda: torch.full((3,), 2.0)).tolist() == [2.0, 2.0, 2.0]


def test_a_damaged_cached_dense_model_is_rebuilt(task_cfg, tmp_path, caplog):
    cfg = task_cfg("demo_resnet", f"cache_dir={tmp_path / 'cache'}", "task.data.train_per_class=3",
                   "task.data.test_per_class=2")
    task = plan(cfg).task
    first = task.build_model(0)
    path = task.cache_path(0)
    truncate(path)
    with caplog.at_level(logging.WARNING):
        again = task.build_model(0)
    assert "is damaged" in caplog.text and "training it again" in caplog.text
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)  # the same seeded training
    assert path.stat().st_size > 0 and task.build_model(0) is not None


def test_a_damaged_training_checkpoint_restarts_training(task_cfg, tmp_path, caplog):
    cfg = task_cfg("demo_resnet", f"cache_dir={tmp_path / 'cache'}", "task.data.train_per_class=3",
                   "task.data.test_per_class=2")
    task = plan(cfg).task
    ckpt = tmp_path / "train.pt"
    ckpt.write_bytes(b"\x80\x02 not a checkpoint")
    with caplog.at_level(logging.WARNING):
        result = task.train(task.fresh_model(0), 0, ckpt_path=ckpt)
    assert "training from epoch 0" in caplog.text and "acc/top1_final" in result


def test_no_space_mid_run_is_a_recorded_reason(toy_cfg, monkeypatch):
    cfg = toy_cfg("method=svd")
    p = plan(cfg)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("runners.run.save_compressed", full)
    assert execute(cfg, []) == "failed"
    rec = read_json(p.run_dir / RUN_JSON)
    assert rec["failure_reason"] == "no space" and "No space left" in rec["error"]


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(toy_cfg, mask, mode):
    old = os.umask(mask)
    try:
        cfg = toy_cfg("method=magnitude", "save_model=true")
        p = plan(cfg)
        assert execute(cfg, []) == "done"
    finally:
        os.umask(old)
    for name in (RUN_JSON, METRICS_JSON, "model.safetensors"):
        assert (p.run_dir / name).stat().st_mode & 0o777 == mode, name
    assert p.dense_path.stat().st_mode & 0o777 == mode


def test_the_lock_names_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    with file_lock(path) as acquired:
        assert acquired and lock_holder(path).startswith(f"pid {os.getpid()} on ")
        with file_lock(path, blocking=False) as second:
            assert second is False


def test_a_busy_run_exits_3_and_names_the_holder(compose_cfg, tmp_path):
    import subprocess

    from tests.conftest import ROOT

    args = ["task=demo_resnet", "method=svd", f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
            "logger=none"]
    p = plan(compose_cfg(*args))
    with file_lock(p.run_dir / LOCK):  # this process runs the point
        proc = subprocess.run([sys.executable, "-m", "runners.run", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"skip {p.run_id}: busy, pid {os.getpid()} on " in proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists() and not (p.run_dir / RUN_JSON).exists()


def test_text_length_is_counted_with_the_model_tokenizer(task_cfg, shared_cache, tmp_path):
    """With the embedded model cached, its tokenizer counts the tokens: a text of 200 bytes is fewer than 128
    tokens by the tokenizer, though the byte bound would let it pass."""
    from core.errors import ConfigError
    from tasks.lm.corpora import encode_stream

    warm = plan(task_cfg("demo_lm"))
    warm.task.build_model(0)  # pretrains (or finds) the embedded model in the shared cache
    from core.io import umask

    for folder in (shared_cache / "hf_lm").glob("embedded-*/"):  # not mkdtemp's 0700: readable by the group
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask()
    text = tmp_path / "t.txt"
    text.write_text("the " * 50)
    n = len(encode_stream(warm.task.tokenizer, text.read_text(), True)[0])
    assert n < 128 <= len(text.read_bytes())
    with pytest.raises(ConfigError, match=rf"text_files.t: {n} tokens, fewer than one window of task.seqlen=128"):
        plan(task_cfg("demo_lm", f"+task.eval.text_files.t={text}"))
    assert plan(task_cfg("demo_lm", f"+task.eval.text_files.t={text}", f"task.seqlen={n}")).structure_checked


def test_record_problem_accepts_a_fresh_record(toy_cfg):
    cfg = toy_cfg("method=dense")
    assert execute(cfg, []) == "done"
    p = plan(cfg)
    assert record_problem(p.run_dir) is None
    assert json.loads((p.run_dir / RUN_JSON).read_text())["status"] == "done"
