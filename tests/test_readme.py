"""The README's worked example of a new method works as written."""
import re
from pathlib import Path

import pytest

from core.errors import ConfigError
from methods import METHODS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_adding_a_method_example_runs(toy_cfg, tmp_path):
    from hydra.core.config_store import ConfigStore

    from runners.run import execute, plan

    blocks = re.findall(r"```python\n(# methods/random_prune.py\n.*?)```", README, flags=re.S)
    yaml_blocks = re.findall(r"```yaml\n# conf/method/random_prune.yaml\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 1 and len(yaml_blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "random_prune.py", "exec"), namespace)
    try:
        cls = METHODS.get("random_prune")
        ConfigStore.instance().store(group="schema/method", name="random_prune", node=cls.config_class)
        (tmp_path / "conf" / "method").mkdir(parents=True)
        (tmp_path / "conf" / "method" / "random_prune.yaml").write_text(yaml_blocks[0])
        tests_conf = Path(__file__).resolve().parent / "conf"
        search = f"hydra.searchpath=[file://{tests_conf},file://{tmp_path / 'conf'}]"
        cfg = toy_cfg("method=random_prune", "method.ratio=0.75", search)
        assert execute(cfg, []) == "done"
        from core.io import read_json

        metrics = read_json(plan(cfg).run_dir / "metrics.json")
        assert metrics["scope/removed_fraction"] == pytest.approx(0.75, abs=0.05)
        with pytest.raises(ConfigError):
            plan(toy_cfg("method=random_prune", "method.ratio=1.5", search))
    finally:
        METHODS._entries.pop("random_prune", None)
