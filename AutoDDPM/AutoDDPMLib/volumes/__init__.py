"""Volumes in and out: reading and writing medical images, orientation, intensity
windows, and moving axial slices to and from a model's grid.
"""
