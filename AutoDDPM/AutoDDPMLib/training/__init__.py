"""Making models: training data, training, and calibration of a bundle's thresholds on
healthy slices.
"""
