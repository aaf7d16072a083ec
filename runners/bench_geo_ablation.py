"""Geo-Sharing ablation: Basis Sharing, then one Geo-Sharing step added at a time, at equal stored parameters.

Test beds: ``demo_lm`` (4 layers), a 12-layer LLaMA-architecture model trained here on WikiText-2 ``valid.txt``
(evaluated on ``test.txt``; ``--wikitext DIR``; trained once and cached under the cache directory), and the
``vit_fashion_mnist`` / ``swin_fashion_mnist`` tasks.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from core.io import file_lock, stable_hash, write_json_atomic


@dataclasses.dataclass
class WikiLlama:
    """Recipe of the 12-layer test bed: a LLaMA trained from scratch on ``valid.txt`` (AdamW, warm-up + cosine)."""

    vocab_size: int = 2048
    hidden_size: int = 96
    num_layers: int = 12
    num_heads: int = 4
    intermediate_size: int = 256
    seqlen: int = 128
    steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0


def ensure_wiki_llama(recipe: WikiLlama, wikitext: Path, cache_dir: Path) -> Path:
    """The trained model's ``save_pretrained`` directory under ``cache_dir``, training it first if needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.lm.corpora import encode_stream, file_sha256, read_text_file
    from tasks.lm.embedded import train_tokenizer

    train_file = wikitext / "valid.txt"
    key = stable_hash({"recipe": dataclasses.asdict(recipe), "data": file_sha256(train_file)})
    out = cache_dir / "geo_ablation" / f"wiki-llama-{key}"
    if (out / "recipe.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f"wiki-llama-{key}.lock"):
        if (out / "recipe.json").is_file():
            return out
        t0 = time.perf_counter()
        text = read_text_file(train_file)
        tokenizer = train_tokenizer([text], recipe.vocab_size)
        stream, _ = encode_stream(tokenizer, text, add_bos=True)
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
            num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
            num_key_value_heads=recipe.num_heads, max_position_embeddings=2048, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                lr=recipe.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup_steps) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * s / recipe.steps))))
        gen = torch.Generator().manual_seed(recipe.seed)
        offsets = torch.arange(recipe.seqlen)
        losses = []
        for step in range(recipe.steps):
            starts = torch.randint(0, stream.numel() - recipe.seqlen + 1, (recipe.batch_size, 1), generator=gen)
            batch = stream[starts + offsets]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 50 == 0:
                print(f"step {step} loss {losses[-1]:.3f} {time.perf_counter() - t0:.0f}s", flush=True)
        model.eval()
        model.config.use_cache = False
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        tail = losses[-max(1, len(losses) // 10):]
        write_json_atomic(out / "recipe.json", {**dataclasses.asdict(recipe), "train_tokens": stream.numel(),
                                                "final_train_loss": sum(tail) / len(tail),
                                                "train_s": time.perf_counter() - t0})
    return out


# -- the ablation ----------------------------------------------------------------------------------------------------
VARIANTS = {  # name -> method overrides; each adds one step to the row above it
    "basis_sharing": ["method=basis_sharing"],
    "+colouring": ["method=geo_sharing", "method.hessian=kfac"],
    "+loss curvature": ["method=geo_sharing", "method.colouring=adjacent", "method.beta=inf"],
    "+trust region": ["method=geo_sharing", "method.colouring=adjacent"],
    "geo_sharing": ["method=geo_sharing"],
}
BEDS = {  # name -> (task, overrides, main metric)
    "demo_lm": ("demo_lm", [], "ppl/demo"),
    "wiki_llama12": ("demo_lm", None, "ppl/wt2"),  # overrides filled in by ``wiki_overrides``
    "vit_fashion_mnist": ("vit_fashion_mnist", [], "acc/top1"),
    "swin_fashion_mnist": ("swin_fashion_mnist", [], "acc/top1"),
}
# Basis Sharing on timm models (its configs cover LLaMA only): Geo-Sharing's input-only metric on adjacent pairs of
# the roles it colours, per Swin stage (equal to basis_sharing on LLaMA, tests/test_geo_sharing.py)
TIMM_BASIS_SHARING = ["method=geo_sharing", "method.hessian=kfac", "method.colouring=adjacent"]


def wiki_overrides(model_dir: Path, wikitext: Path, windows: int, calib: int) -> list[str]:
    """The 12-layer model as an ``hf_lm`` task: calibration windows of ``valid.txt`` (its training text),
    perplexity over the first ``windows`` 128-token windows of ``test.txt``."""
    return ["task.name=wiki_llama12", f"task.model={model_dir.resolve()}", "task.eval.datasets=[]",
            f"+task.eval.text_files.wt2={(wikitext / 'test.txt').resolve()}", f"task.eval.max_windows={windows}",
            "task.calib.dataset=null", f"task.calib.text_files=[{(wikitext / 'valid.txt').resolve()}]",
            f"task.calib.n_samples={calib}"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return hydra_compose("run", overrides=overrides)


def run_bed(task_name: str, task_overrides: list[str], metric: str, ratios: list[float],
            variants: dict[str, list[str]], common: list[str]) -> list[dict[str, Any]]:
    """Every variant at every ratio on one test bed, from one dense model: {variant, ratio, metric, seconds,
    removed_fraction, method metrics}."""
    from methods import CompressContext
    from runners import accounting
    from runners.plan import plan
    from tasks.adapters import create_adapter

    first = plan(compose([f"task={task_name}", *task_overrides, "method=dense", *common]))
    task, device = first.task, first.device
    dense_model = task.build_model(0)
    state = {k: v.clone() for k, v in dense_model.state_dict().items()}
    rows = [{"variant": "dense", "ratio": 0.0, **{k: v for k, v in task.evaluate(dense_model).items()
                                                  if isinstance(v, float) and not k.startswith("protocol/")}}]
    print(rows[-1], flush=True)
    for ratio in ratios:
        for name, overrides in variants.items():
            if name == "basis_sharing" and "fashion" in task_name:
                overrides = TIMM_BASIS_SHARING
            p = plan(compose([f"task={task_name}", *task_overrides, *overrides, f"method.ratio={ratio}", *common]))
            model = task.build_model(0)
            model.load_state_dict(state)
            adapter = create_adapter(model)
            p.method.check(adapter)
            scope = adapter.scope(p.method.cfg.scope)
            dense_counts = accounting.dense_counts(model, scope)
            t0 = time.perf_counter()
            out = p.method.apply(model, adapter, CompressContext(task, device, 0, progress=False))
            seconds = time.perf_counter() - t0
            counts = accounting.compressed_counts(model, {q: model.get_submodule(q) for q in scope}, dense_counts)
            quality = {k: v for k, v in task.evaluate(model).items()
                       if isinstance(v, float) and not k.startswith("protocol/")}
            rows.append({"variant": name, "ratio": ratio, **quality, "seconds": seconds,
                         "removed_fraction": counts["scope/removed_fraction"],
                         **{k: v for k, v in out.items() if k.startswith("method/")}})
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """Markdown: one line per variant, one column per ratio, the metric (compression seconds in brackets)."""
    ratios = sorted({r["ratio"] for r in rows if r["variant"] != "dense"})
    dense = next(r[metric] for r in rows if r["variant"] == "dense")
    lines = [f"| variant (dense {dense:.4g}) | " + " | ".join(f"r={r:g}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for name in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "dense"):
        cells = {r["ratio"]: f"{r[metric]:.{2 if r[metric] > 2 else 4}f} ({r['seconds']:.1f} s)"
                 for r in rows if r["variant"] == name}
        lines.append(f"| {name} | " + " | ".join(cells.get(r, "") for r in ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from runners.record import write_benchmark

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beds", default="demo_lm,wiki_llama12", help=f"comma-separated, of {', '.join(BEDS)}")
    ap.add_argument("--ratios", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    ap.add_argument("--betas", default="", help="instead of the variants: geo_sharing at these beta (e.g. 0,1,10,inf)")
    ap.add_argument("--colouring", default="adjacent", help="the beta sweep's colouring")
    ap.add_argument("--wikitext", type=Path, default=Path("../shared/data/wikitext-2"),
                    help="folder with WikiText-2 valid.txt (training, calibration) and test.txt (evaluation)")
    ap.add_argument("--windows", type=int, default=256, help="test windows of the 12-layer model")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of the 12-layer model")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/compbench"))
    ap.add_argument("--out", type=Path, default=Path("results/bench/geo_ablation.json"))
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.betas:
        variants = {f"beta={b}": ["method=geo_sharing", f"method.colouring={args.colouring}",
                                  f"method.beta={b}"] for b in args.betas.split(",")}
    else:
        variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    common = ["logger=none", "progress=false", f"cache_dir={args.cache_dir}"]
    results = {}
    for bed in args.beds.split(","):
        task_name, overrides, metric = BEDS[bed]
        if overrides is None:
            model_dir = ensure_wiki_llama(WikiLlama(), args.wikitext, args.cache_dir)
            overrides = wiki_overrides(model_dir, args.wikitext, args.windows, args.calib)
        results[bed] = run_bed(task_name, overrides, metric, ratios, variants, common)
        print(f"\n{bed} ({metric})\n" + table(results[bed], metric), flush=True)
    write_benchmark(args.out, torch.device("cpu"), {**vars(args), "threads": torch.get_num_threads()},
                    results=results)


if __name__ == "__main__":
    main()
