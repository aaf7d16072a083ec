"""The points of a sweep, for submitting without Hydra's launcher (slurm/array.sbatch).

    uv run python slurm/points.py experiment=demo              # one line per point: its overrides, shell-quoted
    uv run python slurm/points.py --count experiment=demo      # how many points (the array size)
    uv run python slurm/points.py --index 3 experiment=demo    # point 3's overrides, one per line

The sweep is expanded as ``python -m runners.run -m`` expands it (``runners.preflight.sweep_points``), in the same
order, and every point is validated first, so a bad override fails here, before anything is submitted.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from core.errors import ConfigError  # noqa: E402
from runners.preflight import preflight, sweep_points  # noqa: E402
from runners.run import CONF_DIR  # noqa: E402


def points(overrides: list[str]) -> list[list[str]]:
    """Every point's override list, validated (``ConfigError`` on bad input)."""
    preflight(overrides, CONF_DIR)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return sweep_points(overrides, CONF_DIR)
    finally:
        GlobalHydra.instance().clear()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--count", action="store_true", help="print the number of points")
    group.add_argument("--index", type=int, help="print this point's overrides, one per line")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        jobs = points(args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.count:
        print(len(jobs))
    elif args.index is not None:
        if not 0 <= args.index < len(jobs):
            print(f"error: --index {args.index} is outside the sweep's {len(jobs)} points", file=sys.stderr)
            return 2
        print("\n".join(jobs[args.index]))
    else:
        print("\n".join(shlex.join(job) for job in jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
