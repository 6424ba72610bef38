"""Command-line entry points of camserve's ONNX side (thin wrappers; the code is in
:mod:`camserve.onnx`): ``python -m export.onnx_export`` (:mod:`camserve.onnx.export`) and
``python -m export.batch_cam`` (:mod:`camserve.onnx.cli`).
"""
