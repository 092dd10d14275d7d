"""Engine backends, side by side: each a builder and a runner with one interface.

    torch        the accuracy reference (eager PyTorch)
    onnxruntime  CPU EP here; CUDA / TensorRT EPs when onnxruntime-gpu is installed
    tensorrt     native TensorRT 10.x / 11.x Python API, cuda-python for memory and streams

Libraries are imported lazily inside the backends; a missing one raises
MissingDependencyError naming the pip extra.
"""

from fixres_deploy.backends.base import (
    BACKENDS,
    BuildOptions,
    EngineArtifact,
    Runner,
    ShapeProfile,
    ShapeSpec,
    build_engine,
    load_runner,
)

__all__ = [
    "BACKENDS",
    "BuildOptions",
    "EngineArtifact",
    "Runner",
    "ShapeProfile",
    "ShapeSpec",
    "build_engine",
    "load_runner",
]
