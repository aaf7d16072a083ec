"""W&B runs offline, writes inside the run folder, uses the run id as its id and a readable name and tags, writes
the summary in one update and the metrics table with numeric columns."""
import glob
import json
import struct
import time
from pathlib import Path

from core.io import read_json
from runners.record import RUN_JSON
from runners.run import execute


def wandb_records(path):
    """Records of an offline ``.wandb`` file (LevelDB-log framing, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # a record still being written
            return
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 1:
            full = chunk
        elif kind == 2:
            buf = chunk
            continue
        elif kind == 3:
            buf += chunk
            continue
        else:
            full, buf = buf + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(full)
        yield rec


def test_offline_wandb_files_land_in_the_run_folder(toy_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = toy_cfg("method=svd", "logger=wandb", "experiment_name=wb")
    assert execute(cfg, []) == "done"
    (run_dir,) = (Path(cfg.out_dir) / "runs").iterdir()
    run_id = read_json(run_dir / RUN_JSON)["run_id"]
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    assert len(files) == 1, list(run_dir.rglob("*"))
    # wandb's service may still be flushing the offline file when finish() returns: read until it is complete
    deadline = time.monotonic() + 30
    while True:
        summary, groups, names, tags, updates = {}, set(), set(), set(), []
        for rec in wandb_records(files[0]):
            kind = rec.WhichOneof("record_type")
            if kind == "summary":
                update = {u.key: json.loads(u.value_json) for u in rec.summary.update}
                summary.update(update)
                updates.append(update)
            if kind == "run":  # the run record may be written more than once; later copies can omit the group
                assert rec.run.run_id == run_id
                groups.add(rec.run.run_group)
                names.add(rec.run.display_name)
                tags.update(rec.run.tags)
        if (groups - {""} and "scope/removed_fraction" in summary) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    metrics = read_json(run_dir / "metrics.json")
    assert groups - {""} == {"wb"}
    assert summary["scope/removed_fraction"] == metrics["scope/removed_fraction"]
    # the harness's summary arrives in one update holding every metric
    numeric = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert sum(numeric <= set(u) for u in updates) == 1, [sorted(u)[:5] for u in updates]
    # readable name (task-method-ratio-seed) and tags
    config = read_json(run_dir / RUN_JSON)["config"]
    task, ratio = config["task"]["name"], config["method"]["ratio"]
    assert names - {""} == {f"{task}-svd-{ratio:g}-s{config['seed']}"}
    assert {"method:svd", f"task:{task}", f"ratio:{ratio:g}"} <= tags
    # the metrics table: one row, numeric metrics in numeric columns
    (table_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "media" / "table" /
                                  "metrics_*.table.json"))
    table = json.loads(Path(table_file).read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert len(table["data"]) == 1
    assert row["scope/removed_fraction"] == metrics["scope/removed_fraction"]
    assert all(isinstance(row[k], (int, float)) for k in numeric)
    assert isinstance(row["protocol/measure_device"], str)
    # nothing of wandb's outside the output folder
    assert not (Path.home() / ".cache" / "wandb").exists() or not any(
        run_id in str(p) for p in (Path.home() / ".cache" / "wandb").rglob("*"))
    assert "WANDB_API_KEY" not in (run_dir / RUN_JSON).read_text()


def test_typed_frame_keeps_numbers_numeric():
    import pandas as pd

    from runners.loggers import run_name, run_tags, typed_frame

    df = typed_frame(pd.DataFrame({"x": [1.5, float("nan")], "n": [1, 2], "s": ["a", None], "b": [True, False]}))
    assert df["x"].tolist() == [1.5, None] and df["n"].tolist() == [1.0, 2.0]
    assert df["s"].tolist() == ["a", None] and df["b"].tolist() == ["True", "False"]
    config = {"task": {"name": "demo_lm"}, "method": {"name": "dense", "ratio": 0.5}, "seed": 3}
    assert run_name(config) == "demo_lm-dense-0-s3"
    assert run_tags(config) == ["method:dense", "task:demo_lm", "ratio:0"]
