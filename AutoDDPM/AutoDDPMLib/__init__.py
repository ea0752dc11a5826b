"""AutoDDPM engine: unsupervised anomaly detection in brain MRI with diffusion models.

Pure Python + PyTorch (no Slicer import): the network, the noise schedule, the
mask / stitch / re-sample pipeline, volume I/O, model bundles, training,
calibration, benchmark and the ``autoddpm`` command line.
"""

__version__ = "0.1.0"
