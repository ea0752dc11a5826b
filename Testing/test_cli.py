"""The ``autoddpm`` command line, end to end, and every kind of bad input."""

import gzip
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_head_volume, run_cli_without_simpleitk
from test_volume_io import SHEARED_SFORM, write_dicom_series, write_nifti_with_sform

from AutoDDPMLib.cli import main
from AutoDDPMLib.errors import AutoDDPMError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "AutoDDPMLib.cli", *args], capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_run_end_to_end_with_json_progress(tiny_model, head_volume, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("run", str(head_volume), "--output-dir", str(out), "--model", str(tiny_model), "--progress", "json",
                   "--backend", "torch")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "progress" and "start" in kinds and kinds[-2:] == ["done", "finished"]
    start = next(e for e in events if e["event"] == "start")
    assert start["evaluations_per_slice"] == 25 and start["schedule"] == "fast" and start["model"] == "tiny"
    assert start["backend"] == "torch" and start["backend_note"] is None
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    done = events[-2]
    assert sorted(done["outputs"]) == ["anomaly", "mask", "pseudohealthy"]
    assert sorted(p.name for p in out.iterdir()) == ["head_anomaly.nii.gz", "head_autoddpm.json", "head_mask.nii.gz",
                                                     "head_pseudohealthy.nii.gz"]  # one input: no summary.csv
    original = sitk.ReadImage(str(head_volume))
    mask = sitk.ReadImage(done["outputs"]["mask"])
    assert mask.GetSize() == original.GetSize() and mask.GetSpacing() == original.GetSpacing()
    assert int(sitk.GetArrayFromImage(mask).sum()) == done["anomalous_voxels"]


def test_backend_onnxruntime_without_the_packages_is_one_clear_line(tiny_model, head_volume, tmp_path, capsys, monkeypatch):
    import AutoDDPMLib.diffusion.onnx_backend as onnx_backend

    monkeypatch.setattr(onnx_backend, "missing_onnx_packages", lambda: ["onnxruntime"])
    assert main(["run", str(head_volume), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_model),
                 "--backend", "onnxruntime", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("autoddpm: error: backend 'onnxruntime' cannot run: onnxruntime is not installed; "
                   "pip install \"autoddpm[onnx]\" or use --backend torch")
    assert not (tmp_path / "out").exists()
    # Under auto the run goes on with torch, and the bar's first line says so.
    assert main(["run", str(head_volume), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_model)]) == 0
    assert "backend torch" in capsys.readouterr().err


def test_same_seed_same_files(tiny_model, head_volume, tmp_path):
    for name in ("a", "b"):
        assert main(["run", str(head_volume), "--output-dir", str(tmp_path / name), "--model", str(tiny_model),
                     "--seed", "7", "--progress", "none"]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / "head_anomaly.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / "head_anomaly.nii.gz")))
    assert np.array_equal(a, b)


def test_repeats_write_the_spread(tiny_model, head_volume, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(head_volume), "--output-dir", str(out), "--model", str(tiny_model), "--repeats", "2",
                 "--progress", "json"]) == 0
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-2]
    assert done["event"] == "done" and done["repeats"] == 2
    assert sorted(done["outputs"]) == ["anomaly", "mask", "pseudohealthy", "spread"]
    spread = sitk.ReadImage(done["outputs"]["spread"])
    assert spread.GetSize() == sitk.ReadImage(str(head_volume)).GetSize()
    assert main(["run", str(head_volume), "--output-dir", str(tmp_path / "none"), "--model", str(tiny_model),
                 "--repeats", "0"]) == 2
    assert capsys.readouterr().err.strip() == "autoddpm: error: --repeats must be at least 1"
    assert not (tmp_path / "none").exists()


def test_several_inputs_one_bad(tiny_model, head_volume, tmp_path, capsys):
    missing = tmp_path / "missing.nii.gz"
    code = main(["run", str(head_volume), str(missing), "--output-dir", str(tmp_path / "out"),
                 "--model", str(tiny_model), "--progress", "none"])
    assert code == 2
    assert "missing.nii.gz" in capsys.readouterr().err
    assert (tmp_path / "out" / "head_mask.nii.gz").is_file()
    assert not list((tmp_path / "out").glob("missing*"))


def test_run_on_a_cohort_folder(tiny_model, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for seed, name in enumerate(("p1.nii.gz", "p2.nrrd")):
        sitk.WriteImage(make_head_volume(seed=seed), str(cohort / name))
    sitk.WriteImage(make_head_volume(), str(cohort / "p1_mask.nii.gz"))  # the expert's outline, not a scan
    out = cohort / "results"
    assert main(["run", str(cohort), "--output-dir", str(out), "--model", str(tiny_model), "--progress", "none"]) == 0
    assert "skipping 1 file(s) named like lesion masks or AutoDDPM outputs: p1_mask.nii.gz" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{patient}_{kind}.nii.gz" for patient in ("p1", "p2") for kind in ("anomaly", "mask", "pseudohealthy")]
        + ["p1_autoddpm.json", "p2_autoddpm.json", "summary.csv"])
    # Run again with the outputs inside the cohort folder: they are not taken for new scans.
    shutil.move(str(out), str(tmp_path / "first"))
    for path in (tmp_path / "first").iterdir():
        shutil.copy(path, cohort / path.name)
    assert main(["run", str(cohort), "--output-dir", str(out), "--model", str(tiny_model), "--progress", "none"]) == 0
    assert len(list(out.iterdir())) == 9


def write(path: Path, array: np.ndarray, vector: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def patched_nifti(path: Path, source: Path, **fields: tuple) -> Path:
    """A copy of the uncompressed NIfTI-1 ``source`` with header fields (dim, pixdim, sform_code) overwritten."""
    header = bytearray(source.read_bytes())
    offsets = {"dim": (40, "<8h"), "pixdim": (76, "<8f"), "sform_code": (254, "<h")}
    for name, values in fields.items():
        offset, layout = offsets[name]
        struct.pack_into(layout, header, offset, *values)
    path.write_bytes(bytes(header))
    return path


def bad_runs(tmp: Path) -> dict:
    """Every `autoddpm` command refused with exit 2: (arguments, words its one error line must contain, whether the
    refusal comes before the model loads, from headers and options alone[, environment variables]).

    A run or demo gets --model (unless it names its own) and --progress none from the test; "MODEL" in the
    arguments stands for the test model's folder."""
    head = sitk.GetArrayFromImage(make_head_volume())
    good = write(tmp / "head.nii.gz", head)
    out = tmp / "out"
    corrupt = tmp / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file at all" * 10)
    empty = tmp / "empty.nii.gz"  # what an interrupted copy or a full disk leaves
    empty.write_bytes(b"")
    (tmp / "loop_a.nii.gz").symlink_to(tmp / "loop_b.nii.gz")
    (tmp / "loop_b.nii.gz").symlink_to(tmp / "loop_a.nii.gz")
    plain = write(tmp / "plain.nii", head)  # uncompressed, so its header can be edited in place
    qform_only = {"sform_code": (0,)}  # ITK then takes the voxel sizes from pixdim alone
    huge = tmp / "huge.mha"  # a header whose sizes were damaged: 4 PB of voxels
    huge.write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_FLOAT\n"
                    "ElementDataFile = LOCAL\n")
    dicom = tmp / "dicom"
    write_dicom_series(sitk.Cast(make_head_volume(), sitk.sitkInt16), dicom)
    unreadable = dicom / "slice002.dcm"  # GDCM leaves it out, and ITK stacks the others as if evenly spaced
    unreadable.write_bytes(unreadable.read_bytes()[:200])
    mask = sitk.GetImageFromArray((head > 100).astype(np.uint8))  # a brain mask, as an outline tool writes it
    sitk.WriteImage(mask, str(tmp / "brain_mask_of_head.nii.gz"))
    grey_alpha = np.repeat((head[3] / head.max() * 255).astype(np.uint8)[..., None], 4, axis=2)
    grey_alpha[..., 3] = np.arange(grey_alpha.shape[1], dtype=np.uint8)  # a fading alpha: not a greyscale export
    no_images = tmp / "no_images"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("scans to follow")
    inputs = {
        "missing": (tmp / "nope.nii.gz", "does not exist", True),
        "corrupt": (corrupt, "corrupt", True),
        "4D": (write(tmp / "four.nii.gz", np.ones((2, 3, 40, 40), np.float32) * np.arange(40)), "4D", True),
        "vector": (write(tmp / "rgb.nrrd", np.random.rand(4, 40, 40, 3).astype(np.float32), vector=True), "component", False),
        "constant": (write(tmp / "flat.nii.gz", np.full((4, 40, 40), 7, np.float32)), "no signal", False),
        "small": (write(tmp / "small.nii.gz", head[:, :20, :20].copy()), "smaller than the model grid", False),
        "complex NIfTI": (write(tmp / "complex.nii.gz", head.astype(np.complex64)), "complex voxel values", True),
        "complex MetaImage": (write(tmp / "complex.mha", head.astype(np.complex64)), "2 values per voxel", False),
        "int8 wrapped": (write(tmp / "int8.nii.gz", head.astype(np.int16).astype(np.int8)), "signed 8-bit", False),
        "sheared MetaImage": (tmp / "sheared.mha", "non-orthogonal direction matrix", True),
        "sheared NIfTI": (write_nifti_with_sform(tmp / "sheared.nii.gz", SHEARED_SFORM), "sheared or rescaled", True),
        "empty file": (empty, "is empty (0 bytes)", True),
        "symbolic link loop": (tmp / "loop_a.nii.gz", "symbolic link", True),
        # ITK reads a size of 0 as 1, a zero voxel size as 1 mm and a negative one as a mirrored axis, all silently.
        "NIfTI axis of 0 voxels": (patched_nifti(tmp / "no_rows.nii", plain, dim=(3, 48, 0, 6, 1, 1, 1, 1)),
                                   "declares 0 voxels along axis 2", True),
        "NIfTI voxel size 0": (patched_nifti(tmp / "zero_mm.nii", plain, pixdim=(1, 0, 1, 2, 0, 0, 0, 0), **qform_only),
                               "voxel size along axis 1 is 0 mm", True),
        "NIfTI negative voxel size": (patched_nifti(tmp / "minus_mm.nii", plain, pixdim=(1, 1, -1, 2, 0, 0, 0, 0)),
                                      "voxel size along axis 2 is -1 mm", True),
        "size beyond memory": (huge, "more than this computer's memory", True),
        "DICOM slice unreadable": (dicom, "missing or unevenly spaced slices", True),
        "mask given as the scan": (tmp / "brain_mask_of_head.nii.gz", "only the values 0 and 1", False),
        "PNG with varying alpha": (write(tmp / "alpha.png", grey_alpha, vector=True), "4 values per voxel", False),
        "folder without images": (no_images, "holds no DICOM series and no image files", True),
    }
    for name, value in (("NaN", np.nan), ("Inf", np.inf)):
        for extension in (".mha", ".nii", ".nii.gz"):
            array = head.copy()
            array[2, 10, 10] = value
            # ITK reads NaN and Inf in NIfTI as 0: only AutoDDPM's own scan of the file sees them.
            inputs[f"{name} in {extension}"] = (write(tmp / f"{name}{extension}", array), "NaN or infinite",
                                                extension != ".mha")
    sheared = make_head_volume()
    sheared.SetDirection((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(sheared, str(tmp / "sheared.mha"))
    runs = {name: (["run", str(path), "--output-dir", str(out)], words, early) for name, (path, words, early) in inputs.items()}

    options = {
        "threshold nan": (["--threshold", "nan"], "--threshold must be a finite number of at least 0"),
        "threshold inf": (["--threshold", "inf"], "--threshold must be a finite number of at least 0"),
        "threshold below 0": (["--threshold", "-1"], "--threshold must be a finite number of at least 0"),
        "batch size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
        "batch size below 0": (["--batch-size", "-3"], "--batch-size must be at least 1"),
        "repeats below 0": (["--repeats", "-1"], "--repeats must be at least 1"),
        "seed beyond 64 bits": (["--seed", str(2**64)], "--seed must be a whole number between"),
        # What argparse refuses is one line too, not the usage and then the error.
        "seed not a whole number": (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
        "schedule unknown": (["--schedule", "fastest"], "argument --schedule: invalid choice: 'fastest'"),
        "postprocess unknown": (["--postprocess", "median"], "argument --postprocess: invalid choice: 'median'"),
        "device unknown": (["--device", "tpu"], "unknown device 'tpu'"),
        "device cuda without a GPU": (["--device", "cuda"], "PyTorch sees no CUDA GPU"),
        "model folder without model.json": (["--model", str(no_images)], "has no model.json"),
    }
    runs.update({name: (["run", str(good), "--output-dir", str(out), *extra], words, True)
                 for name, (extra, words) in options.items()})
    for threads in ("0", "-1"):
        runs[f"threads {threads}"] = (["--threads", threads, "run", str(good), "--output-dir", str(out)],
                                      "--threads must be at least 1", True)

    a_file = tmp / "results.txt"
    a_file.write_text("not a folder")
    folders = {
        "output dir is a file": (a_file, f"output folder {a_file} is a file"),
        "output dir inside a file": (a_file / "sub", f"{a_file} is a file"),
        "output dir under /proc": (Path("/proc/autoddpm-results"), "cannot write to output folder /proc/autoddpm-results"),
        "output dir under /sys": (Path("/sys/autoddpm/results"), "cannot write to output folder /sys/autoddpm/results"),
    }
    runs.update({name: (["run", str(good), "--output-dir", str(folder)], words, True)
                 for name, (folder, words) in folders.items()})
    earlier = tmp / "earlier"  # what an earlier run of head.nii.gz left
    earlier.mkdir()
    write(earlier / "head_mask.nii.gz", np.zeros((6, 40, 48), np.uint8))
    runs["earlier outputs"] = (["run", str(good), "--output-dir", str(earlier)],
                               f"output folder {earlier} already holds outputs of head.nii.gz; give --resume", True)
    runs["same input twice"] = (["run", str(good), str(good), "--output-dir", str(out)],
                                "several inputs share the name head", True)
    runs["output dir not given"] = (["run", str(good)], "the following arguments are required: --output-dir", True)
    runs["demo device unknown"] = (["demo", "--output-dir", str(out), "--device", "tpu"], "unknown device 'tpu'", True)
    runs["calibrate max slices 0"] = (["calibrate", "MODEL", "--data", str(good), "--max-slices", "0"],
                                      "--max-slices must be at least 1", True)
    not_a_list = tmp / "scans.bin"  # an image under a name that is no image's, taken for a list of images
    not_a_list.write_bytes(gzip.compress(b"\x00\x01" * 100))
    runs["calibrate data neither image nor list"] = (["calibrate", "MODEL", "--data", str(not_a_list)],
                                                     "is neither an image", False)
    runs["resources without models"] = (["models"], "AUTODDPM_RESOURCES is set to", True,
                                        {"AUTODDPM_RESOURCES": str(no_images)})
    return runs


BAD_RUNS = [
    "missing", "corrupt", "4D", "vector", "constant", "small", "complex NIfTI", "complex MetaImage", "int8 wrapped",
    "sheared MetaImage", "sheared NIfTI", "NaN in .mha", "NaN in .nii", "NaN in .nii.gz", "Inf in .mha", "Inf in .nii",
    "Inf in .nii.gz", "threshold nan", "threshold inf", "threshold below 0", "batch size 0", "batch size below 0",
    "threads 0", "threads -1", "output dir is a file", "output dir inside a file", "output dir under /proc",
    "output dir under /sys", "earlier outputs",
    "empty file", "symbolic link loop", "NIfTI axis of 0 voxels", "NIfTI voxel size 0", "NIfTI negative voxel size",
    "size beyond memory", "DICOM slice unreadable", "mask given as the scan", "PNG with varying alpha",
    "folder without images", "repeats below 0", "seed beyond 64 bits", "seed not a whole number", "schedule unknown",
    "postprocess unknown", "device unknown", "device cuda without a GPU", "model folder without model.json",
    "same input twice", "output dir not given", "demo device unknown", "calibrate max slices 0",
    "calibrate data neither image nor list", "resources without models",
]


def files_under(folder: Path) -> dict:
    """Every path under ``folder``, with each file's bytes and modification time."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else "folder"
            for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_run_exit_2_one_line_nothing_written(tiny_model, tmp_path, capfd, monkeypatch, case):
    args, expected, before_the_model, *environment = bad_runs(tmp_path)[case]
    if case == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    for name, value in (environment[0] if environment else {}).items():
        monkeypatch.setenv(name, value)
    # What headers and options show is refused before the model loads: a model that is not there is never looked for.
    # The model is a copy among the inputs: a refused run must leave it untouched too.
    model = "no-such-model" if before_the_model else str(shutil.copytree(tiny_model, tmp_path / "model"))
    args = [model if arg == "MODEL" else arg for arg in args]
    if args[0] in ("run", "demo"):
        args += ([] if "--model" in args else ["--model", model]) + ["--progress", "none"]
    before = files_under(tmp_path)
    code = main(args)
    err = capfd.readouterr().err  # the process's stderr, where ITK's C++ warnings would land too
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("autoddpm: error:"), err
    assert expected.lower() in lines[0].lower(), lines[0]
    # The inputs are untouched, and nothing is written: no output folder, no temporary file.
    assert files_under(tmp_path) == before


def test_bad_inputs_among_several_are_reported_before_the_model(tiny_model, tmp_path, capfd):
    runs = bad_runs(tmp_path)
    nan, complex_volume = runs["NaN in .nii.gz"][0][1], runs["complex NIfTI"][0][1]
    out = tmp_path / "out"
    assert main(["run", nan, complex_volume, "--output-dir", str(out), "--model", "no-such-model"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert [line.split(": ")[:2] for line in lines] == [["autoddpm", "error"]] * 2
    assert "NaN" in lines[0] and "complex" in lines[1]
    # With a good input among them the model is loaded for it, after the bad ones were reported.
    assert main(["run", nan, str(tmp_path / "head.nii.gz"), "--output-dir", str(out), "--model", "no-such-model"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert "NaN" in lines[0] and "unknown model" in lines[1]
    assert not out.exists()


def test_demo_checks_options_and_output_folder_before_the_model(tmp_path, capsys):
    a_file = tmp_path / "demo.txt"
    a_file.write_text("not a folder")
    for args, words in ((["--output-dir", str(a_file)], "is a file"), (["--threshold", "nan"], "--threshold must be")):
        assert main(["demo", *args, "--model", "no-such-model"]) == 2
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.txt"]


def broken_models(tiny_model: Path, tmp: Path) -> dict:
    def copy(name):
        target = tmp / name
        shutil.copytree(tiny_model, target)
        return target

    corrupt_weights = copy("corrupt-weights")
    (corrupt_weights / "model.safetensors").write_bytes(b"\x00" * 100)
    bad_json = copy("bad-json")
    (bad_json / "model.json").write_text("{ not json")
    missing_key = copy("missing-key")
    card = json.loads((missing_key / "model.json").read_text())
    del card["thresholds"]
    (missing_key / "model.json").write_text(json.dumps(card))
    wrong_net = copy("wrong-net")
    card = json.loads((wrong_net / "model.json").read_text())
    card["unet"]["channels"] = [16, 32]
    (wrong_net / "model.json").write_text(json.dumps(card))
    return {
        "unknown name": ("no-such-model", "unknown model"),
        "corrupt weights": (corrupt_weights, "corrupt"),
        "card not JSON": (bad_json, "not valid JSON"),
        "card without thresholds": (missing_key, "thresholds"),
        "card of another network": (wrong_net, "do not fit"),
    }


@pytest.mark.parametrize("case", ["unknown name", "corrupt weights", "card not JSON", "card without thresholds", "card of another network"])
def test_bad_model_exit_2(tiny_model, head_volume, tmp_path, capsys, case):
    model, expected = broken_models(tiny_model, tmp_path)[case]
    code = main(["run", str(head_volume), "--output-dir", str(tmp_path / "out"), "--model", str(model), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_calibrate_data_may_be_one_image(tmp_path):
    # --data takes "healthy images/volumes": one image was read as a text file listing images, and failed to decode.
    from AutoDDPMLib.training.training_data import find_training_images

    image = write(tmp_path / "p1_flair.nii.gz", sitk.GetArrayFromImage(make_head_volume()))
    mask = write(tmp_path / "p1_mask.nii.gz", np.zeros((6, 40, 48), np.uint8))
    assert find_training_images(image) == [(image, mask)]


def test_models_lists_bundled_models(tiny_model, tmp_path, monkeypatch, capsys):
    resources = tmp_path / "Resources"
    shutil.copytree(tiny_model, resources / "Models" / "tiny")
    monkeypatch.setenv("AUTODDPM_RESOURCES", str(resources))
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "tiny" in listed and "NOTHING" in listed  # its thresholds are placeholders
    card = json.loads((resources / "Models" / "tiny" / "model.json").read_text())
    card["postprocessing"] = {"polarity": "bright"}
    card["thresholds"]["postprocessed"] = {"anomaly": 0.00123, "mask_tau": card["thresholds"]["mask_tau"],
                                           "settings": card["postprocessing"]}
    card["thresholds"]["calibration"] = {"schedule": "fast"}
    (resources / "Models" / "tiny" / "model.json").write_text(json.dumps(card))
    assert main(["models"]) == 0
    assert "0.00123" in capsys.readouterr().out  # the threshold a run applies: the post-processed map's
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in cards] == ["tiny"] and cards[0]["path"].endswith("tiny")


def test_demo_runs_on_the_shipped_sample(tiny_model_with, tmp_path, capsys):
    model = tiny_model_with("nc", license="CC BY-NC-SA 4.0 (follows the training data)")
    out = tmp_path / "out"
    code = main(["demo", "--output-dir", str(out), "--model", str(model), "--progress", "none"])
    assert code == 0
    printed, err = capsys.readouterr()
    assert err.splitlines()[0] == ("autoddpm: note: model tiny is licensed CC BY-NC-SA 4.0 (follows the training data): "
                                   "its results are not for commercial use")
    figure = out / "autoddpm-demo.png"
    assert figure.is_file() and figure.stat().st_size > 10_000
    assert str(figure.resolve()) in printed and "Dice against the lesion masks" in printed
    assert (out / "TCGA_LGG_FLAIR_mask.nii.gz").is_file() and (out / "TCGA_LGG_FLAIR_autoddpm.json").is_file()
    # A second demo into its own folder replaces the first one's outputs.
    assert main(["demo", "--output-dir", str(out), "--model", str(model), "--progress", "none"]) == 0


def test_run_says_it_loads_the_model_and_starts_each_message_on_its_own_line(tiny_model, head_volume, tmp_path, capfd):
    small = tmp_path / "small.nii.gz"
    sitk.WriteImage(make_head_volume(shape=(3, 20, 24)), str(small))  # smaller than the model grid: fails under a bar
    assert main(["run", str(head_volume), str(small), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_model)]) == 2
    err = capfd.readouterr().err
    # A bar redraws its line after carriage returns; a terminal shows what follows the last one.
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    assert shown[0] == "loading model tiny ..."
    # Each input's first line says how its map is made, post-processing included.
    assert any(line.startswith(f"{head_volume.name}: model tiny, schedule fast") and
               line.endswith("; post-processing: none (the paper's raw map)") for line in shown)
    messages = [line for line in shown if "autoddpm: " in line]
    assert any(line.startswith("autoddpm: warning: model tiny has no thresholds calibrated") for line in messages)
    assert any(line.startswith(f"autoddpm: error: {small}: the slices are 20 x 24 pixels") for line in messages)
    assert all(line.startswith("autoddpm: ") for line in messages), messages
    assert not any("commercial" in line for line in shown)  # the tiny model's license does not forbid it


def test_a_non_commercial_model_is_said_in_one_line(tiny_model_with, head_volume, tmp_path, capfd):
    licensed = tiny_model_with("nc", license="CC BY-NC-SA 4.0 (follows the training data)")
    for progress in ("none", "json"):
        assert main(["run", str(head_volume), "--output-dir", str(tmp_path / progress), "--model", str(licensed),
                     "--progress", progress]) == 0
        said = [line for line in capfd.readouterr().err.splitlines() if "commercial" in line]
        assert said == [("autoddpm: note: model tiny is licensed CC BY-NC-SA 4.0 (follows the training data): "
                         "its results are not for commercial use")]
    free = tiny_model_with("by-sa", license="CC BY-SA 3.0 (follows the training data: IXI)")
    assert main(["run", str(head_volume), "--output-dir", str(tmp_path / "free"), "--model", str(free), "--progress", "none"]) == 0
    assert "commercial" not in capfd.readouterr().err


def test_demo_of_a_t1_model_runs_the_paper_setting(tiny_model_with, tmp_path, capsys):
    model = tiny_model_with("t1", modality="T1", slice_levels="mid-axial")
    out = tmp_path / "out"
    assert main(["demo", "--output-dir", str(out), "--model", str(model), "--progress", "json"]) == 0
    printed = capsys.readouterr().out
    # three single mid-axial slices, one synthetic lesion each: no warning about slice levels or contrast
    events = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]  # then the summary
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert not any("mid-axial" in w or "looks like" in w for w in warnings)
    for size in ("small", "medium", "large"):
        mask = sitk.ReadImage(str(out / f"IXI_T1_midaxial_{size}_mask.nii.gz"))
        assert mask.GetSize() == (197, 233, 1)  # a 2D input is read as a one-slice volume
    assert (out / "autoddpm-demo.png").is_file()


def test_demo_of_a_model_without_a_sample_fails_clearly(tiny_model_with, tmp_path, capsys):
    model = tiny_model_with("dwi", modality="DWI")
    assert main(["demo", "--output-dir", str(tmp_path / "out"), "--model", str(model)]) == 2
    assert "no sample ships for DWI models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _model_and_healthy_volumes(tiny_model, tmp_path, volumes: int = 1):
    """A copy of the tiny model to calibrate, and a folder of lesion-free head volumes."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = tmp_path / "healthy"
    data.mkdir()
    for seed in range(volumes):
        sitk.WriteImage(make_head_volume(lesion=False, seed=seed), str(data / f"h{seed}_flair.nii.gz"))
    return model, data


def test_calibrate_sets_thresholds_from_healthy_data(tiny_model, tmp_path, capsys):
    model, data = _model_and_healthy_volumes(tiny_model, tmp_path, volumes=2)
    assert main(["calibrate", str(model), "--data", str(data), "--healthy-fpr", "0.02"]) == 0
    thresholds = json.loads((model / "model.json").read_text())["thresholds"]
    info = thresholds["calibration"]
    assert thresholds["calibrated"] is True
    assert info["flagged_by_tau"] <= 0.05 + 1e-3
    assert info["flagged_by_anomaly_threshold"] <= 0.02 + 1e-3
    assert info["healthy_slices"] == 12
    bar = capsys.readouterr().err
    assert "calibrating (fast): 100%" in bar and "stitch and re-sample" in bar


def test_each_schedule_gets_its_own_thresholds(tiny_model, tmp_path, capsys):
    from AutoDDPMLib.detection.inference import AutoDDPM
    from AutoDDPMLib.models.bundle import read_card

    model, data = _model_and_healthy_volumes(tiny_model, tmp_path)
    assert main(["calibrate", str(model), "--data", str(data)]) == 0
    fast = read_card(model).thresholds_for("fast")
    assert fast[2] and not read_card(model).thresholds_for("reference")[2]
    assert AutoDDPM(model, schedule="reference").threshold_warning is not None
    assert main(["calibrate", str(model), "--data", str(data), "--schedule", "reference", "--max-slices", "3"]) == 0
    card = read_card(model)
    assert card.thresholds_for("fast") == fast  # untouched
    tau, anomaly, calibrated = card.thresholds_for("reference")
    assert calibrated and card.data["thresholds"]["schedules"]["reference"]["calibration"]["healthy_slices"] == 3
    engine = AutoDDPM(model, schedule="reference")
    assert engine.threshold == anomaly and engine.pipeline.mask_threshold == tau and engine.threshold_warning is None
    # Re-calibrating the default schedule keeps the others.
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3"]) == 0
    assert read_card(model).thresholds_for("reference") == (tau, anomaly, True)


@pytest.mark.parametrize("option, field, out_of_range, refusal, level, reference_level", [
    ("--coarse-start", "coarse_start", "5", "--coarse-start must be between 9", 150, 200),
    ("--resample-start", "resample_start", "201", "--resample-start must be between 5 ", 100, 50),
])
def test_calibrate_can_move_a_stage_level(tiny_model, tmp_path, capsys, option, field, out_of_range, refusal, level, reference_level):
    from AutoDDPMLib.detection.inference import AutoDDPM
    from AutoDDPMLib.models.bundle import read_card

    model, data = _model_and_healthy_volumes(tiny_model, tmp_path)
    before = (model / "model.json").read_text()
    # Out of range: refused before anything is run, and the card is left as it was.
    assert main(["calibrate", str(model), "--data", str(data), option, out_of_range]) == 2
    assert refusal in capsys.readouterr().err
    assert (model / "model.json").read_text() == before
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3", option, str(level)]) == 0
    card = read_card(model)
    assert getattr(card.schedule("fast"), field) == level and getattr(card.schedule("reference"), field) == reference_level
    assert card.thresholds_for("fast")[2]
    assert getattr(AutoDDPM(model).pipeline.schedule, field) == level  # what `autoddpm run` now does


def test_calibrate_can_set_the_lpips_size(tiny_model, tmp_path, capsys):
    from AutoDDPMLib.detection.inference import AutoDDPM
    from AutoDDPMLib.models.bundle import read_card

    model, data = _model_and_healthy_volumes(tiny_model, tmp_path)
    before = (model / "model.json").read_text()
    assert main(["calibrate", str(model), "--data", str(data), "--lpips-size", "16"]) == 2
    assert "--lpips-size must be at least the model grid's 32 pixels" in capsys.readouterr().err
    assert (model / "model.json").read_text() == before
    assert AutoDDPM(model).pipeline.lpips_size == 32  # a card without the field: the model grid
    for schedule in ("fast", "reference"):
        assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3", "--schedule", schedule]) == 0
    native = read_card(model).thresholds_for("fast")
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3", "--lpips-size", "64"]) == 0
    card = read_card(model)
    assert card.lpips_image_size == 64 and card.data["thresholds"]["calibration"]["lpips_image_size"] == 64
    assert card.thresholds_for("fast")[2] and card.thresholds_for("fast")[0] != native[0]
    # The reference schedule's thresholds were measured at the old size: no longer what its card promises.
    assert not card.thresholds_for("reference")[2]
    assert AutoDDPM(model, schedule="reference").threshold_warning is not None
    assert AutoDDPM(model).pipeline.lpips_size == 64  # what `autoddpm run` now does
    card.data["lpips_image_size"] = 8
    (model / "model.json").write_text(json.dumps(card.data))
    with pytest.raises(AutoDDPMError, match="lpips_image_size should be an integer no smaller than unet.image_size"):
        read_card(model)


def test_train_then_resume(tmp_path):
    data = _healthy_cohort(tmp_path / "train")
    bundle = tmp_path / "bundle"
    args = ["train", "--data", str(data), "--output", str(bundle), "--image-size", "32", "--channels", "8", "16",
            "--batch-size", "4", "--checkpoint-minutes", "0"]
    assert main([*args, "--steps", "2"]) == 0
    card = json.loads((bundle / "model.json").read_text())
    # 2 volumes x 6 slices, less the 2 lesion slices, less 2 held out for validation.
    assert card["training"]["slices"] == 8
    state = json.loads((bundle / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert card["slice_levels"] == "all"
    assert main(["train", "--output", str(bundle), "--resume", "--steps", "4", "--slice-levels", "mid-axial"]) == 0
    state = json.loads((bundle / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and len(state["history"]) == 4
    # What the card says about the data can be corrected on resume; the recipe cannot.
    assert state["config"]["slice_levels"] == "mid-axial"


def test_train_keeps_snapshots_to_choose_a_checkpoint_from(tmp_path, capsys):
    data = _healthy_cohort(tmp_path / "train")
    bundle = tmp_path / "bundle"
    args = ["train", "--data", str(data), "--output", str(bundle), "--image-size", "32", "--channels", "8", "16",
            "--batch-size", "4", "--checkpoint-minutes", "0"]
    assert main([*args, "--steps", "5", "--snapshot-steps", "-1"]) == 2
    assert "--snapshot-steps must be at least 0" in capsys.readouterr().err and not bundle.exists()
    assert main([*args, "--steps", "5", "--snapshot-steps", "2"]) == 0
    snapshots = bundle / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step-000002", "step-000004"]
    # Each is a bundle of its own that the engine loads, its card saying which step it holds.
    from AutoDDPMLib.models.bundle import load_unet, read_card
    for step in (2, 4):
        card = read_card(snapshots / f"step-{step:06d}")
        assert card.data["training"]["steps"] == step and card.data["training"]["validation_mse_t200"] > 0
        load_unet(card)
    # --resume goes on keeping them, where the run left off.
    assert main(["train", "--output", str(bundle), "--resume", "--steps", "6"]) == 0
    assert sorted(p.name for p in snapshots.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    # The last one holds the EMA weights the checkpoint holds at that step (stored in half precision).
    from safetensors.torch import load_file
    ema = {k[4:]: v for k, v in load_file(str(bundle / "checkpoint" / "state.safetensors")).items() if k.startswith("ema.")}
    kept = load_file(str(snapshots / "step-000006" / "model.safetensors"))
    assert kept.keys() == ema.keys()
    assert all(np.allclose(kept[k].float().numpy(), ema[k].numpy(), atol=1e-3) for k in ema)


def test_train_with_torchrun_on_two_processes(tmp_path):
    # DistributedDataParallel for real, on the CPU (gloo): the path users take on a multi-GPU node.
    data = tmp_path / "train"
    data.mkdir()
    sitk.WriteImage(make_head_volume(lesion=False), str(data / "h_flair.nii.gz"))
    bundle = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "AutoDDPMLib.cli", "--threads", "1", "train", "--data", str(data), "--output", str(bundle),
         "--image-size", "32", "--channels", "8", "16", "--batch-size", "2", "--steps", "3", "--device", "cpu"],
        capture_output=True, text=True, encoding="utf-8", timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((bundle / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 1  # written once, by rank 0
    assert json.loads((bundle / "model.json").read_text())["training"]["steps"] == 3


def test_cli_without_a_command_shows_usage():
    proc = run_cli()
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_train_from_a_trained_model(tiny_model, tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    sitk.WriteImage(make_head_volume(lesion=False), str(data / "h_flair.nii.gz"))
    bundle = tmp_path / "finetuned"
    assert main(["train", "--data", str(data), "--output", str(bundle), "--init-from", str(tiny_model),
                 "--steps", "1", "--batch-size", "2", "--learning-rate", "0"]) == 0
    card = json.loads((bundle / "model.json").read_text())
    assert card["unet"] == json.loads((tiny_model / "model.json").read_text())["unet"]
    assert card["training"]["config"]["initialised_from"].startswith("tiny")
    assert card["training"]["steps_in_all"] == 1  # the tiny model was never trained
    from safetensors.torch import load_file
    before, after = load_file(str(tiny_model / "model.safetensors")), load_file(str(bundle / "model.safetensors"))
    # With a zero learning rate the EMA of the start weights is the start weights.
    assert all(np.allclose(before[k].numpy(), after[k].numpy()) for k in before)


@pytest.mark.parametrize("steps_behind", [0, 16000])
def test_a_continued_run_averages_at_the_full_ema_decay_from_its_first_step(tiny_model, tmp_path, steps_behind):
    # A fresh run's EMA warms up (decay 0.1 at its first step); one continued from a model trained for 16,000 steps
    # keeps averaging as that model's EMA did (0.999), instead of replacing the start weights by its first steps.
    start = tmp_path / "start"
    shutil.copytree(tiny_model, start)
    card = json.loads((start / "model.json").read_text())
    card["training"] = {"steps": steps_behind, "steps_in_all": steps_behind}
    (start / "model.json").write_text(json.dumps(card))
    data = tmp_path / "train"
    data.mkdir()
    sitk.WriteImage(make_head_volume(lesion=False), str(data / "h_flair.nii.gz"))
    bundle = tmp_path / "continued"
    assert main(["train", "--data", str(data), "--output", str(bundle), "--init-from", str(start), "--steps", "1",
                 "--batch-size", "2", "--learning-rate", "1e-2", "--checkpoint-minutes", "0"]) == 0
    from safetensors.torch import load_file
    before = load_file(str(start / "model.safetensors"))
    state = load_file(str(bundle / "checkpoint" / "state.safetensors"))
    decay = 0.999 if steps_behind else 0.1
    for name, weight in before.items():
        network, ema = state[f"network.{name}"], state[f"ema.{name}"]
        assert torch.allclose(ema, decay * weight.float() + (1 - decay) * network, atol=1e-6), name


def _healthy_cohort(folder: Path) -> Path:
    """Two head volumes, each with one lesion slice that training must leave out."""
    folder.mkdir()
    for seed in range(2):
        sitk.WriteImage(make_head_volume(lesion=False, seed=seed), str(folder / f"h{seed}_flair.nii.gz"))
        lesion = np.zeros((6, 40, 48), np.uint8)
        lesion[3, 10:14, 10:14] = 1
        write(folder / f"h{seed}_mask.nii.gz", lesion)
    return folder


def test_train_from_a_prepared_slice_file_where_simpleitk_is_missing(tmp_path, capsys):
    from AutoDDPMLib.training.slice_file import read_slice_file
    from AutoDDPMLib.training.training_data import load_healthy_slices

    data = _healthy_cohort(tmp_path / "train")
    slices = tmp_path / "cohort.safetensors"
    assert main(["prepare-slices", "--data", str(data), "--output", str(slices), "--image-size", "32"]) == 0
    from_volumes = load_healthy_slices([data], 32, (0.5, 99.5), 0.05)
    from_file = read_slice_file(slices, 32, (0.5, 99.5), 0.05)
    assert from_file.shape == from_volumes.shape and (from_file - from_volumes).abs().max() < 5e-4
    # Training reads the file where SimpleITK cannot even be imported (a GPU node without the data stack).
    bundle = tmp_path / "bundle"
    proc = run_cli_without_simpleitk("train", "--data", str(slices), "--output", str(bundle), "--image-size", "32",
                                     "--channels", "8", "16", "--batch-size", "4", "--steps", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((bundle / "model.json").read_text())["training"]["slices"] == 8  # as from the volumes
    # A file prepared for another grid is refused with what to do.
    assert main(["train", "--data", str(slices), "--output", str(tmp_path / "other"), "--image-size", "48",
                 "--channels", "8", "16", "--steps", "1"]) == 2
    assert "prepare it again" in capsys.readouterr().err


def test_a_slice_file_prepared_like_a_model_trains_from_that_model(tiny_model_with, tmp_path):
    # The card's whole preprocessing travels: prepare-slices --like and train --init-from must agree on it.
    start = tiny_model_with("strict", preprocessing={"orientation": "axial", "intensity_percentiles": [1.0, 99.0],
                                                     "min_foreground_fraction": 0.2})
    data = _healthy_cohort(tmp_path / "train")
    slices = tmp_path / "cohort.safetensors"
    assert main(["prepare-slices", "--data", str(data), "--output", str(slices), "--like", str(start)]) == 0
    bundle = tmp_path / "continued"
    assert main(["train", "--data", str(slices), "--output", str(bundle), "--init-from", str(start),
                 "--steps", "1", "--batch-size", "2"]) == 0
    card = json.loads((bundle / "model.json").read_text())
    assert card["preprocessing"]["min_foreground_fraction"] == 0.2
    assert card["preprocessing"]["intensity_percentiles"] == [1.0, 99.0]
