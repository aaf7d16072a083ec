"""Peak-memory probes shared by measurements and compression stages: the CUDA allocator's peak, or on the CPU the
process's resident-set high-water mark (Linux VmHWM, resettable through ``/proc/self/clear_refs``)."""
from __future__ import annotations

from pathlib import Path

import torch


def vm_hwm_bytes() -> int | None:
    """The process's resident-set high-water mark (VmHWM) in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_vm_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs``); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_kind(device: torch.device) -> str:
    """What ``peak_bytes`` measures on ``device``: ``cuda.max_memory_allocated`` or ``process_rss_high_water_mark``."""
    return "cuda.max_memory_allocated" if device.type == "cuda" else "process_rss_high_water_mark"


def reset_peak(device: torch.device) -> None:
    """Start a new peak window on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_vm_hwm()


def peak_bytes(device: torch.device) -> int:
    """Peak bytes since the last ``reset_peak`` (see ``peak_kind``); 0 where the platform cannot tell."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return vm_hwm_bytes() or 0
