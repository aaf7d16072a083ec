"""What can be run: every method, task and experiment by name; and what a command would run.

    python -m runners.list [methods|tasks|experiments] [--json]
    python -m runners.run -m experiment=demo --plan      (``plan_points``: each point's run id and status)

For each name: a one-line description (the first comment line of its yaml in ``conf/``), its kind (methods:
post-training, post-training + calibration, or train-time; tasks: the family; experiments: how many points the
sweep has), the paper (arXiv id, where its yaml or code cites one) and its configurable fields with their defaults
as composed by Hydra (``method.<field>=...`` / ``task.<field>=...`` on the command line).
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import methods
from core.errors import ConfigError
from runners.plan import CONF_DIR, plan
from runners.preflight import one_line, sweep_points
from runners.record import run_status
from tasks.base import Task

KINDS = ("methods", "tasks", "experiments")
ARXIV = re.compile(r"arXiv[ :]*(\d{4}\.\d{4,5})")
# a method reads the task's data only through its CompressContext (``ctx.<kind>(...)``, kinds in Task.DATA_KINDS)
_DATA_CALL = re.compile(r"\bctx\.(" + "|".join(Task.DATA_KINDS) + r")\(")


def yaml_comment(path: Path) -> str:
    """The leading comment block of a yaml (without ``@package`` lines and command examples), as one string."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package") or text.startswith(("python ", "uv run ")):
            continue
        lines.append(text)
    return " ".join(lines)


def first_sentence(text: str, limit: int = 160) -> str:
    """The text up to its first full stop followed by a capital, at most ``limit`` characters."""
    head = re.split(r"(?<=\.)\s+(?=[A-Z])", text.strip(), maxsplit=1)[0].rstrip(".")
    return head if len(head) <= limit else head[:limit - 3].rstrip() + "..."


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def method_kind(cls: type) -> str:
    """``train-time``, ``post-training, calibration`` (the method reads task data) or ``post-training``."""
    if cls.train_time:
        return "train-time"
    return "post-training, calibration" if _DATA_CALL.search(inspect.getsource(inspect.getmodule(cls))) \
        else "post-training"


def _composed(group: str, name: str) -> dict[str, Any]:
    cfg = compose("run", overrides=[f"{group}={name}"])
    return OmegaConf.to_container(cfg[group], resolve=False)


def list_methods() -> list[dict[str, Any]]:
    out = []
    for name in methods.METHODS.names():
        cls = methods.METHODS.get(name)
        yaml = CONF_DIR / "method" / f"{name}.yaml"
        comment = yaml_comment(yaml) if yaml.is_file() else ""
        source = f"{comment} {cls.__doc__ or ''} {inspect.getmodule(cls).__doc__ or ''}"
        fields = {k: v for k, v in _composed("method", name).items() if k != "name"} if yaml.is_file() else {}
        out.append({"name": name, "kind": method_kind(cls),
                    "description": first_sentence(comment or cls.__doc__ or ""),
                    "paper": next(iter(ARXIV.findall(source)), None), "fields": flatten(fields)})
    return out


def list_tasks() -> list[dict[str, Any]]:
    out = []
    for yaml in sorted((CONF_DIR / "task").glob("*.yaml")):
        cfg = _composed("task", yaml.stem)
        comment = yaml_comment(yaml)
        out.append({"name": yaml.stem, "kind": cfg["family"], "description": first_sentence(comment),
                    "paper": next(iter(ARXIV.findall(comment)), None),
                    "fields": flatten({k: v for k, v in cfg.items() if k not in ("name", "family")})})
    return out


def list_experiments() -> list[dict[str, Any]]:
    out = []
    for yaml in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        comment = yaml_comment(yaml)
        cfg = compose("run", overrides=[f"experiment={yaml.stem}"], return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.get("params") or {})
        n = len(sweep_points([f"experiment={yaml.stem}"], CONF_DIR))
        out.append({"name": yaml.stem, "kind": f"{n} points", "description": first_sentence(comment),
                    "paper": next(iter(ARXIV.findall(comment)), None), "fields": params})
    return out


def collect(kinds: list[str]) -> dict[str, list[dict[str, Any]]]:
    listers = {"methods": list_methods, "tasks": list_tasks, "experiments": list_experiments}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return {kind: listers[kind]() for kind in kinds}
    finally:
        GlobalHydra.instance().clear()


def render(listing: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for kind, entries in listing.items():
        lines.append(f"{kind}:")
        width = max((len(e["name"]) for e in entries), default=0)
        for e in entries:
            paper = f" [arXiv {e['paper']}]" if e["paper"] else ""
            lines.append(f"  {e['name']:<{width}}  ({e['kind']}){paper} {e['description']}")
            if e["fields"]:
                lines.append(" " * (width + 4) + ", ".join(f"{k}={json.dumps(v)}" for k, v in e["fields"].items()))
        lines.append("")
    return "\n".join(lines)


def plan_points(argv: list[str], conf_dir: Path = CONF_DIR) -> list[dict[str, Any]]:
    """Every point the command line ``argv`` launches (an experiment's sweep included), validated and planned but
    nothing built or written: its overrides, run id and status (``done``, ``failed``, ``running``, ``damaged`` as
    its record says, ``new`` when it has none, ``duplicate`` when an earlier point has the same run id, e.g.
    ``dense`` at several ratios). Raises ``ConfigError``."""
    overrides = [a for a in argv if not a.startswith("-")]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            for job in sweep_points(overrides, conf_dir):
                try:
                    p = plan(compose("run", overrides=job))
                except (HydraException, OmegaConfBaseException) as e:
                    raise ConfigError(one_line(e)) from e
                status = "duplicate" if p.run_id in seen else (run_status(p.run_dir) or "new")
                seen.add(p.run_id)
                out.append({"overrides": [o for o in job if not o.startswith("hydra.")], "run_id": p.run_id,
                            "status": status, "run_dir": str(p.run_dir)})
    finally:
        GlobalHydra.instance().clear()
    return out


def render_plan(points: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for pt in points:
        counts[pt["status"]] = counts.get(pt["status"], 0) + 1
    width = max((len(pt["run_id"]) for pt in points), default=0)
    lines = [f"{pt['status']:<9} {pt['run_id']:<{width}}  {' '.join(pt['overrides'])}" for pt in points]
    lines.append(f"{len(points)} points: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.list", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=KINDS, help="one kind of name (default: all)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    listing = collect([args.what] if args.what else list(KINDS))
    print(json.dumps(listing, indent=1) if args.json else render(listing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
