"""Sixteen processes writing runs into one sweep folder at once lose nothing."""
import multiprocessing as mp
from pathlib import Path

from core.io import read_json
from runners.record import METRICS_JSON, RUN_JSON

POINTS = [(m, r, s) for m in ("magnitude", "svd") for r in (0.2, 0.5) for s in (0, 1, 2, 3)]  # 16 distinct runs


def _worker(args):
    method, ratio, seed, root = args
    import torch

    torch.set_num_threads(1)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import tests.toy  # noqa: F401
    from runners.run import execute
    from runners.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("run", overrides=[f"hydra.searchpath=[file://{conf.parent / 'tests' / 'conf'}]", "task=toy",
                                        "logger=none", f"method={method}", f"method.ratio={ratio}", f"seed={seed}",
                                        f"out_dir={root}/out", f"cache_dir={root}/cache", "progress=false",
                                        "measure.min_run_time_s=0.01", "measure.warmup=1"])
    return execute(cfg, [])


def test_sixteen_processes_into_one_sweep_folder(tmp_path):
    _worker(("svd", 0.5, 0, str(tmp_path / "warm-up")))  # lazy imports happen once, before the fork
    jobs = [(m, r, s, str(tmp_path)) for m, r, s in POINTS]
    jobs += [jobs[0], jobs[5]]  # two duplicates race for the same run folder
    with mp.get_context("fork").Pool(16) as pool:
        statuses = pool.map(_worker, jobs, chunksize=1)
    assert statuses.count("done") >= 16 and set(statuses) <= {"done", "skipped", "busy"}
    runs = sorted((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 16
    for run_dir in runs:
        assert read_json(run_dir / RUN_JSON)["status"] == "done"
        assert "scope/removed_fraction" in read_json(run_dir / METRICS_JSON)
        assert not list(run_dir.glob(".*.tmp"))
    # one dense evaluation per seed, shared by every method and ratio
    assert len(list((tmp_path / "out" / "dense").glob("*.json"))) == 4
