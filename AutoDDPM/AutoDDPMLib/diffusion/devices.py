"""Which torch device to run on, and how to fall back when it runs out of memory."""

from __future__ import annotations

import torch

from ..errors import AutoDDPMError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA, then Apple MPS, then the CPU; an explicit choice must be available."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise AutoDDPMError(f"unknown device '{name}': choose one of {', '.join(DEVICE_CHOICES)}")
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AutoDDPMError("device 'cuda' requested but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not mps_available:
        raise AutoDDPMError("device 'mps' requested but this PyTorch has no Apple MPS support; use --device cpu or auto")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """The device for a report: the GPU's name, or the CPU and its thread count."""
    import platform

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory (CUDA or MPS)."""
    # torch.cuda.OutOfMemoryError exists on every torch the package accepts (>= 2.0), CPU-only builds included;
    # torch.OutOfMemoryError, its alias, only from 2.5. MPS raises a plain RuntimeError that says so.
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()
