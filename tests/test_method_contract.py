"""The contract every registered method must pass on every task it accepts: a valid record, the ratio honoured
over the scope, a bad ratio rejected before anything is built. New methods are picked up automatically."""
import pytest

from core.errors import ConfigError
from core.io import read_json
from methods import METHODS
from runners.record import METRICS_JSON, RUN_JSON
from runners.run import execute, plan
from tasks import TASKS as TASK_FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["toy", "demo_lm", "demo_resnet"]
RATIO = 0.5
TOLERANCE = 0.06  # rank and rounding granularity of the small test models


@pytest.mark.parametrize("method", METHODS.names())
def test_method_contract(task_cfg, method):
    ran = []
    for task in TASKS:
        cfg = task_cfg(task, f"method={method}", f"method.ratio={RATIO}")
        if METHODS.get(method).train_time and not TASK_FAMILIES.get(cfg.task.family).supports_training():
            continue  # plan refuses it (tests/test_configs.py)
        try:
            p = plan(cfg)
        except ConfigError:  # the method cannot compress this architecture: refused on a skeleton of the model
            continue
        assert execute(task_cfg(task, f"method={method}", f"method.ratio={RATIO}"), []) == "done", \
            read_json(p.run_dir / RUN_JSON).get("traceback")
        rec, m = read_json(p.run_dir / RUN_JSON), read_json(p.run_dir / METRICS_JSON)
        assert rec["status"] == "done" and rec["summary"]["method"] == method
        expected = RATIO if p.method.uses_ratio else 0.0
        assert expected - 1e-9 <= m["scope/removed_fraction"] <= expected + TOLERANCE, (task, m["scope/removed_fraction"])
        assert m["params_stored"] <= m["params_dense"] and m["bytes_on_disk"] > 0
        main = rec["summary"]["main_metric"]
        assert isinstance(m[main], float) and isinstance(m[f"dense/{main}"], float)
        ran.append(task)
    assert ran, f"{method} accepts none of the test tasks {TASKS}"


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_bad_ratio_is_rejected_before_anything_is_built(task_cfg, method, ratio):
    with pytest.raises(ConfigError, match="outside"):
        plan(task_cfg("toy", f"method={method}", f"method.ratio={ratio}"))
