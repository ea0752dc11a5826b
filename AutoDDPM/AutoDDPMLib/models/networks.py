"""The card's network as the engine runs it: the torch UNet or its ONNX Runtime export.

Shared by ``autoddpm run`` (inference), calibration and the benchmark, so that
all three run the network the same way. Imports no SimpleITK: the benchmark runs
from a prepared file on machines without it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..diffusion.onnx_backend import BACKENDS
from ..errors import AutoDDPMError
from .bundle import ModelCard, load_unet


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def load_network(card: ModelCard, device: torch.device, backend: str = "auto") -> tuple[Callable, str, str | None]:
    """The card's network as ``unet(x, t) -> epsilon`` for ``backend``; returns (network, backend run, why).

    ``torch``: the UNet module, in channels_last on the CPU. ``onnxruntime``:
    exported to ONNX and run by ONNX Runtime (CPU only, needs the optional
    packages; else an AutoDDPMError says what is missing). ``auto``: ONNX Runtime
    where it can run, else torch; "why" says why torch runs instead (None when
    ONNX Runtime runs or torch was asked for).
    """
    from ..diffusion import onnx_backend

    if backend not in BACKENDS:
        raise AutoDDPMError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    reason = None if backend == "torch" else onnx_backend.unavailable_reason(device)
    if reason and backend == "onnxruntime":
        raise AutoDDPMError(f"backend 'onnxruntime' cannot run: {reason} or use --backend torch")
    unet = load_unet(card, device)
    if backend != "torch" and reason is None:
        try:
            return onnx_backend.OnnxRuntimeUNet(unet), "onnxruntime", None
        except Exception as error:  # an export or session failure: an error if asked for, else torch runs
            reason = f"exporting model {card.name} to ONNX Runtime failed ({_first_line(error)})"
            if backend == "onnxruntime":
                raise AutoDDPMError(f"backend 'onnxruntime' cannot run: {reason}; use --backend torch") from error
    if device.type == "cpu":
        # Measured with `autoddpm benchmark-speed` (Resources/Benchmark/speed): 1.3-1.6x faster than the default
        # layout at batch 16 on a 2-core CPU (32 vs 42 and 29 vs 45 ms per slice in two runs), same results to 6e-6.
        unet = unet.to(memory_format=torch.channels_last)
    return unet, "torch", reason
