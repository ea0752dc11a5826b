"""Runs over many inputs: the files a run writes for each input and the record of how they were made, what to
do with an earlier run's outputs (``--resume``, ``--overwrite``), the cohort's ``summary.csv``, and sharing the
inputs among the processes ``torchrun`` starts.
"""
