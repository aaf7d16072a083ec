"""Slurm: a real sweep through the submitit launcher with one job preempted (USR2) and requeued, plus the offline
parts of slurm/ (prefetch, sweep points).

The real-Slurm test needs a reachable cluster: ``SLURM_CONF`` in the environment, or the single-node cluster of
``bash slurm/local_cluster.sh start`` (``.slurm/``). Without one it is skipped, unless ``COMPBENCH_REQUIRE_SLURM=1``
(set by CI, which starts that cluster first), where it fails.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.io import read_json
from runners.record import METRICS_JSON, RUN_JSON
from runners.report import DEFAULT_METRICS
from runners.run import STAGE_DIR, execute, plan
from slurm import points as points_cli
from slurm import prefetch
from tests.conftest import ROOT, TINY
from tests.test_resume import deterministic, wait_for

SLURM_BASE = Path(os.environ.get("COMPBENCH_SLURM_BASE", ROOT / ".slurm"))


def slurm_env() -> tuple[dict[str, str] | None, str]:
    """(environment for Slurm clients, "") when a cluster answers, else (None, why not)."""
    env = dict(os.environ)
    if "SLURM_CONF" not in env and (SLURM_BASE / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(SLURM_BASE / "slurm.conf")
    if (SLURM_BASE / "bin").is_dir():  # the sacct stand-in of the local cluster
        env["PATH"] = f"{SLURM_BASE / 'bin'}{os.pathsep}{env['PATH']}"
    if shutil.which("sbatch", path=env["PATH"]) is None:
        return None, "Slurm is not installed (no sbatch)"
    if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").is_file():
        return None, "no Slurm configuration (SLURM_CONF unset, no .slurm/slurm.conf, no /etc/slurm/slurm.conf)"
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None, "sinfo timed out"
    if state.returncode != 0 or not {"idle", "mixed", "allocated"} & set(state.stdout.split()):
        detail = " ".join((state.stderr or state.stdout).split())[:200]
        return None, f"no Slurm node is up ({detail})"
    return env, ""


@pytest.fixture(scope="module")
def slurm():
    env, why = slurm_env()
    if env is None:
        message = f"{why}; start a local cluster with `bash slurm/local_cluster.sh start`"
        if os.environ.get("COMPBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return env


def test_sweep_through_slurm_survives_a_preemption(slurm, task_cfg, tmp_path, shared_cache):
    """4 points (demo_resnet: magnitude, svd x ratios 0.2, 0.5) as one job array; the first job past its compress
    stage gets USR2 (submitit reads an early USR2 as a preemption and requeues the job); the sweep ends with every
    cell, and the requeued run has the metrics of an uninterrupted run."""
    plan(task_cfg("demo_resnet")).task.build_model(0)  # the dense model, trained here once (not by two jobs)
    out = tmp_path / "sweep"
    name = f"compbench-test-{os.getpid()}"
    argv = [sys.executable, "-m", "runners.run", "-m", "task=demo_resnet", "method=magnitude,svd",
            "method.ratio=0.2,0.5", *TINY["demo_resnet"], "logger=wandb", "progress=false", f"out_dir={out}",
            f"cache_dir={shared_cache}", "measure.min_run_time_s=1", "measure.warmup=1", "hydra/launcher=slurm",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.timeout_min=30", f"hydra.launcher.name={name}"]
    env = {**slurm, "WANDB_MODE": "offline"}
    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            def second_wave_job_past_compress():
                for run_dir in (out / "runs").glob("*/"):
                    rec = read_json(run_dir / RUN_JSON) or {}
                    if rec.get("status") == "running" and (run_dir / STAGE_DIR / "compressed.json").is_file():
                        pending = subprocess.run(["squeue", "-h", "-r", "-t", "PENDING", "-j",
                                                  rec["slurm"]["array_job_id"]], env=slurm, capture_output=True,
                                                 text=True, timeout=30).stdout.strip()
                        if not pending:
                            return run_dir, rec["slurm"]
                return None

            # Slurm 22.05 answers `scancel --signal` to an array task with "Job can not be altered now" while other
            # tasks of its array are pending, and scancel retries, signalling the requeued job again: signal a job
            # of the second wave (4 jobs, 2 CPUs), as submitit's own Job._interrupt would
            preempted, ids = wait_for(second_wave_job_past_compress, 400, "a second-wave job past its compress "
                                      "stage", proc, tmp_path / "launcher.log")
            job = f"{ids['array_job_id']}_{ids['array_task_id']}"
            subprocess.run(["scancel", "--signal", "USR2", job], env=slurm, check=True, timeout=30)
            proc.wait(timeout=480)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            subprocess.run(["scancel", "--name", name], env=slurm, timeout=30)
    output = (tmp_path / "launcher.log").read_text()
    assert proc.returncode == 0, output[-4000:]

    records = {d.name: read_json(d / RUN_JSON) for d in (out / "runs").glob("*/")}
    assert len(records) == 4 and all(r["status"] == "done" for r in records.values())
    requeued = records[preempted.name]
    assert requeued["attempt"] == 2 and requeued["resumed_from"] == "compressed"
    assert requeued["slurm"]["restart_count"] == "1" and requeued["slurm"]["job_id"] == ids["job_id"]
    assert all(r["attempt"] == 1 for n, r in records.items() if n != preempted.name)
    assert len({r["slurm"]["array_job_id"] for r in records.values()}) == 1  # one job array
    # one W&B run id, continued by the requeued job (two offline fragments of the same run)
    assert len(list((preempted / "wandb").glob(f"offline-run-*-{preempted.name}"))) == 2

    table = pd.read_csv(out / "report" / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"done"}
    rows = [line for line in (out / "report" / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and "runs: 4 done" in (out / "report" / "table.md").read_text()  # header + 2 methods
    cells = [cell.strip() for row in rows[1:] for cell in row.strip("|").split("|")[1:]]
    # 2 ratios x report.DEFAULT_METRICS (main, removed fraction, compression_x) per method row; every cell a number
    assert len(cells) == 2 * 2 * len(DEFAULT_METRICS) and all(float(cell.strip("*")) >= 0 for cell in cells)

    summary = requeued["summary"]
    reference = task_cfg(summary["task"], f"method={summary['method']}", f"method.ratio={summary['ratio']}",
                         "measure.min_run_time_s=1", "measure.warmup=1")  # the sweep's measurement protocol
    assert plan(reference).run_id == preempted.name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the 1-CPU job
    try:
        assert execute(reference, []) == "done"
    finally:
        torch.set_num_threads(threads)
    expected = deterministic(read_json(plan(reference).run_dir / METRICS_JSON))
    assert deterministic(read_json(preempted / METRICS_JSON)) == expected


# -- offline parts ---------------------------------------------------------------------------------------------------
def test_launcher_config_takes_cluster_settings_from_the_environment(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    monkeypatch.setenv("COMPBENCH_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("COMPBENCH_SLURM_ACCOUNT", "proj42")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("run", overrides=["hydra/launcher=slurm", "experiment=demo"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu-long" and launcher.account == "proj42" and launcher.qos is None
    assert launcher.max_num_timeout > 0  # requeue after a time limit: safe with stage checkpoints
    assert "HF_HUB_OFFLINE=1" in OmegaConf.to_container(launcher, resolve=True)["setup"][0]
    assert "${now:" not in OmegaConf.to_yaml(cfg.hydra.sweep) and cfg.hydra.sweep.subdir == "."


def test_points_lists_the_sweep_as_the_launcher_expands_it(capsys):
    assert points_cli.main(["--count", "experiment=demo"]) == 0
    assert capsys.readouterr().out.strip() == "13"  # conf/experiment/demo.yaml: 13 points
    assert points_cli.main(["--index", "1", "task=demo_lm", "method=magnitude,svd", "logger=none"]) == 0
    assert capsys.readouterr().out.split() == ["task=demo_lm", "method=svd", "logger=none"]
    assert points_cli.main(["--index", "2", "task=demo_lm", "method=magnitude,svd"]) == 2
    assert points_cli.main(["task=demo_lm", "method=svd", "method.ratio=1.5"]) == 2
    assert "method.ratio=1.5" in capsys.readouterr().err


@pytest.fixture
def downloads(monkeypatch):
    """Every download function prefetch can call, replaced by a recorder; yields the list of calls."""
    import huggingface_hub
    import lm_eval.tasks
    import timm
    import torchvision

    from tasks.lm.corpora import CORPORA, Corpus

    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, revision=None: ["config.json", "model.safetensors", "pytorch_model.bin"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, ignore_patterns=(): calls.append(
                            ("snapshot_download", repo, revision, tuple(ignore_patterns))))
    monkeypatch.setitem(CORPORA, "fakewiki", Corpus(
        name="fakewiki", description="a hub corpus", eval_split="test", calib_split="train",
        load=lambda split: calls.append(("corpus", "fakewiki", split)) or ["text"]))
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict",
                        lambda names, manager: calls.append(("lm_eval", tuple(names))) or {})
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: kwargs)
    monkeypatch.setattr(timm, "create_model",
                        lambda name, pretrained=False, **kw: calls.append(("timm", name, pretrained)))

    class FakeCifar:
        def __init__(self, root, train, download):
            calls.append(("cifar10", root, train, download))
            self.data = torch.zeros(2, 32, 32, 3, dtype=torch.uint8).numpy()
            self.targets = [0, 1]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    return calls


def test_prefetch_fetches_every_hub_model_and_dataset_once(downloads, tmp_path):
    lm = ["task=demo_lm", "task.model=org/tiny-llama", "task.revision=abc123", "task.eval.datasets=[demo,fakewiki]",
          "task.calib.dataset=fakewiki", "task.zeroshot.tasks=[piqa,arc_easy]", "method=dense,svd",
          "method.ratio=0.2,0.5"]
    items = prefetch.plan_fetches(lm)
    assert [str(i) for i in items] == [
        "hub_model org/tiny-llama (abc123)", "corpus demo (test)", "corpus fakewiki (test)",
        "corpus fakewiki (train)", "lm_eval_tasks piqa,arc_easy (lm-eval's tasks)"]  # 4 points, each item once
    assert downloads == []  # planning downloads nothing
    assert prefetch.main(lm) == 0
    assert downloads[0][:3] == ("snapshot_download", "org/tiny-llama", "abc123")
    assert "*.bin" in downloads[0][3] and "*.safetensors" not in downloads[0][3]  # one weight format
    assert downloads[1:] == [("corpus", "fakewiki", "test"), ("corpus", "fakewiki", "train"),
                             ("lm_eval", ("piqa", "arc_easy"))]

    downloads.clear()
    assert prefetch.main(["task=demo_vit", "task.pretrained=true", "method=magnitude,svd"]) == 0
    assert downloads == [("timm", "vit_tiny_patch16_224", True)]

    downloads.clear()
    root = tmp_path / "cifar"
    assert prefetch.main(["task=demo_resnet", "task.data.dataset=cifar10", f"task.data.root={root}",
                          "task.in_chans=3"]) == 0
    assert downloads == [("cifar10", str(root), True, True), ("cifar10", str(root), False, True)]


def test_prefetch_needs_nothing_for_the_embedded_demo(downloads, capsys):
    assert prefetch.main(["--dry-run", "experiment=demo"]) == 0
    out = capsys.readouterr().out
    assert "hub_model" not in out and "timm_weights" not in out and downloads == []
    assert prefetch.main(["task=nonexistent"]) == 2
    assert "nonexistent" in capsys.readouterr().err
