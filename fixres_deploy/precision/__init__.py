"""Precision variants of an ONNX graph (fp16, int8 Q/DQ) and their calibration data."""
