"""Efficiency measurements of a model on the run's device: latency (median, IQR), throughput, FLOPs, memory.

Latency: after explicit warm-up, blocks of calls timed by ``torch.utils.benchmark`` (it synchronises CUDA), in
inference mode, until at least ``min_repeats`` blocks and ``min_run_time_s`` seconds; the median and IQR over the
blocks are recorded, and a result whose IQR / median exceeds a threshold is marked ``latency_noisy``. A compressed
model and its dense model are timed interleaved (A, B, A, B, ...) in one process, so their ratio
(``speedup/latency``) holds when the machine's speed drifts. FLOPs come from ``torch.utils.flop_counter`` and are
reported as FLOPs = 2 * MAC (``macs`` too). Memory is attributed to the model: resident weights, and the
allocator's peak above them during one forward (CUDA ``max_memory_allocated``; on CPU torch's profiler memory
events); the process's RSS high-water mark is recorded apart under a name that says so. Generative tasks also get
batch-1 decode ms/token with a static KV cache, eagerly or captured into CUDA graphs.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from core import memory
from core.io import stable_hash


def _forward(model: nn.Module, inputs: tuple[Any, ...]) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return model(*inputs)

    return run


def _block_seconds(fn: Callable[[], Any], number: int) -> float:
    """Mean seconds per call of ``number`` back-to-back calls (``torch.utils.benchmark``, CUDA synchronised)."""
    # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on machines without a GPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(number).mean


def _summary(times: list[float], items: int, noisy_rel_iqr: float, prefix: str = "") -> dict[str, Any]:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [med] * 3
    iqr = q[2] - q[0]
    return {f"{prefix}latency_ms": med * 1e3, f"{prefix}latency_iqr_ms": iqr * 1e3, f"{prefix}throughput": items / med,
            f"{prefix}latency_repeats": len(times), f"{prefix}latency_noisy": bool(iqr > noisy_rel_iqr * med)}


def timed_blocks(fns: list[Callable[[], Any]], warmup: int = 3, min_run_time_s: float = 0.5, min_repeats: int = 10
                 ) -> list[list[float]]:
    """Interleaved timing of several callables: after ``warmup`` calls of each, rounds of one block per callable
    (A, B, A, B, ...) until every callable has at least ``min_repeats`` blocks and ``min_run_time_s`` seconds.
    A block is as many calls as fill ``min_run_time_s / min_repeats`` seconds (at least one); returns the mean
    seconds per call of every block, per callable. Interleaving keeps a ratio true when the machine's speed
    drifts (frequency scaling, neighbours)."""
    numbers = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        one = _block_seconds(fn, 1)
        numbers.append(max(1, int(min_run_time_s / max(min_repeats, 1) / max(one, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    spent = [0.0] * len(fns)
    while min(len(t) for t in times) < min_repeats or min(spent) < min_run_time_s:
        for i, fn in enumerate(fns):
            t = _block_seconds(fn, numbers[i])
            times[i].append(t)
            spent[i] += t * numbers[i]
    return times


def latency(model: nn.Module, inputs: tuple[Any, ...], items: int, warmup: int = 3, min_run_time_s: float = 0.5,
            min_repeats: int = 10, noisy_rel_iqr: float = 0.1) -> dict[str, Any]:
    """``latency_ms`` (median over ``latency_repeats`` timed blocks), ``latency_iqr_ms``, ``throughput``
    (items/s) and ``latency_noisy`` (IQR / median above ``noisy_rel_iqr``) of one forward on ``inputs``."""
    (times,) = timed_blocks([_forward(model, inputs)], warmup, min_run_time_s, min_repeats)
    return _summary(times, items, noisy_rel_iqr)


def paired_latency(model: nn.Module, dense: nn.Module, inputs: tuple[Any, ...], items: int, warmup: int = 3,
                   min_run_time_s: float = 0.5, min_repeats: int = 10, noisy_rel_iqr: float = 0.1
                   ) -> dict[str, Any]:
    """``latency`` of ``model`` and (``dense/`` prefix) of ``dense``, timed interleaved in this process, and
    ``speedup/latency``: the median over rounds of dense time / model time (> 1: the model is faster)."""
    times, dense_times = timed_blocks([_forward(model, inputs), _forward(dense, inputs)], warmup, min_run_time_s,
                                      min_repeats)
    out = _summary(times, items, noisy_rel_iqr)
    out.update(_summary(dense_times, items, noisy_rel_iqr, prefix="dense/"))
    out["speedup/latency"] = statistics.median(d / t for d, t in zip(dense_times, times))
    return out


def flops(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, float]:
    """Total FLOPs (2 per multiply-accumulate) and MACs of one forward on ``inputs``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*inputs)
    total = counter.get_total_flops()
    return {"flops": float(total), "macs": float(total) / 2, "protocol/flops_counter": "torch.utils.flop_counter"}


def cpu_alloc_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes that ``fn()`` holds allocated through torch's CPU allocator above what was allocated before it:
    the running sum of the allocation and free events torch's profiler records (``profile_memory``), per thread
    in order; allocations of worker threads add their own peaks (an upper bound). The legacy profiler is used
    because starting Kineto costs seconds on machines without a GPU driver."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.autograd import ProfilerConfig, ProfilerState, _disable_profiler_legacy, _enable_profiler_legacy

    _enable_profiler_legacy(ProfilerConfig(ProfilerState.CPU, False, True, False, False, False,
                                           _ExperimentalConfig()))
    try:
        fn()
    finally:
        records = _disable_profiler_legacy()
    peak = 0
    for thread in records:
        current = thread_peak = 0
        for r in thread:
            if r.kind() == "memory_alloc":
                current += r.cpu_memory_usage()
                thread_peak = max(thread_peak, current)
        peak += thread_peak
    return peak


def peak_memory(model: nn.Module, inputs: tuple[Any, ...], device: torch.device) -> dict[str, Any]:
    """Memory of one forward on ``inputs``, attributed to the model:

    - ``forward_peak_bytes``: activations and workspace, the allocator's peak above what was allocated before the
      forward (CUDA ``max_memory_allocated``; CPU: torch's profiler memory events, ``cpu_alloc_peak``);
    - ``peak_mem_bytes``: the model's peak, resident weights + ``forward_peak_bytes`` (CUDA: the allocator's peak);
    - ``process_rss_peak_bytes``: the whole process's RSS high-water mark over the forward (interpreter,
      libraries, data and other models included): never the model's memory, kept apart under its own name.
    """
    fn = _forward(model, inputs)
    fn()  # lazily created workspaces (oneDNN, cuBLAS) are one-time: count the steady state
    out: dict[str, Any] = {}
    rss_reset = memory.reset_vm_hwm()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update({"peak_mem_bytes": peak, "forward_peak_bytes": peak - before,
                    "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(device),
                    "protocol/peak_mem": "cuda.max_memory_allocated"})
    else:
        forward = cpu_alloc_peak(fn)
        out.update({"peak_mem_bytes": weight_bytes(model) + forward, "forward_peak_bytes": forward,
                    "protocol/peak_mem": "weight_bytes+profiler_cpu_alloc_peak"})
    out["process_rss_peak_bytes"] = memory.vm_hwm_bytes()
    out["protocol/process_rss_peak"] = "vm_hwm_over_forward" if rss_reset else "vm_hwm_process_lifetime"
    return out


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
                   warmup: int = 3, noisy_rel_iqr: float = 0.1) -> dict[str, Any]:
    """``decode_ms_per_token`` (median) and ``decode_iqr_ms`` over ``n_tokens`` timed steps of
    ``greedy_static_decode`` after ``warmup`` untimed ones; ``decode_noisy``: IQR / median above
    ``noisy_rel_iqr``. ``mode="graph"`` compiles the step with ``torch.compile(mode="reduce-overhead",
    fullgraph=True)`` (CUDA graphs); compilation and capture happen in the warm-up steps."""
    if mode not in ("eager", "graph"):
        raise ValueError(f"decode mode {mode!r}; valid: eager, graph")
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if mode == "graph" else None
    _, times = greedy_static_decode(model, prompt, warmup + n_tokens, step)
    timed = times[warmup:]
    q = statistics.quantiles(timed, n=4) if len(timed) > 1 else [timed[0]] * 3
    med = statistics.median(timed)
    return {"decode_ms_per_token": med * 1e3, "decode_iqr_ms": (q[2] - q[0]) * 1e3,
            "decode_noisy": bool(q[2] - q[0] > noisy_rel_iqr * med),
            "protocol/decode_mode": mode, "protocol/decode_batch": 1, "protocol/decode_prompt": prompt.shape[1],
            "protocol/decode_tokens": n_tokens, "protocol/decode_cache": "static"}


def settings_hash(settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    """The identity of a measurement: a hash of the run's ``measure`` settings and the task's measured input
    shapes (``task.measure``), recorded as ``protocol/measure_hash``; a done run whose hash differs is re-measured."""
    return stable_hash({"measure": settings, "inputs": inputs})
