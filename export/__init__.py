"""The ONNX side's top-level folder of the model card: ``make export`` and ``make batch`` run
``python -m export.onnx_export`` and ``python -m export.batch_cam``, shims over the same ``main`` as
the console scripts ``camserve-export`` and ``camserve-batch`` (the documented way to run them;
README, "Commands"). The code is in :mod:`camserve.onnx`.
"""
