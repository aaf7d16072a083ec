"""Every GPU figure in one command: one JSON out, a table printed (about 8 minutes on one H100).

    python -m runners.bench_gpu                         # on a CUDA machine: results/bench/gpu.json
    python -m runners.bench_gpu --smoke                 # tiny shapes on the CPU (CI): checks every step runs
    python -m runners.bench_gpu --steps llm_speed ppl   # a subset

Steps, each timed and recorded (a failing step is recorded with its error and the others still run):

- ``kernels``: the Triton kernel tests (``tests/test_kernels.py``) compiled on CUDA (``--smoke``: a few of them,
  in Triton's interpreter);
- ``graphs``: every compressed family's inference layout captured into a CUDA graph and replayed, outputs
  compared with eager ones (``--smoke``: ``torch.compile(fullgraph=True)`` on the CPU, the same no-Python check);
- ``llm_speed``: ``bench_llm_speed`` at the LLaMA-7B shape, dense and low rank (naive layout ``--kernels torch``,
  which is also SVD-LLM's structure), Basis Sharing and Geo-Sharing at ratios 0.2 and 0.5, ranks rounded to 64;
- ``vision_speed``: ``bench_vision_speed`` (ResNet-20 STABLE-RPS, VGG-11, DeiT-B FiPS);
- ``compress``: Basis Sharing and Geo-Sharing compressing a LLaMA-7B-wide model of ``--compress-layers`` layers
  (time and peak memory per sub-stage; stages grow linearly with depth, so the 32-layer figure is scaled);
- ``ppl``: ``bench_ppl``, the harness's ``ppl_concat`` against a plain HF forward (bf16, batch 1, 2048 tokens).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from runners import bench_compress_cost, bench_llm_speed, bench_ppl, bench_vision_speed
from runners.record import CODE_ROOT, write_benchmark

STEPS = ("kernels", "graphs", "llm_speed", "vision_speed", "compress", "ppl")


def step_kernels(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """The kernel tests in a subprocess (on a GPU they compile with Triton; on the CPU they interpret)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    if args.smoke:
        cmd += ["-k", "bsr or csr"]
    proc = subprocess.run(cmd, cwd=CODE_ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        raise RuntimeError(f"kernel tests failed: {summary}\n{proc.stdout[-2000:]}")
    return {"summary": summary, "triton_compiled": device.type == "cuda"}


def _graph_cases(args: argparse.Namespace, device: torch.device) -> list[tuple[str, torch.nn.Module, Any]]:
    """(name, model in its inference layout on ``device``, inputs) for every compressed family."""
    from methods import kernels
    from methods.fuse import inference_layout
    from tasks.adapters import create_adapter

    llm = argparse.Namespace(vocab=128, hidden=128, intermediate=320, layers=2, heads=4, seqlen=16, prompt=4,
                             tokens=2, warmup=1, dtype="fp32")
    vit = argparse.Namespace(vit_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                                         "num_heads": 2, "mlp_ratio": 4}, fips_ratio=0.5, sparsity=0.75,
                             hashed_ratio=0.9)
    cases = []
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    for layout in bench_llm_speed.LAYOUTS:
        model = bench_llm_speed.build_dense(llm, device)
        if layout != "dense":
            bench_llm_speed.apply_layout(model, layout, 0.5, round_ranks=1)
        cases.append((f"llm_{layout}", model, {"input_ids": ids}))
    for name, block in (("resnet20", 1), ("deit_base", 1), ("deit_base", 16)):
        model, shape = bench_vision_speed.build(name, vit)
        method, _ = bench_vision_speed.compress(name, model, vit, block)
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
        cases.append((f"{name}_{method}", model.to(device).eval(), {"x": x.to(device)}))
    with torch.no_grad(), kernels.backend("auto"):
        for _, model, _ in cases:
            inference_layout(model, create_adapter(model), device)
    return cases


def _logits(out: Any) -> torch.Tensor:
    return getattr(out, "logits", out)


def step_graphs(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """Capture every family's inference layout: CUDA graphs on a GPU, ``torch.compile(fullgraph=True)`` on CPU."""
    import torch._dynamo

    from methods import kernels

    rows = {}
    for name, model, inputs in _graph_cases(args, device):
        with torch.no_grad(), kernels.backend("auto"):
            expected = _logits(model(**inputs))
            if device.type == "cuda":
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        model(**inputs)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = _logits(model(**inputs))
                graph.replay()
                torch.cuda.synchronize()
                got = static
            else:
                got = _logits(torch.compile(model, backend="eager", fullgraph=True)(**inputs))
                torch._dynamo.reset()
        err = float((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))
        if err > 1e-3:
            raise RuntimeError(f"{name}: captured output differs from eager (relative {err:.2e})")
        rows[name] = {"captured": "cuda_graph" if device.type == "cuda" else "torch.compile(fullgraph)",
                      "max_rel_err": err}
    return {"cases": rows}


def step_llm_speed(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    shape = (["--hidden", "64", "--intermediate", "160", "--layers", "2", "--heads", "4", "--vocab", "128",
              "--seqlen", "16", "--prompt", "4", "--tokens", "3", "--min-run-time", "0.01", "--warmup", "1",
              "--dtype", "fp32"] if args.smoke else
             ["--seqlen", "2048", "--prompt", "128", "--tokens", "64", "--min-run-time", "1", "--warmup", "3",
              "--dtype", "bf16"])
    res = bench_llm_speed.main(["--device", str(device), *shape, "--ratios", "0.2", "0.5", "--round-ranks",
                                "16" if args.smoke else "64", "--decode", "eager", "--out", str(out / "llm.json")])
    return {"rows": res["rows"]}


def step_vision_speed(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    extra = (["--models", "resnet20", "deit_base", "--batch", "2", "--min-run-time", "0.01", "--warmup", "1",
              "--vit-kwargs", '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, '
                              '"mlp_ratio": 4}'] if args.smoke else ["--min-run-time", "1"])
    res = bench_vision_speed.main(["--device", str(device), *extra, "--out", str(out / "vision.json")])
    return {"rows": res["rows"]}


def step_compress(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """Basis Sharing and Geo-Sharing on a LLaMA-7B-wide model of ``--compress-layers`` layers."""
    hidden, layers = (64, 2) if args.smoke else (4096, args.compress_layers)
    shape = argparse.Namespace(ratio=0.5, vocab=128 if args.smoke else 32000,
                               calib_samples=2 if args.smoke else args.calib_samples,
                               calib_seqlen=16 if args.smoke else 2048)
    rows = []
    for method in ("basis_sharing", "geo_sharing"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = bench_compress_cost.compress_point(method, hidden, layers, shape, device)
        row["scaled_to_32_layers_s"] = row["total_s"] * 32 / layers
        rows.append(row)
    return {"rows": rows}


def step_ppl(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    shape = (["--hidden", "64", "--intermediate", "160", "--layers", "2", "--heads", "4", "--vocab", "256",
              "--seqlen", "32", "--batch", "2", "--windows", "4", "--rounds", "2"] if args.smoke else
             ["--dtype", "bf16", "--hidden", "4096", "--intermediate", "11008", "--layers", "32", "--heads", "32",
              "--vocab", "32000", "--seqlen", "2048", "--batch", "1", "--windows", "8", "--rounds", "3"])
    res = bench_ppl.main(["--device", str(device), *shape, "--out", str(out / "ppl.json")])
    return {"rows": res["rows"], "harness_vs_plain": res["harness_vs_plain"]}


RUNNERS: dict[str, Callable[[argparse.Namespace, torch.device, Path], dict[str, Any]]] = {
    "kernels": step_kernels, "graphs": step_graphs, "llm_speed": step_llm_speed,
    "vision_speed": step_vision_speed, "compress": step_compress, "ppl": step_ppl}


def headline(name: str, res: dict[str, Any]) -> str:
    if name == "kernels":
        return res["summary"]
    if name == "graphs":
        return f"{len(res['cases'])} layouts captured"
    if name == "ppl":
        return f"harness / plain {res['harness_vs_plain']:.2f}x"
    if name == "compress":
        return ", ".join(f"{r['method']} {r['total_s']:.1f} s ({r['scaled_to_32_layers_s']:.0f} s at 32 layers)"
                         for r in res["rows"])
    return f"{len(res['rows'])} rows"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check that every step runs")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--compress-layers", type=int, default=4, help="layers of the LLaMA-7B-wide compression")
    ap.add_argument("--calib-samples", type=int, default=32, help="2048-token calibration windows (compress)")
    ap.add_argument("--out", type=Path, default=Path("results/bench/gpu.json"))
    args = ap.parse_args(argv)
    if args.compress_layers < 1 or args.calib_samples < 1:
        raise SystemExit("--compress-layers and --calib-samples must be >= 1")
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.steps:
            t0 = time.perf_counter()
            try:
                results[name] = {"status": "ok", **RUNNERS[name](args, device, Path(tmp))}
            except Exception as exc:  # noqa: BLE001 - recorded; the other steps still run
                results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()}
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[{name}] {results[name]['status']} in {results[name]['seconds']} s", flush=True)
    print(f"\n{'step':>13} {'status':>7} {'s':>7}  result")
    for name, res in results.items():
        text = headline(name, res) if res["status"] == "ok" else res["error"][:100]
        print(f"{name:>13} {res['status']:>7} {res['seconds']:>7}  {text}")
    return write_benchmark(args.out, device, vars(args), steps=results)


if __name__ == "__main__":
    main()
