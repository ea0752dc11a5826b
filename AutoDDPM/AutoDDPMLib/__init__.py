"""AutoDDPM engine: unsupervised anomaly detection in brain MRI with diffusion models.

Pure Python + PyTorch, no Slicer import. Its layers, lowest first; a module imports
only from its own layer or lower ones (Testing/test_architecture.py checks):

- ``errors``, ``resources``, ``provenance``, ``cpu_sharing``: what every layer may use;
- ``diffusion``: the network, noise scheduler, sampling schedules, LPIPS, the
  mask / stitch / re-sample pipeline, the ONNX Runtime backend, devices;
- ``volumes``: image files in and out, orientation, intensity windows, model grids;
- ``models``: model cards and weights, the network a card describes, fit checks;
- ``detection``: AutoDDPM on whole volumes;
- ``training``: training data, training, calibration;
- ``benchmark``: datasets, synthetic lesions, methods, scoring, reports, speed;
- ``slicer_bridge``, ``cohort``, ``progress``, ``cli``: the entry points (the Slicer
  module's helpers, runs over many inputs, and the ``autoddpm`` command line).
"""

__version__ = "0.1.0"

from . import legacy_paths

legacy_paths.install()
