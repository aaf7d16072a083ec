"""Time FiPS's block-wise reconstruction (the "local error minimisation" stage) on a timm ViT with random weights.

Stages timed on the chosen device, with random images (no data, no hub weights: ``pretrained=False``):

1. teacher: the dense model's block inputs/outputs for ``--images`` images (``methods.fips.capture_block_io``);
2. svd: SVD initialisation of every group (``install_factorised``) and the sparsifier's initial pruning;
3. steps: ``--steps`` optimizer steps of the block objective (sum over blocks of MSE, AdamW, cosine LR, the
   sparsifier's mask updates every ``--update-every`` steps), each timed from its start to the next one (CUDA
   synchronised); median, mean and IQR per step, and the projection to the official schedules (600 and 3,000 steps).

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
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from methods.calibration import capture_block_io
from methods.fips import CACHE_DTYPES, FiPSConfig
from methods.fips_factors import install_factorised, plan_groups
from methods.reconstruction import block_loss_step, train_steps
from methods.sparse_training import make_sparsifier
from runners.record import write_benchmark
from tasks.adapters import create_adapter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str, model_kwargs: dict[str, Any], images: int, batch_size: int, steps: int, ratio: float,
          sparsity: float, sparsifier: str, update_every: int, cache_dtype: str, cache_device: str,
          device: torch.device, seed: int = 0) -> dict[str, Any]:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **model_kwargs).to(device).eval()
    adapter = create_adapter(model)
    cfg = FiPSConfig(ratio=ratio, sparsity=sparsity, sparsifier=sparsifier, update_every=update_every,
                     batch_size=batch_size, cache_dtype=cache_dtype, cache_device=cache_device)
    groups = plan_groups(adapter, cfg)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224)) if not model_kwargs.get("img_size") else \
        (model_kwargs.get("in_chans", 3), model_kwargs["img_size"], model_kwargs["img_size"])
    n_batches = -(-images // batch_size)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        for i in range(n_batches):
            n = min(batch_size, images - i * batch_size)
            yield torch.randn(n, *size, generator=gen).to(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    cache = capture_block_io(adapter, batches(), CACHE_DTYPES[cache_dtype], cache_device, n_batches, progress=False)
    _sync(device)
    t_teacher = time.perf_counter() - t0
    first = cache.inputs[0][0]

    t0 = time.perf_counter()
    modules, params = install_factorised(model, adapter, groups, cfg.overcomplete_tau, device)
    sp = make_sparsifier(sparsifier, [m.v for m in modules], sparsity, steps, update_every=update_every)
    sp.prepare()
    _sync(device)
    t_svd = time.perf_counter() - t0
    sp.prepare = lambda: None  # already done (timed above)

    stamps: list[float] = []
    inner = block_loss_step(adapter.blocks(), cache, device, torch.Generator().manual_seed(seed))

    def timed(t: int) -> float:
        _sync(device)
        stamps.append(time.perf_counter())
        return inner(t)

    hist = train_steps(params, sp, steps, timed, lr=1e-3, lr_min=1e-6, weight_decay=0.05)
    _sync(device)
    stamps.append(time.perf_counter())
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    q = statistics.quantiles(per_step, n=4) if len(per_step) >= 2 else [per_step[0]] * 3
    median = statistics.median(per_step)
    out = {
        "model": model_name, "model_kwargs": model_kwargs, "blocks": len(adapter.blocks()),
        "groups": [g.blocks for g in groups], "ranks": [g.rank for g in groups], "images": images,
        "batch_size": batch_size, "tokens_per_image": int(first[0].numel() // first.shape[-1]),
        "ratio": ratio, "sparsity": sparsity, "sparsifier": sparsifier, "update_every": update_every,
        "cache_dtype": str(first.dtype).replace("torch.", ""), "cache_on": str(first.device),
        "cache_gb": cache.nbytes() / 2**30,
        "teacher_s": t_teacher, "svd_init_s": t_svd, "steps": steps,
        "step_ms_median": median * 1e3, "step_ms_mean": statistics.fmean(per_step) * 1e3,
        "step_ms_iqr": (q[2] - q[0]) * 1e3,
        "projected_600_steps_min": (t_teacher + t_svd + 600 * median) / 60,
        "projected_3000_steps_min": (t_teacher + t_svd + 3000 * median) / 60,
        "loss_first": hist[0], "loss_last": hist[-1], "v_sparsity": sp.sparsity(),
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
            ("images x tokens", f"{r['images']} x {r['tokens_per_image']} (batch {r['batch_size']})"),
            ("teacher cache", f"{r['cache_gb']:.2f} GiB {r['cache_dtype']} on {r['cache_on']}"),
            ("teacher pass", f"{r['teacher_s']:.2f} s"), ("SVD init + prune", f"{r['svd_init_s']:.2f} s"),
            ("step (median / mean / IQR)",
             f"{r['step_ms_median']:.1f} / {r['step_ms_mean']:.1f} / {r['step_ms_iqr']:.1f} ms over {r['steps']}"),
            ("projected 600 / 3000 steps", f"{r['projected_600_steps_min']:.1f} / "
                                           f"{r['projected_3000_steps_min']:.1f} min"),
            ("loss first -> last", f"{r['loss_first']:.4g} -> {r['loss_last']:.4g}"),
            ("V sparsity", f"{r['v_sparsity']:.4f}")]
    if "peak_mem_gb" in r:
        rows.append(("peak GPU memory", f"{r['peak_mem_gb']:.1f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:{width}s}  {v}")
    print(f"device: {out['device'].get('gpu') or out['device'].get('cpu')}, {out['date']}; written to {args.out}")
    return out


if __name__ == "__main__":
    main()
