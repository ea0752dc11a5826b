"""The benchmark: datasets, synthetic lesions, the compared methods, scoring, runs split
into parts and merged, reports, figures and speed measurements.
"""
