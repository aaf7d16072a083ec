"""Inference speed and resident weight bytes of compressed LLaMA layouts against the dense model.

Random weights of a LLaMA shape (default LLaMA-7B: hidden 4096, MLP 11008, 32 layers, 32 heads, vocabulary 32000)
in ``--dtype`` on one device, compressed as a run compresses it: the method's config composed from
``conf/method/<name>.yaml`` (with ``method.ratio`` and ``method.rank_multiple`` set from the command line) and
applied with ``Method.apply``, calibrated on ``--calib-samples`` random token windows of ``--calib-seqlen`` tokens
(speed and bytes depend on the stored structure, not on the fitted values). Layouts:

* ``lowrank``: the ``svd`` method, each decoder linear U (out x r) V (r x in);
* ``basis_sharing``: the ``basis_sharing`` method, shared bases resident once;
* ``geo_sharing``: the ``geo_sharing`` method (its sharing classes and ranks as its config chooses them).

``--kernels torch auto`` measures every compressed layout twice: ``torch``, the naive layout (each factor an
``F.linear``, separate q/k/v GEMMs), and ``auto``, the harness's inference layout (``methods.fuse``: one GEMM for
the factors that read the same input; ``methods.kernels``: the fused low-rank decode kernel on CUDA).

Measured per layout and ratio: prefill tokens/s at ``--batch x --seqlen`` (``torch.utils.benchmark``), batch-1
decode ms/token with a static KV cache, eager and with CUDA graphs (``--decode eager graph``), and the resident
weight bytes. ``--bytes-only`` skips the timing; the layouts are still built by the methods, so at the full
LLaMA-7B shape it costs each method's compression (SVDs and eigendecompositions of every layer: minutes on a GPU,
hours on a few CPU cores). ``--round-ranks 64`` sets ``method.rank_multiple=64`` (what the GPU's tiles want).

    python -m runners.bench_llm_speed --device cuda --round-ranks 64 --out results/bench/llm_speed_h100.json
    python -m runners.bench_llm_speed --hidden 64 --intermediate 160 --layers 2 --heads 4 --vocab 512 \\
        --seqlen 32 --decode eager                                   # a CPU smoke run

Prints a table (and each figure's ratio to dense) and writes it as JSON with the device, date and settings.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from methods import MethodConfig, kernels
from methods.fuse import inference_layout
from runners import measure
from runners.bench_method import apply_method, method_config, token_windows
from runners.record import write_benchmark
from tasks.adapters import LlamaAdapter

#: layout name -> the method (conf/method/<name>.yaml) that builds it
LAYOUTS = {"dense": None, "lowrank": "svd", "basis_sharing": "basis_sharing", "geo_sharing": "geo_sharing"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_dense(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    """A LLaMA of the requested shape with random weights, in ``args.dtype`` on ``device``, in eval mode."""
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(args.seqlen, args.prompt + args.tokens + args.warmup) + 8)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def layout_config(layout: str, ratio: float, round_ranks: int) -> MethodConfig:
    """The config of ``layout``'s method as a run composes it, at ``ratio`` with ``rank_multiple=round_ranks``."""
    return method_config(LAYOUTS[layout], f"method.ratio={ratio}", f"method.rank_multiple={round_ranks}")


def apply_layout(model: LlamaForCausalLM, layout: str, ratio: float, round_ranks: int, calib_samples: int = 2,
                 calib_seqlen: int = 16) -> dict[str, int]:
    """Compress ``model`` in place with ``layout``'s method at ``ratio`` (``method.rank_multiple=round_ranks``),
    calibrated on ``calib_samples`` random windows of ``calib_seqlen`` tokens; returns {role: rank of layer 0}."""
    cfg = layout_config(layout, ratio, round_ranks)
    device = next(model.parameters()).device
    apply_method(model, cfg, token_windows(model.config.vocab_size, calib_samples, calib_seqlen, device), device)
    adapter = LlamaAdapter(model)
    return {role: model.get_submodule(adapter.role_path(role, 0)).rank for role in adapter.roles}


def linear_params(model: nn.Module) -> int:
    """Unique parameters of the decoder blocks' linears (a shared basis once)."""
    seen, total = set(), 0
    for block in LlamaAdapter(model).blocks():
        for p in block.parameters():
            if p.dim() == 2 and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def measure_model(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), generator=gen).to(device)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=gen).to(device)
    out: dict[str, Any] = {"weight_bytes": measure.weight_bytes(model), "linear_params": linear_params(model)}
    if args.bytes_only:
        return out
    prefill = measure.latency(model, (ids,), args.batch * args.seqlen, args.warmup, args.min_run_time)
    out.update(prefill_tokens_per_s=prefill["throughput"], prefill_ms=prefill["latency_ms"])
    for mode in args.decode:
        torch.compiler.reset()
        d = measure.decode_latency(model, prompt, args.tokens, mode, args.warmup)
        out[f"decode_{mode}_ms"] = d["decode_ms_per_token"]
        out[f"decode_{mode}_iqr_ms"] = d["decode_iqr_ms"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5], help="fraction of linear parameters removed")
    ap.add_argument("--round-ranks", type=int, default=1,
                    help="method.rank_multiple: round ranks down to a multiple of this (1: off)")
    ap.add_argument("--calib-samples", type=int, default=4, help="random calibration windows per method")
    ap.add_argument("--calib-seqlen", type=int, default=128, help="tokens per calibration window")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1, help="prefill batch")
    ap.add_argument("--seqlen", type=int, default=2048, help="prefill tokens per sequence")
    ap.add_argument("--prompt", type=int, default=128, help="decode prompt tokens")
    ap.add_argument("--tokens", type=int, default=128, help="timed decode steps")
    ap.add_argument("--decode", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    ap.add_argument("--kernels", nargs="+", default=["torch", "auto"], choices=["torch", "auto"],
                    help="torch: naive layout; auto: fused input groups and Triton kernels (compressed layouts)")
    ap.add_argument("--bytes-only", action="store_true",
                    help="resident weight bytes and parameters only, no timing (any machine with the memory)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed prefills per model")
    ap.add_argument("--out", type=Path, default=Path("results/bench/llm_speed.json"))
    args = ap.parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if "graph" in args.decode and device.type != "cuda" and not args.bytes_only:
        raise SystemExit("--decode graph captures CUDA graphs: use --decode eager on the CPU")
    if not all(0 < r < 1 for r in args.ratios):
        raise SystemExit(f"--ratios {args.ratios}: every ratio must be in (0, 1)")
    if min(args.round_ranks, args.calib_samples, args.calib_seqlen) < 1:
        raise SystemExit("--round-ranks, --calib-samples and --calib-seqlen must be >= 1")
    rows, dense = [], None
    points = [("dense", 0.0, "torch")] + [(layout, ratio, mode) for layout in args.layouts if layout != "dense"
                                          for ratio in args.ratios for mode in args.kernels]
    for layout, ratio, _ in points[1:]:
        layout_config(layout, ratio, args.round_ranks)  # every config composes and validates before any compute
    for layout, ratio, mode in points:
        with kernels.backend(mode):
            model = build_dense(args, device)
            ranks = {} if layout == "dense" else apply_layout(model, layout, ratio, args.round_ranks,
                                                              args.calib_samples, args.calib_seqlen)
            protocol = inference_layout(model, LlamaAdapter(model), device)
            row = {"layout": layout, "ratio": ratio, "kernels": mode, "ran": protocol["protocol/kernels"],
                   "fused_input_groups": protocol["protocol/fused_input_groups"], "ranks": ranks,
                   **measure_model(model, args, device)}
            dense = dense or row
            row["removed_of_linear"] = 1 - row["linear_params"] / dense["linear_params"]
            for key in ("weight_bytes", "prefill_tokens_per_s", *(f"decode_{m}_ms" for m in args.decode)):
                if key in row:
                    row[f"{key}_vs_dense"] = row[key] / dense[key]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = write_benchmark(args.out, device, vars(args), rows=rows)
    head = f"{'layout':14s} {'kernels':7s} {'ratio':>5s} {'removed':>7s} {'weights GB':>10s} {'x':>5s}"
    if not args.bytes_only:
        head += f" {'prefill tok/s':>13s} {'x':>5s}" + "".join(f" {'decode ' + m + ' ms':>16s} {'x':>5s}"
                                                             for m in args.decode)
    print("\n" + head)
    for r in rows:
        line = (f"{r['layout']:14s} {r['kernels']:7s} {r['ratio']:5.2f} {r['removed_of_linear']:7.3f} "
                f"{r['weight_bytes'] / 1e9:10.3f} {r['weight_bytes_vs_dense']:5.3f}")
        if not args.bytes_only:
            line += f" {r['prefill_tokens_per_s']:13.0f} {r['prefill_tokens_per_s_vs_dense']:5.2f}"
            line += "".join(f" {r[f'decode_{m}_ms']:16.3f} {r[f'decode_{m}_ms_vs_dense']:5.2f}" for m in args.decode)
        print(line)
    print(f"device: {out['device'].get('gpu') or out['device']['cpu']}, {out['date']}; written to {args.out}")
    return out


if __name__ == "__main__":
    main()
