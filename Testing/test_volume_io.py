"""Reading and writing volumes: formats, geometry, bad inputs, atomic outputs."""

from __future__ import annotations

import gzip
import hashlib
import locale
import os
import stat
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.volumes.volume_io import (
    check_input,
    check_output_dir,
    expand_inputs,
    input_stem,
    make_output_dir,
    read_volume,
    write_outputs_atomically,
    write_volume,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def make_volume(size=(12, 10, 6), spacing=(0.9, 1.1, 3.0), origin=(-10.0, 5.0, 2.5), dtype=np.float32) -> sitk.Image:
    """A small volume with a bright ellipsoid on a dark background and non-trivial geometry."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in size[::-1]), indexing="ij")
    array = (100 * np.exp(-(x**2 + y**2 + z**2) * 2)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def write_nifti_with_sform(path: Path, sform: tuple[float, ...], qform_code: int = 1) -> Path:
    """A NIfTI-1 file of ``make_volume``'s voxels whose sform (sform_code 2) is ``sform`` (12 values, row by row).

    ITK writes only rigid grids; other tools (nibabel, FSL, SPM) write any affine.
    """
    plain = path.with_name(path.name.replace(".gz", ""))
    sitk.WriteImage(make_volume(), str(plain))
    header = bytearray(plain.read_bytes())
    header[252:256] = struct.pack("<2h", qform_code, 2)
    header[280:328] = struct.pack("<12f", *sform)
    if path.name.endswith(".gz"):
        plain.unlink()
        path.write_bytes(gzip.compress(bytes(header)))
    else:
        path.write_bytes(bytes(header))
    return path


# A voxel grid that is no rotation: x leans along y (shear), and a y voxel 1.3 mm long where pixdim says 1.1 (scale).
SHEARED_SFORM = (0.0, -1.1, 0.3, 10.0, 0.9, 0.0, 0.0, -5.0, 0.0, 0.0, 3.0, 2.5)
RESCALED_SFORM = (0.0, -1.3, 0.0, 10.0, 0.9, 0.0, 0.0, -5.0, 0.0, 0.0, 3.0, 2.5)


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """Writes an int16 volume as one DICOM file per slice with the tags a series reader needs."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1" + time.strftime("%H%M%S")
    shared_tags = {
        "0008|0060": "MR",
        "0020|000d": series_uid + ".1",  # study instance UID
        "0020|000e": series_uid + ".2",  # series instance UID
        "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])),
        "0018|0050": str(image.GetSpacing()[2]),
    }
    # GDCM's writer sets the process's locale to "C", and Python's default text encoding with it (to ASCII):
    # later tests that read UTF-8 sources would fail.
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        for k in range(image.GetDepth()):
            slice_k = image[:, :, k]
            for tag, value in shared_tags.items():
                slice_k.SetMetaData(tag, value)
            slice_k.SetMetaData("0008|0018", f"{series_uid}.3.{k}")  # SOP instance UID
            slice_k.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
            slice_k.SetMetaData("0020|0013", str(k + 1))
            writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
            writer.Execute(slice_k)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_reads_volume_formats_with_geometry(tmp_path, extension):
    original = make_volume()
    path = tmp_path / f"scan{extension}"
    sitk.WriteImage(original, str(path))
    image = read_volume(path)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetNumberOfComponentsPerPixel() == 1
    assert_same_geometry(image, original)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original), rtol=1e-6)


def test_reads_integer_volume_as_float32(tmp_path):
    original = sitk.Cast(make_volume(), sitk.sitkUInt8)
    sitk.WriteImage(original, str(tmp_path / "scan.nii.gz"))
    image = read_volume(tmp_path / "scan.nii.gz")
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))


def test_reads_dicom_series_folder(tmp_path):
    original = sitk.Cast(make_volume(size=(8, 7, 4), spacing=(0.5, 0.5, 2.0)), sitk.sitkInt16)
    write_dicom_series(original, tmp_path / "dicom")
    image = read_volume(tmp_path / "dicom")
    assert_same_geometry(image, original)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))


def test_reads_png_as_one_slice(tmp_path):
    array = np.zeros((9, 13), np.uint8)
    array[2:7, 3:10] = 200
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "slice.png"))
    image = read_volume(tmp_path / "slice.png")
    assert image.GetSize() == (13, 9, 1)
    assert image.GetSpacing() == (1.0, 1.0, 1.0)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[0], array)


def test_reads_grey_rgb_png_as_grey(tmp_path):
    grey = np.zeros((9, 13), np.uint8)
    grey[2:7, 3:10] = 180
    for channels in (3, 4):
        rgb = np.stack([grey] * 3 + ([np.full_like(grey, 255)] if channels == 4 else []), axis=-1)
        path = tmp_path / f"grey{channels}.png"
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(path))[0], grey)


def test_input_file_is_not_modified(tmp_path):
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(make_volume(), str(path))
    before = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    read_volume(path)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_input_stem():
    assert input_stem("/a/sub-01_T2w.nii.gz") == "sub-01_T2w"
    assert input_stem("b/scan.v2.NII") == "scan.v2"
    for extension in (".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".dcm"):
        assert input_stem(f"x/brain{extension}") == "brain"
    assert input_stem("no_extension") == "no_extension"


def test_input_stem_of_folder(tmp_path):
    folder = tmp_path / "series.nii"  # a folder keeps its full name, dots and all
    folder.mkdir()
    assert input_stem(folder) == "series.nii"


def test_expand_inputs_opens_plain_folders_only(tmp_path):
    volume = sitk.Image(4, 4, 2, sitk.sitkFloat32) + 1.0
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("b.nii.gz", "a.nrrd", "a_mask.nii.gz", "old_anomaly.nii.gz", ".hidden.nii.gz"):
        sitk.WriteImage(volume, str(cohort / name))
    (cohort / "notes.txt").write_text("not an image")
    (cohort / "nested").mkdir()
    write_dicom_series(sitk.Cast(volume, sitk.sitkInt16), tmp_path / "dicom")
    single = cohort / "b.nii.gz"
    missing = tmp_path / "missing.nii.gz"

    volumes, skipped = expand_inputs([single, cohort, tmp_path / "dicom", missing], ("_mask.nii.gz", "_anomaly.nii.gz"))
    # The folder becomes its image files in name order; a DICOM folder and a file (even a missing one) stay as given.
    assert volumes == [single, cohort / "a.nrrd", cohort / "b.nii.gz", tmp_path / "dicom", missing]
    assert skipped == [cohort / "a_mask.nii.gz", cohort / "old_anomaly.nii.gz"]
    assert expand_inputs([cohort])[0][:2] == [cohort / "a.nrrd", cohort / "a_mask.nii.gz"]


def test_expand_inputs_refuses_a_folder_with_nothing_to_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(AutoDDPMError, match="holds no DICOM series and no image files; give"):
        expand_inputs([empty])
    masks = tmp_path / "masks"
    masks.mkdir()
    sitk.WriteImage(sitk.Image(4, 4, 2, sitk.sitkUInt8), str(masks / "p1_mask.nii.gz"))
    with pytest.raises(AutoDDPMError, match="other than 1 named like masks or earlier outputs"):
        expand_inputs([masks], ("_mask.nii.gz",))


def _bad_inputs(tmp_path: Path):
    """(path, words the message must contain) for every kind of input read_volume refuses."""
    cases = [(tmp_path / "missing.nii.gz", "does not exist")]

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not an image" * 10)
    cases.append((corrupt, "cannot read"))

    # ITK reads a truncated NIfTI as zeros without complaint; we must not.
    for extension in (".nii", ".nii.gz", ".nrrd", ".mha"):
        truncated = tmp_path / f"truncated{extension}"
        sitk.WriteImage(make_volume(), str(truncated), useCompression=extension.endswith("gz"))
        truncated.write_bytes(truncated.read_bytes()[:-300])
        cases.append((truncated, "truncated" if extension.startswith(".nii") else "cannot read"))

    four_d = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(four_d))
    cases.append((four_d, "4D"))

    vector = tmp_path / "vector.nrrd"
    vector_image = sitk.Compose([make_volume(), make_volume() * 2])
    sitk.WriteImage(vector_image, str(vector))
    cases.append((vector, "multi-component"))

    colour = tmp_path / "colour.png"
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(colour))
    cases.append((colour, "colour"))

    # ITK reads NaN and Inf in a NIfTI file as 0; NRRD and MetaImage keep them.
    for name, value, dtype in (("nan", np.nan, np.float32), ("inf", np.inf, np.float32), ("neg_inf64", -np.inf, np.float64)):
        array = sitk.GetArrayFromImage(make_volume()).astype(dtype)
        array[1, 2, 3] = value
        for extension in (".nrrd", ".nii", ".nii.gz"):
            path = tmp_path / f"{name}{extension}"
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
            cases.append((path, "NaN or infinite"))

    complex_nifti = tmp_path / "complex.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(sitk.GetArrayFromImage(make_volume()).astype(np.complex64)), str(complex_nifti))
    cases.append((complex_nifti, "complex"))

    # What a volume of 0-255 intensities becomes when cast to int8: values above 127 wrap to negative ones.
    wrapped = tmp_path / "wrapped_int8.nii.gz"
    sitk.WriteImage(sitk.Cast(make_volume() * 2.5, sitk.sitkInt8), str(wrapped))
    cases.append((wrapped, "signed 8-bit"))

    sheared = make_volume()
    sheared.SetDirection((0.0, 1.0, 0.2, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    for extension in (".mha", ".nrrd"):
        sitk.WriteImage(sheared, str(tmp_path / f"sheared{extension}"))
        cases.append((tmp_path / f"sheared{extension}", "non-orthogonal direction matrix"))
    # With a qform ITK silently takes it instead of the sform; without one it fails: in either case it warns.
    for name, sform, qform_code in (("sheared_sform", SHEARED_SFORM, 1), ("sheared_sform_only", SHEARED_SFORM, 0),
                                    ("rescaled_sform", RESCALED_SFORM, 1)):
        cases.append((write_nifti_with_sform(tmp_path / f"{name}.nii.gz", sform, qform_code), "sheared or rescaled"))

    constant = tmp_path / "constant.mha"
    sitk.WriteImage(sitk.Image([5, 5, 5], sitk.sitkInt16) + 7, str(constant))
    cases.append((constant, "no signal"))

    empty = tmp_path / "empty.nhdr"  # a header that describes zero voxels
    empty.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 0 4 4\nencoding: raw\ndata file: empty.raw\n")
    (tmp_path / "empty.raw").write_bytes(b"")
    cases.append((empty, "empty"))

    not_dicom = tmp_path / "not_dicom"
    not_dicom.mkdir()
    (not_dicom / "notes.txt").write_text("hello")
    cases.append((not_dicom, "no DICOM series"))
    return cases


def test_bad_inputs_give_clear_one_line_errors(tmp_path, capfd):
    for path, words in _bad_inputs(tmp_path):
        capfd.readouterr()
        with pytest.raises(AutoDDPMError) as caught:
            read_volume(path)
            pytest.fail(f"{path.name} was accepted")
        assert capfd.readouterr().err == "", f"ITK printed warnings for {path.name}"
        message = str(caught.value)
        assert "\n" not in message, message
        assert path.name in message, message
        if words == "empty":  # ITK itself may refuse a zero-voxel header before we see it
            assert "no voxels" in message or "cannot read" in message, message
        else:
            assert words in message, message
        assert "; " in message, f"the message should say what to do: {message}"


# What check_input cannot see without the voxels: it leaves these to read_volume.
_REFUSED_ONLY_WITH_THE_VOXELS = {"truncated.nrrd", "truncated.mha", "vector.nrrd", "colour.png", "nan.nrrd", "inf.nrrd", "neg_inf64.nrrd", "constant.mha",
                                 "wrapped_int8.nii.gz"}


def test_check_input_refuses_from_the_header_what_read_volume_would(tmp_path):
    for path, _ in _bad_inputs(tmp_path):
        with pytest.raises(AutoDDPMError) as by_read:
            read_volume(path)
        if path.name in _REFUSED_ONLY_WITH_THE_VOXELS:
            check_input(path)
            continue
        with pytest.raises(AutoDDPMError) as by_check:
            check_input(path)
        assert str(by_check.value) == str(by_read.value)


def test_int8_volumes_without_negative_values_read_exactly(tmp_path):
    original = sitk.Cast(make_volume(), sitk.sitkInt8)  # 0..100: no wrap
    sitk.WriteImage(original, str(tmp_path / "scan.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(tmp_path / "scan.nii.gz")),
                                  sitk.GetArrayFromImage(original))


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mha"])
def test_an_oblique_grid_is_kept_in_the_outputs(tmp_path, extension):
    original = make_volume()
    c, s = np.cos(0.5), np.sin(0.5)  # about 29 degrees about x, then a swap of x and y: oblique but orthogonal
    rotation = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    original.SetDirection(rotation.ravel().tolist())
    sitk.WriteImage(original, str(tmp_path / f"scan{extension}"))
    write_volume(read_volume(tmp_path / f"scan{extension}"), tmp_path / "result.nii.gz")
    assert_same_geometry(sitk.ReadImage(str(tmp_path / "result.nii.gz")), original)


def test_check_output_dir_refuses_what_cannot_be_written_and_leaves_nothing(tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    cases = [
        (a_file, "is a file"),
        (a_file / "sub", f"cannot be created: {a_file} is a file"),
        (Path("/proc/autoddpm-results"), "cannot write to output folder /proc/autoddpm-results (creating a file in /proc failed"),
        (Path("/sys/autoddpm/results"), "cannot write to output folder /sys/autoddpm/results (creating a file in /sys failed"),
    ]
    for folder, words in cases:
        with pytest.raises(AutoDDPMError) as caught:
            check_output_dir(folder)
        message = str(caught.value)
        assert words in message and "\n" not in message and "; " in message, message
    with pytest.raises(AutoDDPMError, match="cannot create output folder"):
        make_output_dir(a_file / "sub")
    # A writable folder, existing or not, passes without anything created or left in it.
    check_output_dir(tmp_path)
    check_output_dir(tmp_path / "new" / "nested")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]
    make_output_dir(tmp_path / "new" / "nested")
    assert (tmp_path / "new" / "nested").is_dir()


def test_write_volume_round_trip_and_no_temporaries(tmp_path):
    image = make_volume()
    mask = sitk.Cast(make_volume() > 50, sitk.sitkUInt8)
    write_volume(image, tmp_path / "out.nii.gz")
    write_volume(mask, tmp_path / "mask.nrrd")
    write_volume(image, tmp_path / "out.nii.gz")  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nrrd", "out.nii.gz"]
    back = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert sitk.ReadImage(str(tmp_path / "mask.nrrd")).GetPixelID() == sitk.sitkUInt8
    # Compression is on: the gzip magic number starts the NIfTI file.
    assert (tmp_path / "out.nii.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_write_outputs_atomically_all_or_nothing(tmp_path):
    good = {tmp_path / "a.nii.gz": make_volume(), tmp_path / "b.nrrd": make_volume()}
    failing_targets = [
        tmp_path / "missing_folder" / "c.nii.gz",  # the folder does not exist
        tmp_path / "c.notaformat",  # no writer for this extension
    ]
    for failing in failing_targets:
        with pytest.raises(AutoDDPMError) as caught:
            write_outputs_atomically({**good, failing: make_volume()})
        assert "\n" not in str(caught.value)
        assert failing.name in str(caught.value)
        assert list(tmp_path.iterdir()) == [], "nothing, not even temporary files, may be left"
    write_outputs_atomically(good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nrrd"]


def test_outputs_are_readable_as_the_umask_allows(tmp_path):
    # The temporary files are private (mkstemp); results on a shared server must be readable by the group.
    previous = os.umask(0o022)
    try:
        write_outputs_atomically({tmp_path / "a.nii.gz": make_volume()})
        assert stat.S_IMODE((tmp_path / "a.nii.gz").stat().st_mode) == 0o644
        os.umask(0o077)
        write_outputs_atomically({tmp_path / "b.nii.gz": make_volume()})
        assert stat.S_IMODE((tmp_path / "b.nii.gz").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not available")
def test_reads_real_training_data():
    flair = sorted((SHARED_DATA / "lgg_flair" / "val").glob("*_flair.nii.gz"))[:1]
    pngs = sorted((SHARED_DATA / "ixi_t1_midaxial" / "val").glob("*.png"))[:1]
    for path in flair + pngs:
        image = read_volume(path)
        assert image.GetDimension() == 3 and image.GetPixelID() == sitk.sitkFloat32
        assert sitk.GetArrayViewFromImage(image).max() <= 255
