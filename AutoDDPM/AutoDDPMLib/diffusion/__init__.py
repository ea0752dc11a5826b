"""The diffusion core: the U-Net, the noise scheduler, the sampling schedules, LPIPS, the
mask / stitch / re-sample pipeline, the ONNX Runtime backend and device choice.

Works on batches of 2D slices already on the model grid; knows nothing of files,
volumes or model cards.
"""
