"""Typed errors. Every error a user can cause says what was wrong, where, and how to fix it."""

from __future__ import annotations


class FixResError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class UserInputError(FixResError, ValueError):
    """Bad input from the user (a path, an option, a file's content)."""


class ModelLoadError(UserInputError):
    """A model name, factory or checkpoint could not be resolved or does not fit the model."""


class DataError(UserInputError):
    """An image folder is missing, empty or malformed."""


class MissingDependencyError(FixResError, ImportError):
    """An optional library is needed for this feature; the message names the pip extra."""


# The GPU extras pin one CUDA major each (tensorrt-cuXX, cuda-python, onnxruntime-gpu must agree).
GPU_EXTRA = "gpu-cu12"
GPU_EXTRA_HINT = " (or 'fixres-deploy[gpu-cu13]' with a CUDA 13 driver)"


def require_any(modules: tuple[str, ...], extra: str, feature: str, package: str, hint: str = ""):
    """Import the first importable of ``modules`` (e.g. a package's new and old locations).

    Raises:
        MissingDependencyError: none imports; the message lists why each failed and names the
            pip package and the fixres-deploy extra.
    """
    import importlib

    errors = []
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise MissingDependencyError(
        f"{feature} need the Python package '{package}', which is not installed ({'; '.join(errors)}). "
        f"Install it with: pip install 'fixres-deploy[{extra}]'{hint}"
    )


def require(module: str, extra: str, feature: str):
    """Import an optional module or raise a MissingDependencyError naming the pip extra.

    Args:
        module: importable module name, e.g. ``"onnxruntime"``.
        extra: the fixres-deploy extra that provides it, e.g. ``"cpu"``.
        feature: what the user was trying to do, for the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the Python package '{module}', which is not installed "
            f"({exc}). Install it with: pip install 'fixres-deploy[{extra}]'"
        ) from exc
