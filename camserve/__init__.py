"""camserve: Grad-CAM for TorchServe, and ONNX graphs that compute the CAM.

The core is torch-only: :class:`CamEngine` explains a batch with one forward and one backward to the
target layer; :mod:`camserve.methods` holds the CAM formulas as pure torch functions.
"""
from .engine import CamEngine, CamResult, heatmaps_at_sizes, normalize_maps, to_uint8
from .methods import available_methods, get_method, register_method

__version__ = "0.1.0"

__all__ = ["CamEngine", "CamResult", "available_methods", "get_method", "register_method",
           "heatmaps_at_sizes", "normalize_maps", "to_uint8", "__version__"]
