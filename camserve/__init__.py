"""camserve: Grad-CAM for TorchServe, and ONNX graphs that compute the CAM.

The core is torch-only: :class:`CamEngine` explains a batch with one forward and one backward to the
target layer (:func:`cam_step`, the CAM step the ONNX graph traces too); :mod:`camserve.methods`
holds the CAM formulas as pure torch functions. The ONNX side is :mod:`camserve.onnx` (the ``onnx``
extra), imported only when asked for.
"""
from .engine import CamEngine, CamResult, cam_step, heatmaps_at_sizes, normalize_maps, to_uint8
from .methods import available_methods, get_method, register_method

__version__ = "0.1.0"

__all__ = ["CamEngine", "CamResult", "available_methods", "cam_step", "get_method", "register_method",
           "heatmaps_at_sizes", "normalize_maps", "to_uint8", "__version__"]
