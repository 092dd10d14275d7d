"""The one config schema of ``sweep`` and ``run``: typed fields from which TOML keys and flags derive.

Every setting is one dataclass field declared with :func:`option`: its type annotation, its
default, its help text, its TOML section and key and its command-line flag live in that one
declaration. From it come

* the ``run.toml`` sections ``[model] [data] [sweep] [select] [output]`` (:func:`read_config`),
* the argparse options of ``sweep``, ``select``, ``report`` and ``run`` (:func:`add_options`),
* the checks: type, choices, bounds, empty lists, unknown sections and keys (with the closest
  known name) — all before any work starts,
* the effective config written next to the results (:func:`write_effective_config`,
  ``OUT/config.effective.toml`` with ``schema_version``), which ``run --config`` reads back.

Layering for ``run --config FILE --flag ...``: field defaults, then the file, then the flags
given explicitly on the command line (argparse defaults are suppressed, so only what the user
typed overrides the file). docs/config.md says how to add a field.

Nothing heavy is imported here: the CLI builds its parsers from this module.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from typing import Any

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.data.folders import DEFAULT_VAL_FRACTION

SCHEMA_VERSION = 1
EFFECTIVE_CONFIG = "config.effective.toml"
SECTIONS = ("model", "data", "sweep", "select", "output")

PRECISIONS = ("fp32", "fp16", "int8")
SHAPE_MODES = ("fixed", "dynamic")
SWEEP_BACKENDS = ("onnxruntime", "tensorrt")
LATENCY_PRESETS = ("quick", "standard", "thorough")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    section: str = "sweep",
    key: str | None = None,
    flag: str | None = None,
    example: str | None = None,
    choices: tuple | None = None,
    minimum: float | None = None,
    fraction: bool = False,
    path: bool = False,
    consts: dict[str, Any] | None = None,
    validator: Callable[[Any, str], None] | None = None,
) -> Any:
    """A config field: default, help, TOML place, flag and checks in one declaration.

    Args:
        default: the default (lists and dicts are copied per instance); omit for a required field.
        help: one line for ``--help`` and docs.
        section: TOML section (``model``, ``data``, ``sweep``, ``select``, ``output``).
        key: TOML key (default: the field name).
        flag: command-line flag (default: ``--`` + the key with dashes); for a bool that
            defaults to True, the flag that turns it off (e.g. ``--no-bundle``).
        example: a valid TOML line shown in error messages (default: ``key = <default>``).
        choices: allowed values (of the value, or of each list element).
        minimum: smallest allowed number (of the value, or of each list element).
        fraction: the number must lie strictly between 0 and 1.
        path: a file or folder; relative paths in a TOML file are relative to that file.
        consts: flags that set a constant instead of taking a value (``{"--no-finetune": [False]}``).
        validator: ``fn(value, label)`` raising UserInputError for what types cannot say.
    """
    meta = {
        "help": help,
        "section": section,
        "key": key,
        "flag": flag,
        "example": example,
        "choices": choices,
        "minimum": minimum,
        "fraction": fraction,
        "path": path,
        "consts": consts,
        "validator": validator,
    }
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def nested(cls: type) -> Any:
    """A field holding another config class (its fields keep their own sections)."""
    return field(default_factory=cls, metadata={"nested": True})


# --------------------------------------------------------------------------- the schema


def available_backends() -> list[str]:
    """Backends that can run here: onnxruntime when importable; tensorrt with a CUDA GPU."""
    import importlib.util

    out = []
    if importlib.util.find_spec("onnxruntime") is not None:
        out.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                out.append("tensorrt")
        except ImportError:
            pass
    return out


def latency_config(spec: dict | str, label: str = "latency"):
    """The :class:`~fixres_deploy.measure.bench.LatencyConfig` of a preset name or a table of its fields."""
    from fixres_deploy.measure.bench import LatencyConfig

    if isinstance(spec, str):
        if spec not in LATENCY_PRESETS:
            raise UserInputError(
                f"{label}: unknown preset {spec!r}{_closest(spec, LATENCY_PRESETS)}; "
                f"choose from {', '.join(LATENCY_PRESETS)} or give a table of LatencyConfig fields"
            )
        return getattr(LatencyConfig, spec)()
    fields = {f.name: f for f in dataclasses.fields(LatencyConfig)}
    hints = _hints(LatencyConfig)
    for name, value in spec.items():
        if name not in fields:
            raise UserInputError(f"{label}: unknown key {name!r}{_closest(name, fields)}; known: {', '.join(fields)}")
        check_value(fields[name], hints[name], value, f"{label}.{name}", f"latency = {{ {name} = ... }}")
    try:
        return LatencyConfig.from_dict(spec)
    except UserInputError as exc:
        raise UserInputError(f"{label}: {exc}") from exc


def _check_shard(value: Any, label: str) -> None:
    from fixres_deploy.sweep.shard import check_shard_text

    check_shard_text(value, label)


class _Checked:
    """Config classes check every field on construction (TOML, flags and Python alike)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if f.metadata.get("nested"):
                continue
            value = getattr(self, f.name)
            label = f"{type(self).__name__}.{f.name}"
            setattr(self, f.name, check_value(f, hints[f.name], value, label, _example(f)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepConfig(_Checked):
    """What to sweep: the model, the data and the grid (``[model]``, ``[data]``, ``[sweep]``).

    Accuracy is measured on ``eval_data`` (or a file-name hash split of ``train_data`` that is
    never fine-tuned on); ``finetune`` lists which of the base model (false) and the FixRes
    fine-tuned models (true) to measure.
    """

    checkpoint: str = option(help="base model checkpoint (trained at train_res)", section="model", path=True)
    train_data: str = option(
        help="fine-tune and calibration images (ImageFolder root; a training split)",
        section="data",
        key="train",
        flag="--data",
        path=True,
    )
    eval_data: str | None = option(
        None,
        "held-out evaluation images (ImageFolder root); default: a file-name hash split of the training data",
        section="data",
        key="eval",
        flag="--eval-data",
        example='eval = "data/val"',
        path=True,
    )
    val_fraction: float = option(
        DEFAULT_VAL_FRACTION, "held-out share when no evaluation data is given", section="data", fraction=True
    )
    model: str | None = option(
        None,
        "model spec, e.g. torchvision:resnet18 (optional for fixres-deploy checkpoints)",
        section="model",
        key="spec",
        flag="--model",
        example='spec = "torchvision:resnet18"',
    )
    num_classes: int | None = option(
        None, "classifier size (default: inferred)", section="model", example="num_classes = 10", minimum=1
    )
    train_res: int | None = option(
        None, "K_train (default: what the checkpoint records)", section="model", example="train_res = 224", minimum=1
    )
    resolutions: list[int] | None = option(
        None, "candidate test resolutions (default: the prior's)", example="resolutions = [64, 96, 128]", minimum=1
    )
    prior_stride: int = option(32, "network stride of the prior's candidate grid", minimum=1)
    precisions: list[str] = option(list(PRECISIONS), "precisions to build", choices=PRECISIONS)
    backends: list[str] | None = option(
        None,
        "default: the available ones (onnxruntime; tensorrt on a GPU)",
        example='backends = ["onnxruntime"]',
        choices=SWEEP_BACKENDS,
    )
    shape_modes: list[str] = option(list(SHAPE_MODES), "engine shape modes", choices=SHAPE_MODES)
    batch_sizes: list[int] = option([1, 8], "batch sizes to time", minimum=1)
    finetune: list[bool] = option(
        [False, True],
        "measure the base model (false) and/or the FixRes fine-tuned ones (true)",
        consts={"--no-finetune": [False], "--finetuned-only": [True]},
    )
    finetune_epochs: int = option(8, "FixRes fine-tune epochs", minimum=1)
    finetune_lr: float | None = option(None, "FixRes fine-tune learning rate", example="finetune_lr = 0.01", minimum=0)
    calibration_size: int = option(256, "int8 calibration images (class-balanced)", minimum=1)
    calibration_method: str = option("minmax", "int8 calibration", choices=("minmax", "percentile", "entropy"))
    int8_float_layers: str = option(
        "default",
        "'default': first conv and classifier stay float; 'none': every layer int8; 'sensitivity': "
        "the fewest float layers that keep the int8 drop within int8_sensitivity_budget_pts, found per "
        "graph by the per-layer sensitivity analysis on training images",
        choices=("default", "none", "sensitivity"),
    )
    int8_sensitivity_budget_pts: float = option(
        1.0, "top-1 points int8 may cost in the sensitivity analysis (int8_float_layers = 'sensitivity')", minimum=0
    )
    int8_sensitivity_images: int = option(
        300, "training images (not calibration ones) the sensitivity analysis scores on", minimum=10
    )
    exporter: str = option("dynamo", "ONNX exporter", choices=("dynamo", "torchscript", "auto"))
    eval_limit: int | None = option(
        None, "evaluate on at most N images (class-balanced)", example="eval_limit = 500", minimum=1
    )
    latency: dict | str = option(
        "standard",
        "latency preset (quick, standard, thorough) or, in TOML, a table of LatencyConfig fields",
        example='latency = "quick"   or   latency = { repeats = 5, budget_s = 2.0 }',
        validator=lambda value, label: latency_config(value, label),
    )
    threads: int | None = option(None, "ONNX Runtime / torch threads", example="threads = 2", minimum=1)
    store: str | None = option(
        None, "result store folder (default: OUT/store)", example='store = "runs/store"', path=True
    )
    retry_failed: bool = option(False, "re-run stages recorded as failed")
    shard: str | None = option(
        None,
        "compute only shard K/N of the grid into the shared store and stop; 'auto': from torchrun, "
        "a Slurm array or a Kubernetes indexed Job (docs/cluster.md)",
        example='shard = "0/4"',
        validator=_check_shard,
    )
    tensorrt_int8_prediction: bool = option(
        True,
        "when int8 is swept, also measure the TensorRT-flavored int8 graph's top-1 on ONNX Runtime CPU "
        "(TensorRT int8 accuracy predicted before any GPU build)",
        flag="--no-tensorrt-int8-prediction",
    )
    max_pixels: int | None = option(
        None,
        "largest batch x height x width per call (default: from available memory; env FIXRES_MAX_PIXELS)",
        example="max_pixels = 50000000",
        minimum=1,
    )
    diagnostic_images: int = option(
        200, "held-out images for the FixRes diagnostic (pooled features per resolution); 0: skip it", minimum=0
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backends is None:
            self.backends = available_backends()
            if not self.backends:
                raise UserInputError("no backend can run here: install onnxruntime (pip install 'fixres-deploy[cpu]')")

    def latency_config(self):
        """The :class:`~fixres_deploy.measure.bench.LatencyConfig` that ``latency`` names."""
        return latency_config(self.latency)

    def validate(self) -> None:
        """Check that the files and folders exist (types were checked on construction)."""
        if not os.path.isfile(self.checkpoint):
            raise UserInputError(f"checkpoint '{self.checkpoint}' does not exist")
        for name in ("train_data", "eval_data"):
            value = getattr(self, name)
            if value is not None and not os.path.isdir(value):
                raise UserInputError(f"{name} '{value}' is not a folder (ImageFolder root)")


@dataclass
class SelectionConfig(_Checked):
    """What the user wants from the operating point (``[select]``).

    ``objective`` ``max_accuracy`` maximizes top-1 subject to a latency budget;
    ``min_latency`` minimizes latency subject to ``min_top1`` or ``max_drop``. With ``metric``
    ``throughput`` the budget is a minimum in images/s.
    """

    objective: str = option(
        "max_accuracy",
        "max top-1 subject to a latency budget, or min latency subject to an accuracy floor",
        section="select",
        choices=("max_accuracy", "min_latency"),
    )
    metric: str = option("latency", "speed metric", section="select", choices=("latency", "throughput"))
    batch_size: int | None = option(
        None,
        "batch size the choice is made at (default: the smallest measured)",
        section="select",
        flag="--target-batch",
        example="batch_size = 1",
        minimum=1,
    )
    percentile: str = option("p50", "latency percentile", section="select", choices=("p50", "p90", "p99"))
    latency_budget_ms: float | None = option(
        None, "max latency per call (metric latency)", section="select", example="latency_budget_ms = 5.0", minimum=0
    )
    min_throughput_ips: float | None = option(
        None,
        "min images/s (metric throughput)",
        section="select",
        flag="--min-throughput",
        example="min_throughput_ips = 1000.0",
        minimum=0,
    )
    min_top1: float | None = option(
        None, "accuracy floor as a fraction, e.g. 0.9", section="select", example="min_top1 = 0.9", minimum=0
    )
    max_drop: float | None = option(
        None,
        "max top-1 drop from the best point, as a fraction",
        section="select",
        example="max_drop = 0.01",
        minimum=0,
    )
    alpha: float = option(0.05, "significance of the paired accuracy test", section="select", fraction=True)
    latency_rel_tie: float = option(
        0.03, "latency differences below this relative size are ties (unless the spread is larger)", section="select"
    )
    backend: str | None = option(
        None,
        "consider only this backend",
        section="select",
        flag="--only-backend",
        example='backend = "onnxruntime"',
        choices=SWEEP_BACKENDS,
    )
    shape_mode: str | None = option(
        None,
        "consider only this shape mode",
        section="select",
        flag="--only-shape-mode",
        example='shape_mode = "fixed"',
        choices=SHAPE_MODES,
    )
    allow_mixed_machines: bool = option(
        False, "compare latencies timed on different machines (sharded sweeps)", section="select"
    )
    precision: str | None = option(
        None,
        "consider only this precision",
        section="select",
        flag="--only-precision",
        example='precision = "int8"',
        choices=PRECISIONS,
    )


@dataclass
class PipelineConfig(_Checked):
    """``fixres-deploy run``: the sweep, the selection and what to write (``[output]``)."""

    sweep: SweepConfig = field(metadata={"nested": True})
    out: str = option(help="output folder", section="output", key="dir", flag="--out", path=True)
    select: SelectionConfig = nested(SelectionConfig)
    bundle: bool = option(True, "write OUT/bundle for the selected point", section="output", flag="--no-bundle")
    tar: bool = option(False, "also pack the bundle as a .tar.gz", section="output")
    triton: bool = option(True, "write OUT/triton (a Triton model repository)", section="output", flag="--no-triton")

    def validate(self) -> None:
        """Check that the files and folders exist (types were checked on construction)."""
        self.sweep.validate()


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Leaf:
    """One setting: where it lives in the config tree, in TOML and on the command line."""

    path: tuple[str, ...]  # attribute path from the root class, e.g. ("sweep", "precisions")
    owner: type
    field: dataclasses.Field
    type: Any
    section: str
    key: str
    flag: str

    @property
    def dest(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def required(self) -> bool:
        return self.field.default is MISSING and self.field.default_factory is MISSING

    def default(self) -> Any:
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return None if self.field.default is MISSING else self.field.default


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every setting of a config class, nested classes included, in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            yield from leaves(hints[f.name], prefix + (f.name,))
            continue
        m = f.metadata
        key = m.get("key") or f.name
        flag = m.get("flag") or "--" + key.replace("_", "-")
        yield Leaf(prefix + (f.name,), cls, f, hints[f.name], m["section"], key, flag)


def _sections(cls: type) -> dict[str, dict[str, Leaf]]:
    out: dict[str, dict[str, Leaf]] = {}
    for leaf in leaves(cls):
        out.setdefault(leaf.section, {})[leaf.key] = leaf
    return out


# --------------------------------------------------------------------------- checks


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        plural = {bool: "booleans (true/false)", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a table",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _shown(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return f"the {kind.get(type(value), type(value).__name__)} {_toml_value(value) if value is not None else 'none'}"


def _matches(tp: Any, value: Any) -> tuple[bool, Any]:
    """(does ``value`` have type ``tp``, the value normalized: int → float, tuple → list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, v = (value is None, None) if a is type(None) else _matches(a, value)
            if ok:
                return True, v
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False, value
        out = []
        for v in value:
            ok, v = _matches(args[0], v)
            if not ok:
                return False, value
            out.append(v)
        return True, (tuple(out) if origin is tuple else out)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _closest(word: str, known) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_value(f: dataclasses.Field, tp: Any, value: Any, label: str, example: str) -> Any:
    """``value`` checked against a field's type, choices, bounds; returned normalized.

    Raises:
        UserInputError: naming ``label`` (the TOML key, flag or attribute), the expected type
            and ``example``.
    """
    ok, value = _matches(tp, value)
    if not ok:
        raise UserInputError(f"{label}: expected {_describe(tp)}, e.g. {example}; got {_shown(value)}")
    if value is None:
        return value
    m = f.metadata
    items = value if isinstance(value, list | tuple) else [value]
    if isinstance(value, list | tuple) and not value:
        hint = "omit it for the default" if f.default is None else f"e.g. {example}"
        raise UserInputError(f"{label}: the list is empty; {hint}")
    for v in items:
        if m.get("choices") and v not in m["choices"]:
            raise UserInputError(
                f"{label}: unknown value {v!r}{_closest(v, m['choices'])}; choose from {', '.join(m['choices'])}"
            )
        if isinstance(v, int | float) and not isinstance(v, bool):
            if m.get("minimum") is not None and v < m["minimum"]:
                raise UserInputError(f"{label}: must be >= {m['minimum']}, got {v}")
            if m.get("fraction") and not 0 < v < 1:
                raise UserInputError(f"{label}: must lie strictly between 0 and 1, got {v}")
    if m.get("validator"):
        m["validator"](value, label)
    return value


def _example(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("example"):
        return m["example"]
    key = m.get("key") or f.name
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if default is MISSING or default is None:
        return f'{key} = "..."'
    return f"{key} = {_toml_value(default)}"


# --------------------------------------------------------------------------- building


def build(cls: type, values: dict[str, Any], *, missing_hint: str = "") -> Any:
    """An instance of ``cls`` from ``{"section.key": value}`` (defaults for what is absent)."""

    def make(c: type, prefix: tuple[str, ...]) -> Any:
        kwargs = {}
        hints = _hints(c)
        for f in dataclasses.fields(c):
            if f.metadata.get("nested"):
                kwargs[f.name] = make(hints[f.name], prefix + (f.name,))
        for leaf in leaves(c):
            if len(leaf.path) != 1:
                continue  # a nested class's own field: set by its make()
            if leaf.dest in values:
                kwargs[leaf.path[0]] = values[leaf.dest]
            elif leaf.required:
                raise UserInputError(
                    f"missing [{leaf.section}] {leaf.key} (flag {leaf.flag}), e.g. {_example(leaf.field)}{missing_hint}"
                )
        return c(**kwargs)

    return make(cls, ())


def values_of(cfg: Any) -> dict[str, Any]:
    """``{"section.key": value}`` of a config instance (the inverse of :func:`build`)."""
    out = {}
    for leaf in leaves(type(cfg)):
        obj = cfg
        for name in leaf.path:
            obj = getattr(obj, name)
        out[leaf.dest] = obj
    return out


def values_from_toml(data: dict, cls: type, *, source: str, base_dir: str = ".") -> dict[str, Any]:
    """Check a parsed TOML document against the schema; ``{"section.key": value}`` with paths resolved.

    Raises:
        UserInputError: an unknown section or key (with the closest known one), a wrong type,
            an empty list, a value outside its choices or bounds, or another schema version.
    """
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserInputError(
            f"{source}: schema_version {version!r}, this fixres-deploy reads schema_version {SCHEMA_VERSION}; "
            "write the file again with this version (see docs/config.md)"
        )
    sections = _sections(cls)
    all_keys = {key: name for name, keys in sections.items() for key in keys}
    out: dict[str, Any] = {}
    for name, table in data.items():
        if name == "schema_version":
            continue
        if name not in sections:  # every section is checked before any key
            if not isinstance(table, dict) and name in all_keys:
                raise UserInputError(f"{source}: key {name!r} must be inside [{all_keys[name]}]")
            raise UserInputError(
                f"{source}: unknown section [{name}]{_closest(name, sections)}; known: "
                + ", ".join(f"[{s}]" for s in sections)
            )
    for name, table in data.items():
        if name == "schema_version":
            continue
        if not isinstance(table, dict):
            raise UserInputError(f"{source}: [{name}] must be a table of keys, got {_shown(table)}")
        for key, value in table.items():
            leaf = sections[name].get(key)
            if leaf is None:
                where = all_keys.get(key)
                hint = f" (it belongs in [{where}])" if where else _closest(key, sections[name])
                raise UserInputError(
                    f"{source}: unknown key {key!r} in [{name}]{hint}; known: {', '.join(sections[name])}"
                )
            value = check_value(leaf.field, leaf.type, value, f"{source} [{name}] {key}", _example(leaf.field))
            if leaf.field.metadata.get("path") and value is not None and not os.path.isabs(value):
                value = os.path.normpath(os.path.join(base_dir, value))
            out[leaf.dest] = value
    return out


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file parsed, with clear errors for a missing or malformed file."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise UserInputError(f"config '{path}' does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"config '{path}' is not valid TOML: {exc}") from exc


def read_config(path: str | os.PathLike, cls: type = PipelineConfig, overrides: dict[str, Any] | None = None) -> Any:
    """A config file (user-written or a ``config.effective.toml``), checked, with ``overrides`` on top."""
    values = values_from_toml(
        read_toml(path), cls, source=os.fspath(path), base_dir=os.path.dirname(os.path.abspath(path))
    )
    return build(cls, values | (overrides or {}), missing_hint=f" in {os.fspath(path)} or on the command line")


# --------------------------------------------------------------------------- writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: Any) -> str:
    """The config as a TOML document that :func:`read_config` reads back to an equal config.

    Unset optional values (None) are left out: TOML has no null, and absent means the default.
    """
    by_section: dict[str, list[str]] = {}
    for leaf in leaves(type(cfg)):
        obj = cfg
        for name in leaf.path:
            obj = getattr(obj, name)
        if obj is None:
            continue
        by_section.setdefault(leaf.section, []).append(f"{leaf.key} = {_toml_value(obj)}")
    lines = [
        "# The effective config of this run (defaults, file and flags merged); `fixres-deploy run --config` reads it.",
        f"schema_version = {SCHEMA_VERSION}",
    ]
    for section in SECTIONS:
        if section in by_section:
            lines += ["", f"[{section}]"] + by_section[section]
    return "\n".join(lines) + "\n"


def write_effective_config(cfg: Any, out_dir: str | os.PathLike) -> str:
    """Write ``OUT/config.effective.toml`` atomically; returns its path."""
    from fixres_deploy.core.utils import atomic_path

    path = os.path.join(os.fspath(out_dir), EFFECTIVE_CONFIG)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(to_toml(cfg))
    return path


# --------------------------------------------------------------------------- command line


def _csv(text: str) -> list[str]:
    return [t for t in text.replace(" ", "").split(",") if t]


def _int_csv(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,8; got {text!r}") from exc


def _arg_type(tp: Any) -> Callable[[str], Any] | None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if dict in non_none:  # a preset name on the command line, a table only in TOML
            return str
        return _arg_type(non_none[0])
    if origin is list:
        return _int_csv if args[0] is int else _csv
    return {int: int, float: float, str: str}.get(tp)


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))


def add_options(parser: argparse.ArgumentParser, cls: type, *, require: bool = False) -> None:
    """Add one flag per setting of ``cls`` (grouped by TOML section); defaults stay in ``cls``.

    Defaults are suppressed in argparse, so :func:`values_from_args` sees only the flags
    given explicitly: they override a config file.

    Args:
        require: make the flags of required fields required (when there is no config file).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in leaves(cls):
        g = groups.get(leaf.section)
        if g is None:
            g = groups[leaf.section] = parser.add_argument_group(f"[{leaf.section}] settings")
        m = leaf.field.metadata
        default = leaf.default()
        toml = f"[{leaf.section}] {leaf.key}"
        shown = "" if default is None else f"; default {_toml_value(default)}"
        common = {"dest": leaf.dest, "default": argparse.SUPPRESS}
        if m.get("consts"):
            for flag, const in m["consts"].items():
                g.add_argument(flag, action="store_const", const=const, help=f"{toml} = {_toml_value(const)}", **common)
            continue
        if leaf.type is bool:
            g.add_argument(
                leaf.flag,
                action="store_false" if default else "store_true",
                help=f"{m['help']} ({toml}{shown})",
                **common,
            )
            continue
        choices = None if _is_list(leaf.type) else m.get("choices")
        g.add_argument(
            leaf.flag,
            type=_arg_type(leaf.type),
            choices=choices,
            metavar=None if choices else ("A,B,..." if _is_list(leaf.type) else leaf.key.upper()),
            required=require and leaf.required,
            help=f"{m['help']} ({toml}{shown})",
            **common,
        )


def values_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """``{"section.key": value}`` of the flags given explicitly, checked like TOML values."""
    given = vars(args)
    out = {}
    for leaf in leaves(cls):
        if leaf.dest in given:
            out[leaf.dest] = check_value(leaf.field, leaf.type, given[leaf.dest], leaf.flag, _example(leaf.field))
    return out
