"""AutoDDPM on whole volumes: a model bundle, the pipeline and the volume's slices
put together into a pseudo-healthy volume, an anomaly map and a mask.
"""
