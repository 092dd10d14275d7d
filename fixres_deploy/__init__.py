"""fixres-deploy: FixRes fine-tuning, export, engines and a principled choice of test resolution.

Importing this package pulls in nothing heavy: torch, onnxruntime, tensorrt and CUDA are
imported by the modules that need them, so `import fixres_deploy` and `fixres-deploy --help`
work on a machine without any of them.
"""

__version__ = "0.1.0"

from fixres_deploy.core.errors import FixResError
from fixres_deploy.core.preprocess import PreprocessConfig

__all__ = ["FixResError", "PreprocessConfig", "__version__"]
