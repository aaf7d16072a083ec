"""Efficiency measurements of a model on the run's device: latency (median, IQR), throughput, FLOPs, peak memory.

Latency uses ``torch.utils.benchmark.Timer.blocked_autorange`` (it synchronises CUDA) after explicit warm-up, in
inference mode, with all of torch's threads. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` and are
reported as FLOPs = 2 * MAC (``macs`` is recorded too). Peak memory is CUDA ``max_memory_allocated`` over one
forward, or on CPU the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just
before the forward so earlier stages do not count). Generative tasks also get batch-1 decode ms/token with a static
KV cache, eagerly or captured into CUDA graphs.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _forward(model: nn.Module, inputs: tuple[Any, ...]) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return model(*inputs)

    return run


def latency(model: nn.Module, inputs: tuple[Any, ...], items: int, warmup: int = 3,
            min_run_time_s: float = 0.5) -> dict[str, float]:
    """``latency_ms`` (median), ``latency_iqr_ms`` and ``throughput`` (items/s) of one forward on ``inputs``."""
    # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on machines without a GPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    fn = _forward(model, inputs)
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time_s)
    return {"latency_ms": m.median * 1e3, "latency_iqr_ms": m.iqr * 1e3, "throughput": items / m.median,
            "protocol/latency_repeats": len(m.times) * m.number_per_run}


def flops(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, float]:
    """Total FLOPs (2 per multiply-accumulate) and MACs of one forward on ``inputs``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*inputs)
    total = counter.get_total_flops()
    return {"flops": float(total), "macs": float(total) / 2, "protocol/flops_counter": "torch.utils.flop_counter"}


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(model: nn.Module, inputs: tuple[Any, ...], device: torch.device) -> dict[str, Any]:
    """Peak bytes during one forward: CUDA allocator peak, or the process RSS high-water mark on CPU."""
    fn = _forward(model, inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_mem_bytes": torch.cuda.max_memory_allocated(device),
                "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(device),
                "protocol/peak_mem": "cuda.max_memory_allocated"}
    reset = _reset_vm_hwm()
    fn()
    return {"peak_mem_bytes": _vm_hwm_bytes(),
            "protocol/peak_mem": "rss_high_water_mark" if reset else "rss_high_water_mark_process_lifetime"}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique tensors (parameters and buffers) resident on the model's devices."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_static_decode(model: nn.Module, prompt: torch.Tensor, n_steps: int, step: Callable[..., Any] | None = None
                         ) -> tuple[torch.Tensor, list[float]]:
    """Batch-1 greedy decode of a transformers causal LM with a ``StaticCache`` (static shapes, CUDA-graph safe).

    ``prompt`` [1, P] token ids is prefilled, then ``n_steps`` single-token steps of ``step`` (default
    ``model.forward``) run, each timed alone (CUDA synchronised). Returns the generated ids [1, n_steps + 1] (the
    prefill's prediction first) and the seconds of every step.
    """
    from transformers import StaticCache

    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"decode prompt must be [1, P] token ids, got {tuple(prompt.shape)}")
    device, n_prompt = prompt.device, prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n_prompt + n_steps)
    step = step or model.forward
    tokens, times = [], []
    with torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(n_prompt, device=device))
        tokens.append(out.logits[:, -1:].argmax(-1))
        for i in range(n_steps):
            position = torch.tensor([n_prompt + i], device=device)
            _sync(device)
            t0 = time.perf_counter()
            out = step(input_ids=tokens[-1], past_key_values=cache, use_cache=True, cache_position=position)
            tokens.append(out.logits[:, -1:].argmax(-1))
            _sync(device)
            times.append(time.perf_counter() - t0)
    return torch.cat(tokens, dim=1), times


def decode_latency(model: nn.Module, prompt: torch.Tensor, n_tokens: int, mode: str = "eager",
                   warmup: int = 3) -> dict[str, Any]:
    """``decode_ms_per_token`` (median) and ``decode_iqr_ms`` over ``n_tokens`` timed steps of
    ``greedy_static_decode`` after ``warmup`` untimed ones. ``mode="graph"`` compiles the step with
    ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs); compilation and capture happen in the
    warm-up steps."""
    if mode not in ("eager", "graph"):
        raise ValueError(f"decode mode {mode!r}; valid: eager, graph")
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if mode == "graph" else None
    _, times = greedy_static_decode(model, prompt, warmup + n_tokens, step)
    timed = times[warmup:]
    q = statistics.quantiles(timed, n=4) if len(timed) > 1 else [timed[0]] * 3
    return {"decode_ms_per_token": statistics.median(timed) * 1e3, "decode_iqr_ms": (q[2] - q[0]) * 1e3,
            "protocol/decode_mode": mode, "protocol/decode_batch": 1, "protocol/decode_prompt": prompt.shape[1],
            "protocol/decode_tokens": n_tokens, "protocol/decode_cache": "static"}
