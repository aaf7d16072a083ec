"""Perplexity-evaluation throughput: the harness's ``ppl_concat`` against a plain Hugging Face forward over the
same windows (same model, dtype, batch and device).

    python -m runners.bench_ppl                                  # CPU, a small random LLaMA, fp32
    python -m runners.bench_ppl --device cuda --dtype bf16 --hidden 4096 --intermediate 11008 --layers 4 \\
        --seqlen 2048 --batch 1 --windows 8 --out results/bench/ppl_h100.json

The plain baseline is what a user would write: ``model(input_ids=w, labels=w).loss`` under
``torch.inference_mode`` for every batch of windows. Both loops run ``--rounds`` times, interleaved (harness,
plain, harness, ...), after one untimed warm-up pass each; the median tokens/s of each and their ratio
(``harness_vs_plain``, >= 0.9 is the goal) are printed and written as JSON. Both perplexities are reported too:
they agree to float tolerance (the harness upcasts logits to float32 and sums in float64).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from runners.record import write_benchmark
from tasks.lm.perplexity import ppl_concat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_llama(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """A random-weight LLaMA of the given shape on ``device`` in ``--dtype``, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.seqlen)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(DTYPES[args.dtype])
    return model.eval()


def plain_ppl(model: torch.nn.Module, windows: torch.Tensor, batch: int, device: torch.device) -> float:
    """Perplexity by the plain HF loop: mean over batches of ``model(..., labels=...).loss`` (equal batches)."""
    losses = []
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch):
            w = windows[start:start + batch].to(device)
            losses.append(float(model(input_ids=w, labels=w, use_cache=False).loss))
    return float(torch.tensor(losses, dtype=torch.float64).mean().exp())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results/bench/ppl.json"))
    args = ap.parse_args(argv)
    if args.windows % args.batch or min(args.windows, args.batch, args.rounds) < 1 or args.seqlen < 2:
        raise SystemExit("--windows must be a positive multiple of --batch, --rounds >= 1, --seqlen >= 2")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    model = build_llama(args, device)
    ids = torch.randint(0, args.vocab, (args.windows * args.seqlen,), generator=torch.Generator().manual_seed(1))
    windows = ids.view(args.windows, args.seqlen)
    runs = {"harness": lambda: ppl_concat(model, ids, args.seqlen, args.batch, device, progress=False)["ppl"],
            "plain": lambda: plain_ppl(model, windows, args.batch, device)}
    ppl = {name: fn() for name, fn in runs.items()}  # warm-up, and the two perplexities
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    tokens = args.windows * args.seqlen
    rows = [{"loop": name, "tokens_per_s": tokens / statistics.median(t), "median_s": statistics.median(t),
             "ppl": ppl[name]} for name, t in times.items()]
    ratio = statistics.median(p / h for h, p in zip(times["harness"], times["plain"]))
    print(f"{'loop':>8} {'tokens/s':>10} {'ppl':>10}")
    for r in rows:
        print(f"{r['loop']:>8} {r['tokens_per_s']:>10.0f} {r['ppl']:>10.3f}")
    print(f"harness / plain throughput (paired median): {ratio:.3f}x")
    return write_benchmark(args.out, device, {**vars(args), "threads": torch.get_num_threads()}, rows=rows,
                           harness_vs_plain=ratio)


if __name__ == "__main__":
    main()
