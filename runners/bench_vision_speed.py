"""Inference images/s and resident weight bytes of compressed vision models against the dense model.

Random weights (timing does not depend on the values), no data. Each model is compressed as a run compresses it:
the method's config composed from ``conf/method/<name>.yaml`` and applied with ``Method.apply``:

* ``resnet20`` / ``vgg11`` (the CIFAR variants, 32 x 32 inputs): dense, and ``stable_rps`` (its config: one shared
  array for every conv and linear weight) at ``--hashed-ratio`` (0.9 = 10x), as at the start of its training;
* ``deit_base`` (timm ``deit_base_patch16_224``, ``pretrained=False``; ``--vit-kwargs`` for a smaller ViT): dense, and
  ``fips`` at ``--fips-ratio`` of the MLP weights with V ``--sparsity`` sparse, element-wise and in b x b blocks
  (``--sparsity-blocks 1 32``; ``fips_b32``: V as BSR, the Triton block-sparse kernel on CUDA). Its reconstruction
  runs one step (``method.steps=1``) on two batches of random images: the stored structure (ranks, V's sparsity
  and blocks) is that of a full reconstruction, which only changes the values.

Every compressed model is measured under each ``--kernels`` choice: ``torch``, the naive layout (hashed weights
gathered through a resident index into a dense weight before the library conv/GEMM; FiPS's V dense with its
mask), and ``auto``, the harness's inference layout (``methods.fuse.inference_layout``: no index buffers, the hash
recomputed per forward, on CUDA inside a Triton matmul or implicit-GEMM conv so no dense weight exists; FiPS's V
stored and multiplied as CSR).

    python -m runners.bench_vision_speed --device cuda --out results/bench/vision_speed_h100.json
    python -m runners.bench_vision_speed --device cpu --models resnet20 --kernels torch --batch 16   # CPU smoke

Prints a table (and each figure's ratio to its dense model) and writes it as JSON with the device, date and settings.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods import kernels
from methods.fuse import inference_layout
from runners import measure
from runners.bench_method import apply_method, method_config, random_images
from runners.record import write_benchmark
from tasks.adapters import create_adapter
from tasks.models.cifar import resnet, vgg

MODELS = ("resnet20", "vgg11", "deit_base")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...]]:
    """A model with random weights (seed 0) and its input shape (C, H, W)."""
    torch.manual_seed(0)
    if name == "resnet20":
        return resnet(20), (3, 32, 32)
    if name == "vgg11":
        return vgg(11), (3, 32, 32)
    import timm

    model = timm.create_model("deit_base_patch16_224", pretrained=False, **args.vit_kwargs)
    return model, vit_input_shape(model)


def vit_input_shape(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) of a timm ViT's input."""
    return model.patch_embed.proj.in_channels, *model.patch_embed.img_size


def compress(name: str, model: nn.Module, args: argparse.Namespace, block: int) -> tuple[str, float]:
    """Apply the model's method in place (FiPS with V pruned in ``block`` x ``block`` blocks); returns (method,
    ratio)."""
    device = next(model.parameters()).device
    if name == "deit_base":
        cfg = method_config("fips", f"method.ratio={args.fips_ratio}", f"method.sparsity={args.sparsity}",
                            f"method.sparsity_block={block}", "method.steps=1")
        apply_method(model, cfg, random_images(vit_input_shape(model), 2, 4, device), device)
        return ("fips" if block == 1 else f"fips_b{block}"), args.fips_ratio
    apply_method(model, method_config("stable_rps", f"method.ratio={args.hashed_ratio}"), None, device)
    return "stable_rps", args.hashed_ratio


def measure_model(model: nn.Module, shape: tuple[int, ...], args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(1)).to(device, DTYPES[args.dtype])
    with torch.no_grad():
        timing = measure.latency(model, (x,), args.batch, args.warmup, args.min_run_time)
    return {"weight_bytes": measure.weight_bytes(model), "images_per_s": timing["throughput"],
            "batch_ms": timing["latency_ms"], "batch_iqr_ms": timing["latency_iqr_ms"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--kernels", nargs="+", default=["torch", "auto"], choices=["torch", "auto"])
    ap.add_argument("--hashed-ratio", type=float, default=0.9, help="stable_rps: fraction of weights removed")
    ap.add_argument("--fips-ratio", type=float, default=0.5, help="fips: fraction of MLP weights removed")
    ap.add_argument("--sparsity", type=float, default=0.75, help="fips: sparsity of every V")
    ap.add_argument("--sparsity-blocks", nargs="+", type=int, default=[1, 32],
                    help="fips: V pruned element-wise (1) and/or in b x b blocks (block-sparse kernel)")
    ap.add_argument("--vit-kwargs", type=json.loads, default={}, help="JSON kwargs for timm.create_model")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed batches per model")
    ap.add_argument("--out", type=Path, default=Path("results/bench/vision_speed.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if not (0 < args.hashed_ratio < 1 and 0 < args.fips_ratio < 1 and 0 <= args.sparsity < 1):
        raise SystemExit("--hashed-ratio and --fips-ratio must be in (0, 1), --sparsity in [0, 1)")
    if min(args.sparsity_blocks) < 1:
        raise SystemExit(f"--sparsity-blocks {args.sparsity_blocks}: every block size must be >= 1")
    rows = []
    for name in args.models:
        dense = None
        blocks = args.sparsity_blocks if name == "deit_base" else [1]
        for block, mode in [(0, "torch"), *((b, m) for b in blocks for m in args.kernels)]:
            with kernels.backend(mode):
                model, shape = build(name, args)
                model = model.to(device)
                method, ratio = compress(name, model, args, block) if block else ("dense", 0.0)
                model = model.to(dtype=DTYPES[args.dtype]).eval()
                protocol = inference_layout(model, create_adapter(model), device)
                row = {"model": name, "method": method, "ratio": ratio, "kernels": mode,
                       "ran": protocol["protocol/kernels"], **measure_model(model, shape, args, device)}
            dense = dense or row
            for key in ("weight_bytes", "images_per_s"):
                row[f"{key}_vs_dense"] = row[key] / dense[key]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = write_benchmark(args.out, device, vars(args), rows=rows)
    print(f"\n{'model':10s} {'method':10s} {'ratio':>5s} {'kernels':7s} {'ran':6s} {'weights MB':>10s} {'x':>5s} "
          f"{'images/s':>10s} {'x':>5s}")
    for r in rows:
        print(f"{r['model']:10s} {r['method']:10s} {r['ratio']:5.2f} {r['kernels']:7s} {r['ran']:6s} "
              f"{r['weight_bytes'] / 1e6:10.2f} {r['weight_bytes_vs_dense']:5.2f} {r['images_per_s']:10.1f} "
              f"{r['images_per_s_vs_dense']:5.2f}")
    print(f"device: {out['device'].get('gpu') or out['device']['cpu']}, {out['date']}; written to {args.out}")
    return out


if __name__ == "__main__":
    main()
