"""Checkpoint -> validated ONNX graph."""
