"""Time FiPS's block-wise reconstruction (the "local error minimisation" stage) on a timm ViT with random weights.

The model is compressed as a run does it: ``conf/method/fips.yaml`` composed with the command line's settings and
applied with ``Method.apply`` on random images (no data, no hub weights: ``pretrained=False``). Its sub-stages are
read from the run's own stage timers (``compress/<stage>_s``, CUDA synchronised by the caller's device):

1. calibration: the dense model's block inputs/outputs for ``--images`` images (the teacher cache);
2. factorise: SVD initialisation of every group;
3. fitting: ``--steps`` optimizer steps of the block objective with the configured sparsifier; the mean step time
   and the projection to the official schedules (600 and 3,000 steps).

    python -m runners.bench_fips                                   # DeiT-B, 3,840 images, 50 steps, cuda if any
    python -m runners.bench_fips --device cuda --out results/bench/fips_deit_base_h100.json
    python -m runners.bench_fips --device cpu --images 64 --batch-size 16 --steps 4 \\
        --model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}'

Prints a table and writes it as JSON with the device, date, torch version and settings.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from methods.fips import CACHE_DTYPES
from methods.fips_factors import plan_groups
from runners.bench_method import SyntheticTask, apply_method, method_config
from runners.record import write_benchmark
from tasks.adapters import create_adapter


def bench(model_name: str, model_kwargs: dict[str, Any], images: int, batch_size: int, steps: int, ratio: float,
          sparsity: float, sparsifier: str, update_every: int, cache_dtype: str, cache_device: str,
          device: torch.device, seed: int = 0) -> dict[str, Any]:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **model_kwargs).to(device).eval()
    cfg = method_config("fips", f"method.ratio={ratio}", f"method.sparsity={sparsity}",
                        f"method.sparsifier={sparsifier}", f"method.update_every={update_every}",
                        f"method.batch_size={batch_size}", f"method.cache_dtype={cache_dtype}",
                        f"method.cache_device={cache_device}", f"method.steps={steps}")
    size = model.pretrained_cfg.get("input_size", (3, 224, 224)) if not model_kwargs.get("img_size") else \
        (model_kwargs.get("in_chans", 3), model_kwargs["img_size"], model_kwargs["img_size"])
    n_batches = -(-images // batch_size)
    calibration = SyntheticTask(lambda g: torch.randn(batch_size, *size, generator=g), n_batches, device)
    adapter = create_adapter(model)
    groups = plan_groups(adapter, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method, metrics = apply_method(model, cfg, calibration, device, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = metrics["compress/fitting_s"] / steps
    setup_s = metrics["compress/calibration_s"] + metrics["compress/factorise_s"]
    out = {
        "model": model_name, "model_kwargs": model_kwargs, "blocks": len(adapter.blocks()),
        "groups": [g.blocks for g in groups], "ranks": [g.rank for g in groups], "images": n_batches * batch_size,
        "batch_size": batch_size, "ratio": ratio, "sparsity": sparsity, "sparsifier": sparsifier,
        "update_every": update_every, "cache_dtype": cache_dtype, "cache_device": cache_device,
        "teacher_s": metrics["compress/calibration_s"], "svd_init_s": metrics["compress/factorise_s"],
        "steps": steps, "step_ms_mean": step_s * 1e3,
        "projected_600_steps_min": (setup_s + 600 * step_s) / 60,
        "projected_3000_steps_min": (setup_s + 3000 * step_s) / 60,
        "loss_first": method.history[0], "loss_last": method.history[-1],
        "v_sparsity": metrics.get("method/v_sparsity"),
        "compress": {k: v for k, v in metrics.items() if k.startswith("compress/")},
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_base_patch16_224", help="timm model name (random weights)")
    ap.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model (tiny CPU models)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i>")
    ap.add_argument("--images", type=int, default=3840, help="calibration images (official: 30 x 128)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of MLP weights removed (p = 1 - ratio)")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--sparsifier", default="rigl", choices=["rigl", "gmp", "magnitude"])
    ap.add_argument("--update-every", type=int, default=50)
    ap.add_argument("--cache-dtype", default="auto", choices=list(CACHE_DTYPES))
    ap.add_argument("--cache-device", default="auto", choices=["auto", "cpu", "device"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path("results/bench/fips.json"))
    args = ap.parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if args.steps < 1 or args.images < 1 or args.batch_size < 1:
        raise SystemExit("--steps, --images and --batch-size must be >= 1")
    r = bench(args.model, json.loads(args.model_kwargs), args.images, args.batch_size, args.steps, args.ratio,
              args.sparsity, args.sparsifier, args.update_every, args.cache_dtype, args.cache_device, device)
    out = write_benchmark(args.out, device, vars(args), result=r)
    rows = [("model", r["model"]), ("blocks / groups", f"{r['blocks']} / {len(r['groups'])}"),
            ("ranks", ", ".join(map(str, r["ranks"]))),
            ("images", f"{r['images']} (batch {r['batch_size']})"),
            ("teacher cache", f"{r['cache_dtype']} on {r['cache_device']}"),
            ("teacher pass", f"{r['teacher_s']:.2f} s"), ("SVD init + prune", f"{r['svd_init_s']:.2f} s"),
            ("step (mean)", f"{r['step_ms_mean']:.1f} ms over {r['steps']}"),
            ("projected 600 / 3000 steps", f"{r['projected_600_steps_min']:.1f} / "
                                           f"{r['projected_3000_steps_min']:.1f} min"),
            ("loss first -> last", f"{r['loss_first']:.4g} -> {r['loss_last']:.4g}"),
            ("V sparsity", f"{r['v_sparsity']}")]
    if "peak_mem_gb" in r:
        rows.append(("peak GPU memory", f"{r['peak_mem_gb']:.1f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:{width}s}  {v}")
    print(f"device: {out['device'].get('gpu') or out['device'].get('cpu')}, {out['date']}; written to {args.out}")
    return out


if __name__ == "__main__":
    main()
