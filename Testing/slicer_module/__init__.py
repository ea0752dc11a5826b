"""Tests of the Slicer module against real MRML (slicer-core); a package so that its conftest does not shadow Testing/conftest.py."""
