"""The UNet forward run by ONNX Runtime on the CPU (the ``onnxruntime`` backend of ``autoddpm benchmark-speed``).

The float32 network is exported to ONNX with PyTorch's TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``, which needs the ``onnx``
package but not ``onnxscript``) into a temporary folder, with a dynamic batch
axis, and run by an ``onnxruntime.InferenceSession`` with the
CPUExecutionProvider and as many intra-op threads as PyTorch uses, which sleep
rather than spin while they wait. Inputs are
``x`` [B, C, N, N] float32 and ``t`` [B] int64, the output is epsilon like
``UNet.forward``. Install the packages with ``pip install "autoddpm[onnx]"``.

``OnnxRuntimeUNet`` wraps that forward as a stand-in for the UNet, which is how
``AutoDDPM(backend="onnxruntime")`` (``autoddpm run --backend``) runs the
pipeline through ONNX Runtime. This file imports torch only when a function
needs it, so the command line can name the backends without loading PyTorch.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

# What the export and the session need; torch itself is always there.
ONNX_PACKAGES: tuple[str, ...] = ("onnx", "onnxruntime")
ONNX_OPSET = 17
# How the engine may run its network: "auto" is ONNX Runtime when the device is the CPU and
# the packages are installed (faster per slice there, see `autoddpm benchmark-speed`), else torch.
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime")


def missing_onnx_packages() -> list[str]:
    """The packages of ONNX_PACKAGES that are not installed (empty when the backend can run)."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def unavailable_reason(device: "torch.device") -> Optional[str]:
    """Why ONNX Runtime cannot run the network on ``device``, with what to do (None when it can)."""
    if device.type != "cpu":
        return f"ONNX Runtime runs on the CPU only and the device is {device}; use --device cpu"
    missing = missing_onnx_packages()
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; pip install \"autoddpm[onnx]\""
    return None


def session_options(threads: int):
    """ONNX Runtime's settings for the network: ``threads`` intra-op threads that sleep while they wait."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # Beside a second job on the same cores, spinning threads take the cores that job needs
    # (cpu_sharing.py); alone, sleeping made no measurable difference.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnxruntime_forward(
    network: nn.Module,
    image_size: int,
    in_channels: int = 1,
    threads: Optional[int] = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Export a float32 copy of ``network`` to ONNX and return ``forward(x, t) -> epsilon`` run by ONNX Runtime.

    ``threads`` is ONNX Runtime's intra-op thread count (default: ``torch.get_num_threads()``).
    Raises ImportError when onnx or onnxruntime is missing, and whatever the
    exporter or ONNX Runtime raises when the network cannot be exported or loaded.
    """
    missing = missing_onnx_packages()
    if missing:
        raise ImportError(f"the onnxruntime backend needs {' and '.join(missing)}: pip install \"autoddpm[onnx]\"")
    import onnxruntime as ort
    import torch

    net = copy.deepcopy(network).to(device="cpu", dtype=torch.float32).eval()
    x = torch.zeros(2, in_channels, image_size, image_size, dtype=torch.float32)
    t = torch.zeros(2, dtype=torch.int64)
    options = session_options(threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="autoddpm-onnx-") as folder:
        path = Path(folder) / "unet.onnx"
        # The caller may be inside torch.inference_mode, under which tracing fails.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shapes read as Python numbers
            torch.onnx.export(
                net, (x, t), str(path), dynamo=False, opset_version=ONNX_OPSET,
                input_names=["x", "t"], output_names=["epsilon"],
                dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "epsilon": {0: "batch"}},
            )
        # Loaded from bytes, so no file stays open when the folder is removed (Windows).
        session = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        feeds = {
            "x": x.detach().to("cpu", torch.float32).contiguous().numpy(),
            "t": t.detach().to("cpu", torch.int64).contiguous().numpy(),
        }
        return torch.from_numpy(session.run(None, feeds)[0])

    return forward


class OnnxRuntimeUNet:
    """A UNet stand-in for the pipeline: ``unet(x, t) -> epsilon``, run by ONNX Runtime on the CPU.

    It has the network's ``config``, and ``device``/``dtype`` say where its
    inputs and outputs live (the CPU, float32); it cannot be moved to another
    device: build the torch network there instead.
    """

    def __init__(self, network: nn.Module, threads: Optional[int] = None) -> None:
        import torch

        self.config = network.config
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._forward = onnxruntime_forward(network, network.config.image_size, network.config.in_channels, threads)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._forward(x, t)
