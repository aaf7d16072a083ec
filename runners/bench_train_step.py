"""Time per training step of STABLE-RPS (and the other train-time methods) against the dense model.

One step = forward of a random batch, cross-entropy, backward, SGD (Nesterov momentum 0.9, weight decay 1e-4) and
the method's after-step hook, timed with ``torch.utils.benchmark`` (median and IQR, CUDA synchronised) after warm-up.

    python -m runners.bench_train_step                                   # CPU: ResNet-20 and VGG-11-bn, batch 128
    python -m runners.bench_train_step --device cuda --out results/bench/train_step_h100.json
    python -m runners.bench_train_step --methods dense stable_rps mag --ratios 0.5 0.9 0.99

Prints a table (ms per step and the ratio to dense of the same architecture) and writes it as JSON with the device,
date, torch version and settings.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from methods import METHODS
from runners.bench_method import apply_method, method_config
from runners.record import write_benchmark
from tasks.models import resnet, vgg

ARCHS = {"resnet20": lambda: resnet(20, 10, 3, 16), "vgg11": lambda: vgg(11, 10, 3, batch_norm=True)}


def build(arch: str, method: str, ratio: float, device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The architecture at init on ``device``, compressed by ``method`` (its composed config at ``ratio``, as a run
    does, with ``Method.apply``; dense: untouched); returns (model, method or None)."""
    torch.manual_seed(seed)
    model = ARCHS[arch]().to(device)
    if method == "dense":
        return model, None
    if not METHODS.get(method).train_time:
        raise SystemExit(f"{method} is not a train-time method")
    m, _ = apply_method(model, method_config(method, f"method.ratio={ratio}"), None, device, seed)
    return model, m


def time_step(model: torch.nn.Module, method, batch_size: int, device: torch.device, warmup: int,
              min_run_time: float) -> dict[str, float]:
    from torch.utils import benchmark

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if method is not None:
            method.after_optimizer_step(model)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    m = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=min_run_time)
    return {"step_ms": m.median * 1e3, "step_iqr_ms": m.iqr * 1e3, "repeats": len(m.times) * m.number_per_run}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<i>")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--methods", nargs="+", default=["stable_rps"], help="train-time methods (dense is always timed)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.9, 0.99])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed steps per configuration")
    ap.add_argument("--out", type=Path, default=Path("results/bench/train_step.json"))
    args = ap.parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    rows = []
    for arch in args.archs:
        dense_ms = None
        for method in ["dense", *(m for m in args.methods if m != "dense")]:
            for ratio in ([0.0] if method == "dense" else args.ratios):
                model, m = build(arch, method, ratio, device)
                r = time_step(model, m, args.batch_size, device, args.warmup, args.min_run_time)
                if method == "dense":
                    dense_ms = r["step_ms"]
                r.update(arch=arch, method=method, ratio=ratio, vs_dense=r["step_ms"] / dense_ms)
                rows.append(r)
                print(f"{arch} {method} {ratio}: {r['step_ms']:.2f} ms/step, x{r['vs_dense']:.2f} dense", flush=True)
                del model, m
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out = write_benchmark(args.out, device, vars(args), input=[3, 32, 32], rows=rows)
    print(f"\n{'arch':9s} {'method':11s} {'ratio':>7s} {'ms/step':>10s} {'IQR':>8s} {'x dense':>8s}")
    for r in rows:
        print(f"{r['arch']:9s} {r['method']:11s} {r['ratio']:7.4f} {r['step_ms']:10.2f} {r['step_iqr_ms']:8.2f} "
              f"{r['vs_dense']:8.2f}")
    print(f"device: {out['device'].get('gpu') or out['device']['cpu']}, {out['date']}; written to {args.out}")
    return out


if __name__ == "__main__":
    main()
