"""The ONNX side of camserve: CAM graphs on onnxruntime, the batch job and its Ray Data runner."""
