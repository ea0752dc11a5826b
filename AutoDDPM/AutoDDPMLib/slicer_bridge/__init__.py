"""What the Slicer module uses of the engine: launching the engine in a background
process and reading its results back. Imports no torch, so Slicer loads the module
without it.
"""
