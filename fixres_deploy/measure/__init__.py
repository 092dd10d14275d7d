"""Latency measurement of engines and the machine's load while measuring."""
