"""camserve's ONNX companion: export a CAM graph (:mod:`export.onnx_export`) and explain folders of
images with it on ONNX Runtime (:mod:`export.batch_cam`).

Both are thin command-line tools over :mod:`camserve`: the graph is a trace of
:class:`camserve.graph.CamGraph` (the engine's own hook, gradient and CAM functions), and the batch
job preprocesses and renders with the same functions as the TorchServe handler.
"""
