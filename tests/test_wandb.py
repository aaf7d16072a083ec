"""W&B runs offline, writes inside the run folder, and uses the run id as its id."""
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
        summary, groups = {}, set()
        for rec in wandb_records(files[0]):
            kind = rec.WhichOneof("record_type")
            if kind == "summary":
                summary.update({u.key: json.loads(u.value_json) for u in rec.summary.update})
            if kind == "run":  # the run record may be written more than once; later copies can omit the group
                assert rec.run.run_id == run_id
                groups.add(rec.run.run_group)
        if (groups - {""} and "scope/removed_fraction" in summary) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert groups - {""} == {"wb"}
    assert summary["scope/removed_fraction"] == read_json(run_dir / "metrics.json")["scope/removed_fraction"]
    # nothing of wandb's outside the output folder
    assert not (Path.home() / ".cache" / "wandb").exists() or not any(
        run_id in str(p) for p in (Path.home() / ".cache" / "wandb").rglob("*"))
    assert "WANDB_API_KEY" not in (run_dir / RUN_JSON).read_text()
