"""How an input's outputs were made: the run's settings and the provenance sidecar ``<name>_autoddpm.json``.

``RunSettings`` holds what decides the outputs' values, read from the model card and the options before the
model loads; ``--resume`` skips an input whose sidecar records the same settings. The sidecar adds the facts of
the run (version and commit, backend, device, threads, timings, warnings, the input and its header), so that a
result can be traced and rerun; ``nifti_description`` puts the key facts in the outputs' own headers.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..detection.postprocessing import PostProcessing, option_settings
from ..errors import AutoDDPMError
from ..models.bundle import WEIGHTS_FILE, read_card, resolve_model
from ..provenance import file_sha256, git_commit

RECORD_FORMAT = "autoddpm-run/1"
# A NIfTI header's description holds 80 bytes, the last one its terminating zero; ITK's NIfTI writer fills it
# from this key of an image's metadata.
NIFTI_DESCRIPTION_BYTES = 79
NIFTI_DESCRIPTION_KEY = "ITK_FileNotes"


@dataclass(frozen=True)
class RunSettings:
    """What decides the values of a run's outputs: a run with equal settings writes equal outputs (on the same
    kind of device and backend, which the sidecar records but does not compare)."""

    autoddpm_version: str
    model: str
    model_card_sha256: str
    model_weights_sha256: str
    schedule: str
    postprocess: str  # the option: card or none
    postprocessing: dict[str, Any]  # the steps it stands for
    skull_stripped: bool | None  # whether the inputs are skull-stripped (None: each is looked at)
    threshold: float  # on the output anomaly map, for the mask
    threshold_from: str
    mask_tau: float  # on the likelihood map, for what is re-sampled
    seed: int
    repeats: int
    batch_size: int | None  # as asked (None: the device's default); each batch draws its own noise

    @classmethod
    def for_run(cls, model: str | None, schedule: str, postprocess: str, threshold: float | None, seed: int,
                repeats: int, batch_size: int | None, skull_stripped: bool | None = None) -> RunSettings:
        """The settings of ``autoddpm run`` with these options; reads the model card and hashes the weights
        (tens of milliseconds), without loading the network. Thresholds are chosen as ``AutoDDPM`` chooses them;
        ``threshold`` is that of inputs with skull (a skull-stripped input's is in its sidecar's result)."""
        card = read_card(resolve_model(model))
        settings = option_settings(postprocess, card.postprocessing)
        processing = PostProcessing.from_dict(settings)
        if threshold is not None:
            threshold_from = "--threshold"
        elif settings and card.postprocessed_threshold(schedule, settings) is not None:
            threshold_from = "model card, post-processed map"
        else:
            threshold_from = "model card, raw map"
        weights = card.path.parent / WEIGHTS_FILE
        try:
            weights_sha256 = file_sha256(weights)
        except OSError as error:
            raise AutoDDPMError(f"cannot read the weights {weights} ({error.strerror}); restore the model bundle") from None
        return cls(
            autoddpm_version=__version__,
            model=card.name,
            model_card_sha256=file_sha256(card.path),
            model_weights_sha256=weights_sha256,
            schedule=schedule,
            postprocess=postprocess,
            postprocessing=processing.to_dict(),
            skull_stripped=skull_stripped,
            threshold=card.run_threshold(schedule, settings) if threshold is None else float(threshold),
            threshold_from=threshold_from,
            mask_tau=card.thresholds_for(schedule)[0],
            seed=seed,
            repeats=repeats,
            batch_size=batch_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, recorded: Any) -> list[str]:
        """How the settings a sidecar recorded differ from these, e.g. ``seed 0 (now 1)``; empty when equal."""
        recorded = recorded if isinstance(recorded, dict) else {}
        found = []
        for key, value in self.to_dict().items():
            if recorded.get(key) != value:
                what = key.replace("_", " ")
                found.append(f"another {what.rsplit(' ', 1)[0]}" if key.endswith("sha256")
                             else f"{what} {recorded.get(key)!r} (now {value!r})")
        return found

    def nifti_description(self, threshold: float | None = None) -> str:
        """The key facts for the description field of an output's NIfTI header, e.g.
        ``AutoDDPM 0.1.0 flair-lgg fast thr=0.00568``: enough to tell outputs apart in any viewer
        (``threshold``: the one the input's mask was made with, where it is not ``self.threshold``)."""
        threshold = self.threshold if threshold is None else threshold
        extras = [f"seed={self.seed}"] if self.seed else []
        extras += [f"x{self.repeats}"] if self.repeats > 1 else []
        extras += ["raw map"] if self.postprocessing == PostProcessing.none().to_dict() else []
        text = " ".join([f"AutoDDPM {self.autoddpm_version} {self.model} {self.schedule} thr={threshold:.3g}", *extras])
        return text.encode("ascii", "replace")[:NIFTI_DESCRIPTION_BYTES].decode("ascii")


def input_facts(path: Path, image: Any) -> dict[str, Any]:
    """The input as the run read it: where it is, its bytes' hash (a file; not a DICOM folder) and its grid."""
    facts: dict[str, Any] = {"path": str(path.resolve()), "name": path.name}
    if path.is_file():
        facts.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    spacing = image.GetSpacing()
    facts.update(size=list(image.GetSize()), spacing=list(spacing), origin=list(image.GetOrigin()),
                 direction=list(image.GetDirection()), voxel_ml=spacing[0] * spacing[1] * spacing[2] / 1000.0)
    return facts


@dataclass(frozen=True)
class RunContext:
    """What the sidecars of one run share: its settings, the command, the model's load time and, under
    torchrun, which of the processes wrote them; the commit is looked up once (it runs git twice)."""

    settings: RunSettings
    command: str
    model_load_seconds: float
    rank: int = 0
    world_size: int = 1
    commit: str = field(default_factory=git_commit)


def run_record(run: RunContext, *, input_path: Path, image: Any, engine: Any, result: Any, outputs: dict[str, Path],
               reading_seconds: float) -> dict[str, Any]:
    """The sidecar of one input's outputs: ``engine`` is the ``AutoDDPM`` that ran, ``result`` its
    ``VolumeResult``, ``image`` the input as read."""
    import torch  # loaded with the engine already

    return {
        "format": RECORD_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "autoddpm": {"version": __version__, "commit": run.commit, "command": run.command},
        "settings": run.settings.to_dict(),
        "model": {"name": engine.card.name, "folder": str(engine.card.path.parent.resolve()),
                  "license": engine.card.data.get("license")},
        "run": {"backend": engine.backend_name, "backend_note": engine.backend_note, "device": str(engine.device),
                "batch_size": engine.batch_size, "threads": torch.get_num_threads(),
                "evaluations_per_slice": result.evaluations_per_slice, "postprocessing": result.postprocessing,
                "rank": run.rank, "world_size": run.world_size},
        "input": input_facts(input_path, image),
        "result": {"slices": result.slices, "slices_with_signal": result.slices_with_signal,
                   "anomalous_voxels": result.anomalous_voxels, "anomalous_volume_ml": result.anomalous_volume_ml,
                   "threshold": result.threshold, "skull_stripped": result.skull_stripped},
        "timings": {"model_load_seconds": round(run.model_load_seconds, 3), "reading_seconds": round(reading_seconds, 3),
                    "processing_seconds": round(result.seconds, 3)},
        "warnings": list(result.warnings),
        "outputs": {kind: path.name for kind, path in outputs.items()},
    }


def record_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def read_record(path: Path) -> dict[str, Any] | None:
    """The sidecar at ``path``, or None where there is none or it is not one AutoDDPM wrote."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(record, dict) and record.get("format") == RECORD_FORMAT
            and all(isinstance(record.get(part), dict) for part in ("settings", "outputs", "result", "timings"))):
        return None
    return record
