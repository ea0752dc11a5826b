"""What ITK does not say about a NIfTI file, read from its header and voxel bytes.

ITK reads a truncated NIfTI as zeros, NaN and Inf voxels as 0, and replaces a
sheared or rescaled sform with another voxel grid, each with at most a warning.
These readers let volume_io refuse such files with one clear line instead.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

# NIfTI datatype codes of float32 and float64 voxels: ITK reads their NaN and Inf as 0, so they are scanned here.
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
# How far a voxel grid's direction cosines may be from a rotation, and a NIfTI sform's scales from pixdim, before
# ITK replaces the grid (ITK's own tolerances): the outputs would then not line up with the input.
GRID_TOLERANCE = 1e-4
SCALE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class NiftiHeader:
    """What the checks need from a NIfTI-1 or NIfTI-2 header."""

    byte_order: str  # "<" or ">", as struct and numpy spell it
    datatype: int
    bitpix: int
    voxel_offset: int
    voxels: int
    extents: tuple[int, ...]  # dim[1..dim[0]]: voxels along each axis, as the header declares them
    spatial_pixdim: tuple[float, ...]  # pixdim[1..3] of the axes the image has, as stored (sign included)
    voxel_sizes: np.ndarray  # pixdim[1:4], millimetres
    sform_code: int
    sform: np.ndarray  # 3x4: voxel index -> RAS millimetres


def _parseread_nifti_header(header: bytes) -> Optional[NiftiHeader]:
    """The header's fields, or None when the bytes are no NIfTI header (ITK then judges the file)."""
    for order in "<>":
        (size,) = struct.unpack(order + "i", header[:4])
        if size == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            pixdim = struct.unpack(order + "8f", header[76:108])
            (offset,) = struct.unpack(order + "f", header[108:112])
            (sform_code,) = struct.unpack(order + "h", header[254:256])
            rows = struct.unpack(order + "12f", header[280:328])
        elif size == 540 and len(header) >= 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            pixdim = struct.unpack(order + "8d", header[104:168])
            (offset,) = struct.unpack(order + "q", header[168:176])
            (sform_code,) = struct.unpack(order + "i", header[348:352])
            rows = struct.unpack(order + "12d", header[400:496])
        else:
            continue
        extents = tuple(int(extent) for extent in dims[1 : 1 + max(0, min(dims[0], 7))])
        voxels = math.prod(max(extent, 1) for extent in extents)
        return NiftiHeader(order, datatype, bitpix, int(offset), voxels, extents, tuple(pixdim[1 : 1 + min(len(extents), 3)]),
                           np.abs(pixdim[1:4]), sform_code, np.array(rows).reshape(3, 4))
    return None


def read_nifti_header(path: Path) -> Optional[NiftiHeader]:
    """The header of a NIfTI file, or None when there is none to read (ITK then says why)."""
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as stream:
            raw = stream.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    return _parseread_nifti_header(raw) if len(raw) >= 348 else None


def empty_nifti_axis(header: NiftiHeader) -> Optional[int]:
    """The first axis (1-based, as dim[] counts) whose declared size is 0 or negative: ITK reads it as 1."""
    return next((axis for axis, extent in enumerate(header.extents, 1) if extent < 1), None)


def bad_nifti_voxel_size(header: NiftiHeader) -> Optional[int]:
    """The first spatial axis (1-based) of more than one voxel whose pixdim is not a positive number.

    ITK reads a zero or NaN voxel size as 1 mm and a negative one as a mirrored axis that the
    sform does not state: either way the outputs' grid would not be the input's.
    """
    return next((axis for axis, (extent, size) in enumerate(zip(header.extents, header.spatial_pixdim), 1)
                 if extent > 1 and not (math.isfinite(size) and size > 0)), None)


def nifti_grid_changed(header: NiftiHeader) -> bool:
    """Whether ITK would read another voxel grid than the file's sform states.

    ITK keeps only a rotation and pixdim's voxel sizes, with its own tolerances:
    it replaces a sheared sform by the qform (or fails) and a rescaled one by
    pixdim's sizes, printing multi-line warnings either way.
    """
    if header.sform_code <= 0:
        return False
    matrix = header.sform[:, :3]
    scales = np.linalg.norm(matrix, axis=0)
    if np.abs(scales - header.voxel_sizes).max() > SCALE_TOLERANCE_MM or not np.all(scales > 0):
        return True
    rotation = matrix / scales
    return bool(np.abs(rotation @ rotation.T - np.eye(3)).max() > GRID_TOLERANCE)


def scan_nifti_voxels(path: Path, header: NiftiHeader) -> tuple[bool, bool]:
    """Whether voxel bytes are missing, and whether a float voxel is NaN or infinite.

    ITK fills a truncated NIfTI (e.g. an interrupted download) with zeros and reads
    NaN/Inf as 0, without complaint: either would silently become a "lesion-free"
    black region. NRRD and MetaImage readers already fail on truncated files and
    keep NaN/Inf, which ``read_volume`` refuses.
    """
    compressed = path.name.lower().endswith(".gz")
    expected = header.voxels * header.bitpix // 8
    float_type = NIFTI_FLOAT_TYPES.get(header.datatype)
    if not compressed and float_type is None:
        return path.stat().st_size < header.voxel_offset + expected, False
    dtype = None if float_type is None else np.dtype(header.byte_order + float_type)
    received, finite = 0, True
    try:
        with (gzip.open if compressed else open)(path, "rb") as stream:
            stream.seek(header.voxel_offset)
            while received < expected:
                # 1 MiB at a time: a whole volume need not fit in memory twice.
                chunk = stream.read(min(1 << 20, expected - received))
                if not chunk:
                    break
                received += len(chunk)
                if dtype is not None and finite:
                    whole = len(chunk) - len(chunk) % dtype.itemsize
                    finite = bool(np.isfinite(np.frombuffer(chunk[:whole], dtype)).all())
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return True, not finite
    return received < expected, not finite
