"""Compression cost: time and peak memory per sub-stage of svd_llm, basis_sharing and geo_sharing on random-weight
LLaMA-architecture models of growing width and depth, a fit of how each stage grows, and a projection to the
LLaMA-7B shape on one H100.

    python -m runners.bench_compress_cost                                   # CPU, widths 128..512, depths 2..8
    python -m runners.bench_compress_cost --widths 128 256 --depths 2 4 --methods basis_sharing --out x.json

Every point builds a random LLaMA (MLP width = hidden * 11008 / 4096, 64-dim heads), compresses it at
``--ratio`` with the method's defaults on ``--calib-samples`` random token windows of ``--calib-seqlen`` tokens,
and records the sub-stages that ``CompressContext.stage`` times (seconds exclusive of nested stages; peak:
CUDA allocator or process RSS). For every (method, stage) a power law t = c * layers^a * hidden^b (times
tokens, for the stages that stream calibration tokens) is fitted by least squares in log space.

Projection to LLaMA-7B (hidden 4096, MLP 11008, 32 layers, 256 x 2048 calibration tokens, t = 550): the fitted
law gives the stage's time on this machine at that shape, and the ratio of the H100's rate to this machine's
rate for the stage's dominant primitive converts it: matmul (calibration forward, statistics, refit, curvature)
bf16 784 TFLOP/s; eigh / Cholesky (eigen, colouring) fp32, 0.097 s at 4096^2; SVD (fitting) fp32, 1.15 s for
4096 x 16384. This machine's rates are measured at small sizes and scaled by n^3 (eigh) and m^2 n (SVD, m <= n).
The token stages (statistics, curvature) take at least their arithmetic at the H100's rates (``flop_floor_s``).
Time in no named stage (``other``) keeps its share of the largest measured point. The projection inherits the
fit's error and the assumption that a stage is bound by its primitive; BENCHMARKS.md lists the caveats.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods import METHODS, CompressContext
from methods.curvature import DEVICE_MEMORY_SHARE, gradient_passes
from core.io import read_json
from runners.record import write_benchmark
from tasks.adapters import create_adapter

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "tokens": 256 * 2048}
# measured on one H100 (the figures): bf16 matmul, fp32 eigh at two sizes, fp32 SVD of 4096 x 16384
H100 = {"matmul_flops": 784e12, "eigh_4096_s": 0.097, "eigh_11008_s": 0.98, "svd_4096x16384_s": 1.15}
# Geo-Sharing's colouring scores each candidate class with one Cholesky and one eigh of d_in x d_in (``ClassCosts``);
# its per-layer products are matmuls, counted at the eigh rate too (an upper bound)
PRIMITIVE = {"calibration": "matmul", "statistics": "matmul", "refit": "matmul", "colouring": "eigh",
             "curvature": "matmul", "eigen": "eigh", "fitting": "svd"}
TOKEN_STAGES = ("calibration", "statistics", "refit", "curvature")  # stages whose work grows with the tokens
H100_FP64_FLOPS = 67e12  # H100 SXM datasheet, FP64 tensor core: the float64 Gram sums
H100_FREE_BYTES = 80e9 - 13.5e9  # an H100's memory less LLaMA-7B's bf16 weights
GOALS_S = {"geo_sharing": 600.0, "basis_sharing": 240.0}


class RandomCalibration(CompressContext):
    """A context whose calibration data are random token windows (``n`` windows of ``seqlen`` tokens)."""

    def __init__(self, *args, vocab: int, n: int, seqlen: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab, self.n, self.seqlen = vocab, n, seqlen

    def provides(self, kind: str) -> bool:
        return kind == "calibration_batches"

    def calibration_batches(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n):
            yield {"input_ids": torch.randint(0, self.vocab, (1, self.seqlen), generator=gen).to(self.device)}


def llama(hidden: int, layers: int, vocab: int, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    inter = int(round(hidden * LLAMA_7B["intermediate"] / LLAMA_7B["hidden"] / 8)) * 8
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096)
    with torch.device(device):
        return LlamaForCausalLM(cfg).eval()


def compress_point(method: str, hidden: int, layers: int, args: argparse.Namespace, device: torch.device
                   ) -> dict[str, Any]:
    """Compress one random model; returns its shape, total seconds, per-stage seconds and peak bytes."""
    model = llama(hidden, layers, args.vocab, device)
    cls = METHODS.get(method)
    m = cls(cls.config_class(ratio=args.ratio))
    adapter = create_adapter(model)
    ctx = RandomCalibration(task=None, device=device, seed=0, progress=False, vocab=args.vocab,
                            n=args.calib_samples, seqlen=args.calib_seqlen)
    t0 = time.perf_counter()
    with ctx.stage("other"):
        m.apply(model, adapter, ctx)
    total = time.perf_counter() - t0
    stages = {k[len("compress/"):-2]: v for k, v in ctx.stage_metrics.items() if k.endswith("_s")}
    peaks = {k[len("compress/"):-len("_peak_bytes")]: v for k, v in ctx.stage_metrics.items()
             if k.endswith("_peak_bytes")}
    return {"method": method, "hidden": hidden, "layers": layers, "tokens": args.calib_samples * args.calib_seqlen,
            "params": sum(p.numel() for p in llama(hidden, layers, args.vocab, torch.device("meta")).parameters()),
            "total_s": total, "stage_s": stages, "stage_peak_bytes": peaks, "peak_bytes": peaks.get("other", 0)}


def _time(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def local_rates(device: torch.device) -> dict[str, float]:
    """This machine's rates for the primitives, at sizes that take well under a second."""
    n = 1024
    a = torch.randn(n, n, device=device)
    spd = a @ a.T + n * torch.eye(n, device=device)
    w = torch.randn(512, 2048, device=device)
    return {"matmul_flops": 2 * n**3 / _time(lambda: a @ a),
            "eigh_1024_s": _time(lambda: torch.linalg.eigh(spd)),
            "svd_512x2048_s": _time(lambda: torch.linalg.svd(w, full_matrices=False))}


def speedups(local: dict[str, float]) -> dict[str, float]:
    """H100 / this machine, per primitive, at the LLaMA-7B sizes (local rates scaled by n^3 and m^2 n)."""
    eigh_4096_local = local["eigh_1024_s"] * 4**3
    svd_local = local["svd_512x2048_s"] * (4096 / 512) ** 2 * (16384 / 2048)  # m^2 n for m <= n
    return {"matmul": H100["matmul_flops"] / local["matmul_flops"], "eigh": eigh_4096_local / H100["eigh_4096_s"],
            "svd": svd_local / H100["svd_4096x16384_s"]}


def fit(points: list[dict[str, Any]], stage: str) -> dict[str, float] | None:
    """Least-squares power law t = c * layers^a * hidden^b * (tokens, for token stages) over ``points``."""
    rows = [(p["layers"], p["hidden"], p["tokens"], p["stage_s"][stage]) for p in points
            if p["stage_s"].get(stage, 0) > 0]
    if len({(r[0], r[1]) for r in rows}) < 3:
        return None
    per_token = stage in TOKEN_STAGES
    x = np.array([[1.0, math.log(l), math.log(h)] for l, h, _, _ in rows])
    y = np.array([math.log(t / (n if per_token else 1)) for _, _, n, t in rows])
    (logc, a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"log_c": float(logc), "layers_exp": float(a), "hidden_exp": float(b), "per_token": per_token}


def flop_floor_s(stage: str) -> float:
    """Seconds the arithmetic of a token stage needs at LLaMA-7B on one H100 (0 for other stages): block forwards
    (and backwards) at the bf16 rate, float64 Gram sums at the FP64 rate. statistics: one forward of every block and
    X^T X of each distinct input (q/k/v, o, gate/up, down: 3 h^2 + m^2 per token). curvature: per pass of
    ``methods.curvature.output_gradient_grams`` (G of a pass within DEVICE_MEMORY_SHARE of the free memory) a
    forward and a full backward (an upper bound: the backward stops at the pass's first layer), plus g g^T of
    every linear's output (5 h^2 + 2 m^2 per token). Small shapes, where overheads dominate, fit these stages
    below their arithmetic; the projection takes the larger of the two."""
    h, m, layers, tokens = LLAMA_7B["hidden"], LLAMA_7B["intermediate"], LLAMA_7B["layers"], LLAMA_7B["tokens"]
    forward = 2.0 * (4 * h * h + 3 * h * m) * tokens * layers / H100["matmul_flops"]
    if stage == "statistics":
        return forward + 2.0 * (3 * h * h + m * m) * tokens * layers / H100_FP64_FLOPS
    if stage == "curvature":
        passes = len(gradient_passes([h] * 4 * layers + [m] * 2 * layers, DEVICE_MEMORY_SHARE * H100_FREE_BYTES))
        return 3 * forward * passes + 2.0 * (5 * h * h + 2 * m * m) * tokens * layers / H100_FP64_FLOPS
    return 0.0


def project(law: dict[str, float], factor: float) -> float:
    """Seconds on one H100 at the LLaMA-7B shape from a fitted law and the stage's speed-up factor."""
    s = math.exp(law["log_c"]) * LLAMA_7B["layers"] ** law["layers_exp"] * LLAMA_7B["hidden"] ** law["hidden_exp"]
    return s * (LLAMA_7B["tokens"] if law["per_token"] else 1) / factor


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["svd_llm", "basis_sharing", "geo_sharing"])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512], help="hidden sizes at --base-depth")
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 8], help="layer counts at --base-width")
    ap.add_argument("--base-width", type=int, default=256)
    ap.add_argument("--base-depth", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--reuse", type=Path, default=None,
                    help="project from the points and local rates of an earlier JSON instead of measuring")
    ap.add_argument("--out", type=Path, default=Path("results/bench/compress_cost.json"))
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or min(args.widths + args.depths) < 1 or not 0 < args.ratio < 1:
        raise SystemExit(f"unknown methods {unknown} or bad sizes / ratio (widths, depths >= 1; 0 < ratio < 1)")
    device = torch.device(args.device)
    shapes = sorted({(w, args.base_depth) for w in args.widths} | {(args.base_width, d) for d in args.depths})
    earlier = read_json(args.reuse) if args.reuse is not None else None
    points = [p for p in earlier["points"] if p["method"] in args.methods] if earlier else []
    for method in args.methods if earlier is None else ():
        for hidden, layers in shapes:
            points.append(compress_point(method, hidden, layers, args, device))
    for p in points:
        print(f"{p['method']:>14} h={p['hidden']:<5} L={p['layers']:<3} {p['total_s']:8.2f} s  "
              + " ".join(f"{k}={v:.2f}" for k, v in sorted(p["stage_s"].items())), flush=True)
    local = earlier["local_rates"] if earlier else local_rates(device)
    factor = speedups(local)
    projections = {}
    for method in args.methods:
        mine = [p for p in points if p["method"] == method]
        stages = sorted({s for p in mine for s in p["stage_s"]} - {"other"})
        laws = {s: fit(mine, s) for s in stages}
        fitted = {s: project(law, factor[PRIMITIVE[s]]) for s, law in laws.items() if law is not None}
        floors = {s: flop_floor_s(s) for s in fitted}
        per_stage = {s: max(fitted[s], floors[s]) for s in fitted}
        largest = max(mine, key=lambda p: p["params"])
        share = largest["stage_s"].get("other", 0.0) / largest["total_s"]
        per_stage["other"] = sum(per_stage.values()) * share / (1 - share)
        total = sum(per_stage.values())
        projections[method] = {"laws": laws, "h100_fit_s": fitted, "h100_flop_floor_s": floors,
                               "h100_s": per_stage, "h100_total_s": total,
                               "dominant": max(per_stage, key=per_stage.get) if per_stage else None,
                               "goal_s": GOALS_S.get(method), "meets_goal": total <= GOALS_S.get(method, math.inf)}
    print(f"\nH100 / this machine: " + ", ".join(f"{k} {v:.0f}x" for k, v in factor.items()))
    print(f"{'method':>14} {'stage':>12} {'a (layers)':>10} {'b (hidden)':>10} {'fit s':>8} {'flops s':>8} "
          f"{'H100 7B s':>10}")
    for method, proj in projections.items():
        for s, law in proj["laws"].items():
            if law is not None:
                print(f"{method:>14} {s:>12} {law['layers_exp']:>10.2f} {law['hidden_exp']:>10.2f} "
                      f"{proj['h100_fit_s'][s]:>8.1f} {proj['h100_flop_floor_s'][s]:>8.1f} {proj['h100_s'][s]:>10.1f}")
        print(f"{method:>14} {'total':>12} {'':>10} {'':>10} {proj['h100_total_s']:>10.1f}  goal "
              f"{proj['goal_s']} s, dominant: {proj['dominant']}")
    return write_benchmark(args.out, device, vars(args), points=points, local_rates=local, h100=H100,
                           speedup_factors=factor, projections=projections)


if __name__ == "__main__":
    main()
