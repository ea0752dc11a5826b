"""The benchmark: datasets, synthetic lesions, the compared methods, scoring, runs split
into parts and merged, reports, figures and speed measurements.
"""

_RUNNER_NAMES = {"add_benchmark_arguments", "add_benchmark_command", "benchmark_main", "default_data_root",
                 "prepare_benchmark_data", "run_benchmark"}


def __getattr__(name: str):
    """``from AutoDDPMLib.benchmark import run_benchmark``, AutoDDPM 0.1.0's path, for one more release."""
    if name not in _RUNNER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    from . import runner

    warnings.warn(f"{__name__}.{name} moved to {runner.__name__}.{name}; the old path will be removed in the next release",
                  DeprecationWarning, stacklevel=2)
    return getattr(runner, name)
