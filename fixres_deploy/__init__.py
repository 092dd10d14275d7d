"""fixres-deploy: FixRes fine-tuning, export, engines and a principled choice of test resolution.

Importing this package pulls in nothing heavy: torch, onnxruntime, tensorrt and CUDA are
imported by the modules that need them, so `import fixres_deploy` and `fixres-deploy --help`
work on a machine without any of them.
"""

__version__ = "0.1.0"

from fixres_deploy.errors import FixResError  # noqa: E402  (lightweight, no third-party imports)
from fixres_deploy.preprocess import PreprocessConfig  # noqa: E402

__all__ = ["FixResError", "PreprocessConfig", "__version__"]
