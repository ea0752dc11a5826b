"""Reading input volumes and writing results.

Every problem a user can fix (wrong path, unsupported or broken file, an image
that is not a single scalar volume, no signal) becomes an ``AutoDDPMError``
whose one-line message names the file and what to do. ``check_input`` and
``check_output_dir`` find most of them from headers alone, before a run spends
minutes on a model. Outputs are written atomically so an interrupted or failed
run never leaves a half-written file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import AutoDDPMError
from .nifti_header import (GRID_TOLERANCE, bad_nifti_voxel_size, empty_nifti_axis, nifti_grid_changed, read_nifti_header,
                           scan_nifti_voxels)

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

_RESAMPLE_ADVICE = ("which the outputs cannot keep, so they would not line up with the input; resample it onto an "
                    "orthogonal voxel grid (with the registration or resampling tool you use) and run it again")


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK's warnings span several lines; the checks here report what they warn about in one."""
    warnings_were_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_were_shown)


@contextmanager
def _file_reader_quiet() -> Iterator[None]:
    """No ITK warnings, and nothing the libraries under ITK print, while one file is read.

    MetaIO, for one, prints its own lines to the process's stderr before ITK
    raises the error that ``read_volume`` turns into one line; what they say is
    in that line or in the checks made before reading.
    """
    try:
        saved: Optional[int] = os.dup(2)
    except OSError:  # no stderr at all (e.g. a Windows GUI process): nothing to keep quiet
        saved = None
    if saved is not None:
        if sys.stderr is not None:
            sys.stderr.flush()  # what Python printed before goes where it was meant to
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
    try:
        with _itk_warnings_off():
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


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
    try:
        with _itk_warnings_off():
            return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:
        raise AutoDDPMError(
            f"cannot scan folder {folder} for DICOM files ({_first_line(error)}); "
            "check that the folder is readable"
        ) from None


def _dicom_series_reader(folder: Path) -> sitk.ImageSeriesReader:
    """A reader of the first DICOM series found in ``folder``."""
    series_ids = _dicom_series_ids(folder)
    if not series_ids:
        raise AutoDDPMError(
            f"folder {folder} holds no DICOM series; give a folder of DICOM slices "
            f"or a single image file ({_SUPPORTED})"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    return reader


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


def _not_finite_error(path: Path) -> AutoDDPMError:
    return AutoDDPMError(
        f"{path} contains NaN or infinite voxel values; "
        "fix or re-export the volume so that every voxel is a finite number"
    )


def _physical_memory() -> float:
    """This computer's memory in bytes (infinite where the system does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return float("inf")


def _check_dicom_slice_spacing(folder: Path, files: tuple[str, ...]) -> None:
    """Refuses a DICOM series whose slices are not evenly spaced, from the files' headers.

    GDCM leaves out a slice file it cannot read, and ITK stacks what is left on an evenly
    spaced grid with a multi-line warning: the outputs would not line up with the scan.
    """
    positions = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            with _file_reader_quiet():
                reader.ReadImageInformation()
        except RuntimeError as error:
            raise AutoDDPMError(f"cannot read DICOM file {name} ({_first_line(error)}); "
                                "copy or export the series again") from None
        normal = np.array(reader.GetDirection()).reshape(3, 3)[:, 2]
        positions.append(float(np.dot(normal, reader.GetOrigin())))
    gaps = np.diff(positions)
    if len(gaps) < 2:
        return
    typical = float(np.median(np.abs(gaps)))
    # A gap more than 1% off the others' is one ITK would hide by spacing every slice alike.
    uneven = np.abs(np.abs(gaps) - typical) > 0.01 * typical
    if typical == 0 or uneven.any():
        where = int(np.argmax(uneven)) if typical else 0
        unread = sorted({child.name for child in folder.iterdir() if child.is_file()} - {Path(f).name for f in files})
        raise AutoDDPMError(
            f"the DICOM series in {folder} has missing or unevenly spaced slices (a gap of {abs(gaps[where]):g} mm after "
            f"slice {where + 1} of {len(files)}, where most are {typical:g} mm apart)"
            + (f"; {len(unread)} file(s) in the folder are not readable slices of it ({', '.join(unread[:3])})" if unread else "")
            + "; copy or export the whole series again")


def _check_header(path: Path, reader: sitk.ImageFileReader) -> None:
    """Refuses, from its header alone, an image that is not one real-valued 2D or 3D grid."""
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise AutoDDPMError(
            f"{path} holds complex voxel values (e.g. raw k-space or phase data); "
            "give a magnitude MRI volume (one real value per voxel)"
        )
    dimension, size = reader.GetDimension(), reader.GetSize()
    # Some writers (NRRD, MetaImage) keep a singleton time axis on plain 3D volumes: _to_3d drops it.
    if dimension not in (2, 3) and not (dimension == 4 and size[3] == 1):
        raise AutoDDPMError(
            f"{path} is a {dimension}D image of size {'x'.join(map(str, size))}; "
            "give a single 3D volume (split time series or multi-channel scans into separate 3D files)"
        )
    if 0 in size:
        raise AutoDDPMError(f"{path} holds no voxels (size {'x'.join(map(str, size))}); give a non-empty volume")
    needed = int(np.prod(size, dtype=object)) * 4  # the float32 volume a run works on, before any copy of it
    if needed > _physical_memory():
        raise AutoDDPMError(f"{path} declares {'x'.join(map(str, size))} voxels ({needed / 2**30:,.0f} GiB as 32-bit floats), "
                            "more than this computer's memory; check that the header is intact, or crop the volume")
    axes = min(dimension, 3)
    direction = np.array(reader.GetDirection()).reshape(dimension, dimension)[:axes, :axes]
    if np.abs(direction.T @ direction - np.eye(axes)).max() > GRID_TOLERANCE:  # ITK's own tolerance: beyond it ITK replaces the grid
        raise AutoDDPMError(f"{path} has a non-orthogonal direction matrix (a sheared voxel grid), " + _RESAMPLE_ADVICE)


def _check_nifti_axes(path: Path, nifti) -> None:
    """Refuses a NIfTI header whose axis sizes or voxel sizes ITK would silently replace with others."""
    axis = empty_nifti_axis(nifti)
    if axis is not None:
        raise AutoDDPMError(f"{path} has a corrupt header: it declares {nifti.extents[axis - 1]} voxels along axis {axis} "
                            f"(dim[{axis}]); copy or export the file again")
    axis = bad_nifti_voxel_size(nifti)
    if axis is not None:
        raise AutoDDPMError(f"{path} has a corrupt header: its voxel size along axis {axis} is "
                            f"{nifti.spatial_pixdim[axis - 1]:g} mm (pixdim[{axis}]), where a positive size is needed to "
                            "place the outputs on the input's grid; fix the header or export the file again")


def _checked_reader(path: Path) -> Union[sitk.ImageFileReader, sitk.ImageSeriesReader]:
    """A reader for ``path`` once its header passed every check that needs no voxels."""
    if not path.exists():
        if path.is_symlink():  # exists() follows links: a loop, or a target that was moved
            raise AutoDDPMError(f"input {path} is a symbolic link to {os.readlink(path)}, which does not exist or "
                                "links back to itself; point it to the image file or give that file")
        raise AutoDDPMError(f"input {path} does not exist; check the path")
    if path.is_dir():
        reader = _dicom_series_reader(path)
        _check_dicom_slice_spacing(path, reader.GetFileNames())
        return reader
    if path.stat().st_size == 0:
        raise AutoDDPMError(f"{path} is empty (0 bytes); copy or export the image again")
    nifti = read_nifti_header(path) if _suffix(path).lower() in (".nii", ".nii.gz") else None
    if nifti is not None:
        _check_nifti_axes(path, nifti)
    # Before ITK reads it: ITK fails or warns on such a file, in words that do not say what to do.
    if nifti is not None and nifti_grid_changed(nifti):
        raise AutoDDPMError(f"{path} has a sheared or rescaled voxel grid (its sform is not a rotation times pixdim's "
                            "voxel sizes), " + _RESAMPLE_ADVICE)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _file_reader_quiet():
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise AutoDDPMError(
            f"cannot read {path} ({_first_line(error)}); "
            f"check that the file is complete and is one of: {_SUPPORTED}"
        ) from None
    if nifti is not None:
        missing, not_finite = scan_nifti_voxels(path, nifti)
        if missing:
            raise AutoDDPMError(
                f"{path} is truncated or corrupt (it holds fewer voxels than its header describes); "
                "copy or download the file again"
            )
        if not_finite:
            raise _not_finite_error(path)
    _check_header(path, reader)
    return reader


def check_input(path: PathLike) -> None:
    """Refuses an input whose header already shows that ``read_scan`` would refuse it.

    Checks, without loading the voxels into memory: the file or DICOM series
    exists, is not empty and is readable, holds one real-valued 2D or 3D image
    with voxels in it on an orthogonal grid, that fits in memory, with evenly
    spaced DICOM slices and, for NIfTI, positive axis and voxel sizes, complete
    and free of NaN/Inf. What needs the voxels themselves (colour, no signal,
    only 0 and 1 as in a mask, NaN/Inf in other formats, wrapped int8) is
    checked when ``read_scan`` reads them.

    Raises AutoDDPMError with a one-line message naming the file and what to do.
    """
    _checked_reader(Path(path))


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


def _to_3d(image: sitk.Image) -> sitk.Image:
    """A 3D image: a 2D image becomes one slice, a 4D image with one time point loses that axis."""
    dimension = image.GetDimension()
    if dimension == 2:
        volume = sitk.JoinSeries(image)
        spacing = image.GetSpacing()
        origin = image.GetOrigin()
        d = image.GetDirection()
        volume.SetSpacing((spacing[0], spacing[1], 1.0))
        volume.SetOrigin((origin[0], origin[1], 0.0))
        volume.SetDirection((d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))
        return volume
    if dimension == 4:
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size, [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return image


def read_volume(path: PathLike) -> sitk.Image:
    """Reads a scalar MRI volume as a float32 3D image with its original geometry.

    Accepts anything SimpleITK reads (NIfTI, NRRD, MetaImage, PNG/JPEG, ...) and
    a folder holding a DICOM series (the first series found). A 2D image becomes a
    3D image with one slice. The file is only read, never modified.

    Raises AutoDDPMError for a missing or unreadable file, and for an image that
    ``check_input`` refuses or that is colour or multi-component, holds NaN/Inf,
    has no signal (every voxel the same value), or is int8 with negative values
    (0-255 intensities wrapped by a cast to int8).
    """
    path = Path(path)
    reader = _checked_reader(path)
    try:
        # The warnings are about what _checked_reader refused already (e.g. unevenly spaced DICOM slices).
        with _file_reader_quiet():
            image = reader.Execute()
    except RuntimeError as error:
        if path.is_dir():
            raise AutoDDPMError(
                f"cannot read the DICOM series in {path} ({_first_line(error)}); "
                "check that the files are complete image slices of one series"
            ) from None
        raise AutoDDPMError(
            f"cannot read {path} ({_first_line(error)}); "
            f"check that the file is complete and is one of: {_SUPPORTED}"
        ) from None

    image = _to_scalar(image, path)
    if image.GetPixelID() == sitk.sitkInt8:
        low = int(sitk.GetArrayViewFromImage(image).min())
        if low < 0:
            raise AutoDDPMError(
                f"{path} is stored as signed 8-bit integers and holds negative values (down to {low}), which is what "
                "0-255 intensities become when cast to int8; re-export it as unsigned 8-bit (uint8) or a wider type"
            )
    image = sitk.Cast(_to_3d(image), sitk.sitkFloat32)

    voxels = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(voxels)):
        raise _not_finite_error(path)
    low, high = float(voxels.min()), float(voxels.max())
    if low == high:
        raise AutoDDPMError(
            f"{path} has no signal (every voxel equals {low:g}); check that this is the right scan"
        )
    return image


def read_scan(path: PathLike) -> sitk.Image:
    """``read_volume`` for the scan to find anomalies in: also refuses a lesion or brain mask given in its place.

    Masks are read with ``read_volume`` (training and benchmarks read them beside their scans).
    """
    image = read_volume(path)
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.min() == 0 and voxels.max() == 1 and np.all((voxels == 0) | (voxels == 1)):  # no scan holds only these
        raise AutoDDPMError(f"{path} holds only the values 0 and 1, as a lesion or brain mask does, not an MRI scan; "
                            "give the scan itself")
    return image


def check_output_dir(folder: PathLike) -> None:
    """Refuses an output folder that cannot be created or written to, and leaves nothing behind.

    The folder, or the nearest folder above it that exists, must be a folder in
    which a file (or the missing folders) can be created: a test file or folder
    is made there and removed at once. That finds what permission bits do not
    tell root: read-only disks, /proc and /sys.

    Raises AutoDDPMError with a one-line message naming the folder and what to do.
    """
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise AutoDDPMError(
            f"output folder {folder} " + ("is a file" if existing == folder else f"cannot be created: {existing} is a file")
            + "; give the path of a folder (one that is missing is created)"
        )
    try:
        if existing == folder:
            handle, probe = tempfile.mkstemp(dir=folder, prefix=".autoddpm-write-test-")
            os.close(handle)
            os.remove(probe)
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".autoddpm-write-test-"))
    except OSError as error:
        raise AutoDDPMError(
            f"cannot write to output folder {folder} (creating a file in {existing} failed: {error.strerror}); "
            "choose a folder on a writable disk where you may create files"
        ) from None


def make_output_dir(folder: PathLike) -> None:
    """Creates the output folder and any missing folders above it (a run creates it only to write into it).

    Raises AutoDDPMError with a one-line message when it cannot be created.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AutoDDPMError(
            f"cannot create output folder {folder} ({error.strerror}); "
            "choose a folder on a writable disk where you may create files"
        ) from None


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


def _new_file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_outputs_atomically(images: Dict[Path, Union[sitk.Image, bytes]]) -> None:
    """Writes several images (and files given as bytes, e.g. a JSON record) so that either all land or none does.

    Each one is first written (images compressed) to a temporary file beside its
    target; only when every write succeeded are they renamed into place
    (``os.replace``, atomic on one file system), in the order given, so the last
    one landing means all did. On any failure every temporary file is removed,
    and outputs already renamed by this call are removed too, so no partial set
    of results is left (a file that existed before and was already replaced
    cannot be brought back).
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
                if isinstance(image, bytes):
                    temporary.write_bytes(image)
                else:
                    sitk.WriteImage(image, str(temporary), useCompression=True)
                # mkstemp made the file private (0600); results are shared like any file the user writes.
                os.chmod(temporary, _new_file_mode())
            except OSError as error:
                raise AutoDDPMError(f"cannot write {target} ({error.strerror}); check the disk space") from None
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
