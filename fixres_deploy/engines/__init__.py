"""ONNX graph + backend + precision + shapes -> verified engine artifact."""
