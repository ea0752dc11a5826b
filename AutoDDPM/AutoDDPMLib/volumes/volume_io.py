"""Reading input volumes and writing results.

Every problem a user can fix (wrong path, unsupported or broken file, an image
that is not a single scalar volume, no signal) becomes an ``AutoDDPMError``
whose one-line message names the file and what to do. Outputs are written
atomically so an interrupted or failed run never leaves a half-written file.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Dict, Iterable, Union

import numpy as np
import SimpleITK as sitk

from ..errors import AutoDDPMError

PathLike = Union[str, "os.PathLike[str]"]

# Longest first, so ".nii.gz" wins over ".gz"; compared case-insensitively.
_KNOWN_SUFFIXES = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd",
    ".png", ".jpg", ".jpeg", ".dcm",
)
# What a plain folder's files count as volumes (DICOM slices are read as a series instead).
_VOLUME_SUFFIXES = tuple(suffix for suffix in _KNOWN_SUFFIXES if suffix != ".dcm")

# What to tell the user when SimpleITK cannot make sense of a file.
_SUPPORTED = "NIfTI (.nii/.nii.gz), NRRD, MetaImage (.mha/.mhd), PNG/JPEG or a DICOM series folder"


def _first_line(error: Exception) -> str:
    """The most telling line of an ITK exception (they span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK puts "ITK ERROR: <class>(<address>): <what went wrong>" after a file:line header.
    for line in lines:
        if "ERROR" in line:
            return line.split("): ", 1)[-1]
    return lines[-1] if lines else type(error).__name__


def _suffix(path: Path) -> str:
    """The file's extension as SimpleITK sees it (".nii.gz" counts as one)."""
    name = path.name.lower()
    for suffix in _KNOWN_SUFFIXES:
        if name.endswith(suffix):
            return path.name[len(path.name) - len(suffix):]
    return path.suffix


def input_stem(path: PathLike) -> str:
    """The input's name without its image extension (a DICOM folder: the folder's name).

    Used to name outputs after their input, e.g. ``sub-01_T2w.nii.gz`` -> ``sub-01_T2w``.
    """
    path = Path(path)
    suffix = _suffix(path)
    if path.is_dir() or not suffix:
        return path.name
    return path.name[: -len(suffix)]


def _dicom_series_ids(folder: Path) -> tuple[str, ...]:
    """The DICOM series in ``folder`` (none for a folder of other files)."""
    # GDCM prints a warning for a folder without series; the callers say it better.
    warnings_were_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.GlobalWarningDisplayOff()
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:
        raise AutoDDPMError(
            f"cannot scan folder {folder} for DICOM files ({_first_line(error)}); "
            "check that the folder is readable"
        ) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_were_shown)


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """Reads the first DICOM series found in ``folder``."""
    series_ids = _dicom_series_ids(folder)
    if not series_ids:
        raise AutoDDPMError(
            f"folder {folder} holds no DICOM series; give a folder of DICOM slices "
            f"or a single image file ({_SUPPORTED})"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise AutoDDPMError(
            f"cannot read the DICOM series in {folder} ({_first_line(error)}); "
            "check that the files are complete image slices of one series"
        ) from None


def expand_inputs(paths: Iterable[PathLike], skip_endings: tuple[str, ...] = ()) -> tuple[list[Path], list[Path]]:
    """The volumes to process for the paths a user gave, and the files passed over.

    A file stays as it is, and so does a folder holding a DICOM series (it is one
    volume). Any other folder stands for the image files directly inside it, in
    name order, except hidden files and those whose name ends with one of
    ``skip_endings`` (e.g. the outputs of an earlier run, or lesion masks): that is
    how a whole cohort is processed with one command. Paths that do not exist are
    kept, so that reading them reports the problem per input.

    Raises AutoDDPMError for a folder with neither a DICOM series nor image files.
    """
    volumes: list[Path] = []
    skipped: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir() or _dicom_series_ids(path):
            volumes.append(path)
            continue
        images = sorted(
            child for child in path.iterdir()
            if child.is_file() and not child.name.startswith(".")
            and _suffix(child).lower() in _VOLUME_SUFFIXES
        )
        passed_over = [image for image in images if image.name.endswith(skip_endings)]
        if len(passed_over) == len(images):
            raise AutoDDPMError(
                f"folder {path} holds no DICOM series and no image files"
                + (f" other than {len(passed_over)} named like masks or earlier outputs ({', '.join(skip_endings)})" if passed_over else "")
                + f"; give image files, a folder of them or a DICOM series folder ({_SUPPORTED})"
            )
        volumes.extend(image for image in images if image not in passed_over)
        skipped.extend(passed_over)
    return volumes, skipped


def _nifti_bytes_missing(path: Path) -> bool:
    """Whether a NIfTI file holds fewer voxel bytes than its header promises.

    ITK fills a truncated NIfTI (e.g. an interrupted download) with zeros without
    complaint, which would silently become a "lesion-free" black region; NRRD and
    MetaImage readers already fail on such files.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(540)
            if len(header) < 348:
                return True
            # NIfTI-1 headers are 348 bytes, NIfTI-2 540; either byte order.
            for order in "<>":
                (size,) = struct.unpack(order + "i", header[:4])
                if size == 348:
                    dims = struct.unpack(order + "8h", header[40:56])
                    (bitpix,) = struct.unpack(order + "h", header[72:74])
                    (offset,) = struct.unpack(order + "f", header[108:112])
                    break
                if size == 540:
                    dims = struct.unpack(order + "8q", header[16:80])
                    (bitpix,) = struct.unpack(order + "h", header[14:16])
                    (offset,) = struct.unpack(order + "q", header[168:176])
                    break
            else:
                return False  # not a NIfTI header after all: let ITK judge it
            voxels = 1
            for extent in dims[1 : 1 + max(0, min(dims[0], 7))]:
                voxels *= max(int(extent), 1)
            expected = int(offset) + voxels * bitpix // 8
            if opener is open:
                return path.stat().st_size < expected
            received = len(header)
            while received < expected:
                chunk = stream.read(1 << 20)
                if not chunk:
                    return True
                received += len(chunk)
            return False
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return True


def _to_scalar(image: sitk.Image, path: Path) -> sitk.Image:
    """One component per voxel: greyscale stored as RGB(A) is accepted, colour is not."""
    components = image.GetNumberOfComponentsPerPixel()
    if components == 1:
        return image
    channels = [sitk.VectorIndexSelectionCast(image, c) for c in range(components)]
    arrays = [sitk.GetArrayViewFromImage(channel) for channel in channels]
    # Greyscale exports from image viewers are often RGBA/LA PNGs with an opaque alpha.
    if _suffix(path).lower() == ".png" and components in (2, 4) and np.all(arrays[-1] == arrays[-1].flat[0]):
        arrays = arrays[:-1]
    if all(np.array_equal(arrays[0], other) for other in arrays[1:]):
        return channels[0]
    raise AutoDDPMError(
        f"{path} is a colour or multi-component image ({components} values per voxel); "
        "give a single greyscale MRI volume (one value per voxel)"
    )


def _to_3d(image: sitk.Image, path: Path) -> sitk.Image:
    """A 3D image: a 2D image becomes one slice, a 4D image with one time point loses that axis."""
    dimension = image.GetDimension()
    if dimension == 3:
        return image
    if dimension == 2:
        volume = sitk.JoinSeries(image)
        spacing = image.GetSpacing()
        origin = image.GetOrigin()
        d = image.GetDirection()
        volume.SetSpacing((spacing[0], spacing[1], 1.0))
        volume.SetOrigin((origin[0], origin[1], 0.0))
        volume.SetDirection((d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))
        return volume
    if dimension == 4 and image.GetSize()[3] == 1:
        # Some writers (NRRD, MetaImage) keep a singleton time axis on plain 3D volumes.
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size, [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    raise AutoDDPMError(
        f"{path} is a {dimension}D image of size {'x'.join(map(str, image.GetSize()))}; "
        "give a single 3D volume (split time series or multi-channel scans into separate 3D files)"
    )


def read_volume(path: PathLike) -> sitk.Image:
    """Reads a scalar MRI volume as a float32 3D image with its original geometry.

    Accepts anything SimpleITK reads (NIfTI, NRRD, MetaImage, PNG/JPEG, ...) and
    a folder holding a DICOM series (the first series found). A 2D image becomes a
    3D image with one slice. The file is only read, never modified.

    Raises AutoDDPMError for a missing or unreadable file, an image that is 4D,
    colour or multi-component, holds NaN/Inf, is empty, or has no signal
    (every voxel the same value).
    """
    path = Path(path)
    if not path.exists():
        raise AutoDDPMError(f"input {path} does not exist; check the path")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise AutoDDPMError(
                f"cannot read {path} ({_first_line(error)}); "
                f"check that the file is complete and is one of: {_SUPPORTED}"
            ) from None
        if _suffix(path).lower() in (".nii", ".nii.gz") and _nifti_bytes_missing(path):
            raise AutoDDPMError(
                f"{path} is truncated or corrupt (it holds fewer voxels than its header describes); "
                "copy or download the file again"
            )

    image = _to_3d(_to_scalar(image, path), path)
    if 0 in image.GetSize():
        raise AutoDDPMError(f"{path} holds no voxels (size {'x'.join(map(str, image.GetSize()))}); give a non-empty volume")
    image = sitk.Cast(image, sitk.sitkFloat32)

    voxels = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(voxels)):
        raise AutoDDPMError(
            f"{path} contains NaN or infinite voxel values; "
            "fix or re-export the volume so that every voxel is a finite number"
        )
    low, high = float(voxels.min()), float(voxels.max())
    if low == high:
        raise AutoDDPMError(
            f"{path} has no signal (every voxel equals {low:g}); check that this is the right scan"
        )
    return image


def _temporary_name(target: Path) -> Path:
    """A fresh file beside ``target`` ending in the real extension, so SimpleITK picks the right writer."""
    suffix = _suffix(target)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[: len(target.name) - len(suffix)]}.tmp-", suffix=suffix)
    os.close(handle)
    return Path(name)


def _remove_quietly(paths) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def write_outputs_atomically(images: Dict[Path, sitk.Image]) -> None:
    """Writes several images so that either all of them land or none does.

    Each image is first written (compressed) to a temporary file beside its
    target; only when every write succeeded are they renamed into place
    (``os.replace``, atomic on one file system). On any failure every temporary
    file is removed, and outputs already renamed by this call are removed too,
    so no partial set of results is left (a file that existed before and was
    already replaced cannot be brought back).
    """
    temporaries: Dict[Path, Path] = {}
    try:
        for target, image in images.items():
            target = Path(target)
            try:
                temporary = _temporary_name(target)
            except OSError as error:
                raise AutoDDPMError(
                    f"cannot write {target} ({error.strerror}); "
                    "check that the output folder exists and is writable"
                ) from None
            temporaries[target] = temporary
            try:
                sitk.WriteImage(image, str(temporary), useCompression=True)
            except RuntimeError as error:
                raise AutoDDPMError(
                    f"cannot write {target} ({_first_line(error)}); check the disk space and that "
                    f"the extension is a supported format: {_SUPPORTED}"
                ) from None
    except BaseException:
        _remove_quietly(temporaries.values())
        raise

    landed = []
    try:
        for target, temporary in temporaries.items():
            os.replace(temporary, target)
            landed.append(target)
    except OSError as error:
        _remove_quietly(list(temporaries.values()) + landed)
        raise AutoDDPMError(
            f"cannot move the results into place ({error}); check that the output folder is writable"
        ) from None


def write_volume(image: sitk.Image, path: PathLike) -> None:
    """Writes one image atomically (temporary file beside it, then rename), compressed.

    The extension picks the format (``.nii.gz``, ``.nrrd``, ``.mha``, ...). The
    output folder must exist.
    """
    write_outputs_atomically({Path(path): image})
