"""One measured operating point of the sweep: an engine's accuracy and latency.

Shared by the sweep (which produces points), the selection and the report (which read them)
and the bundle (which ships the chosen one). Plain data: JSON in, JSON out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


@dataclass
class SweepPoint:
    """Accuracy and latency of one (resolution, precision, backend, batch, shape mode, fine-tune).

    Attributes:
        resolution: K_test of the engine's input.
        precision: "fp32", "fp16" or "int8" (the ONNX graph's precision).
        backend: "onnxruntime", "tensorrt" or "torch".
        batch_size: images per inference call in the latency measurement.
        shape_mode: "fixed" (engine built for this shape) or "dynamic" (profiles).
        finetuned: FixRes fine-tuned at ``resolution`` (False: the base model tested there).
        top1, top5: accuracy fractions measured on the engine itself; ``*_ci`` 95% Wilson.
        n: evaluated images; ``correct1_bits`` per-image top-1 hits (base64 packbits, image
            order of the evaluation set) for paired tests between points.
        latency_*_ms: per-call latency percentiles and mean at ``batch_size``.
        throughput_ips: images per second at ``batch_size``.
        gflops_per_image: work per image counted from the ONNX graph.
        achieved_gflops: gflops_per_image × throughput; ``peak_gflops`` the machine's measured peak.
        contended: the CPU was busy with other processes during the latency run.
        latency_meta: harness details (threads, warm-up, iterations, load, device).
        latency_rounds: the interleaved timing this latency comes from: ``group`` (store key
            of the batch's latency group), ``index`` (this engine in it) and per-round values
            in ms for ``p50``, ``p90``, ``p99``, ``mean`` (paired with every other member's).
        engine_path, onnx_path, checkpoint: what produced the point.
        quant: int8 details (Q/DQ flavor, float layers, calibration) where relevant.
        engine: the engine's ``EngineArtifact.to_dict()`` (what a bundle ships).
        key: content address in the result store.
        machine: the machine key (``core.env.machine_id``) the latency was timed on.
        error: set when building or measuring failed (other figures are then None).
    """

    resolution: int
    precision: str
    backend: str
    batch_size: int
    shape_mode: str
    finetuned: bool
    top1: float | None = None
    top1_ci: list[float] | None = None
    top5: float | None = None
    top5_ci: list[float] | None = None
    n: int | None = None
    correct1_bits: str | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_mean_ms: float | None = None
    latency_std_ms: float | None = None
    latency_device_p50_ms: float | None = None  # CUDA-event device time (GPU backends), beside host p50
    throughput_ips: float | None = None
    gflops_per_image: float | None = None
    achieved_gflops: float | None = None
    peak_gflops: float | None = None
    contended: bool = False
    latency_meta: dict = field(default_factory=dict)
    latency_rounds: dict | None = None
    engine_path: str | None = None
    onnx_path: str | None = None
    checkpoint: str | None = None
    quant: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    key: str | None = None
    machine: dict | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.top1 is not None and self.latency_p50_ms is not None

    @property
    def label(self) -> str:
        ft = "FixRes" if self.finetuned else "no-FT"
        return f"{self.backend} {self.precision} @{self.resolution} b{self.batch_size} {self.shape_mode} {ft}"

    def correct1(self) -> np.ndarray | None:
        """Per-image top-1 hits (bool array) or None."""
        if self.correct1_bits is None or self.n is None:
            return None
        from fixres_deploy.fixres.evaluate import unpack_bits

        return unpack_bits(self.correct1_bits, self.n)

    def latency(self, percentile: str = "p50") -> float | None:
        return getattr(self, f"latency_{percentile}_ms")

    def set_latency(self, lat: dict) -> None:
        """Take the latency fields of one measurement (a ``LatencyResult.to_dict()``)."""
        self.latency_p50_ms = lat["latency_p50_ms"]
        self.latency_p90_ms = lat["latency_p90_ms"]
        self.latency_p99_ms = lat["latency_p99_ms"]
        self.latency_mean_ms = lat["latency_mean_ms"]
        self.latency_std_ms = lat["latency_std_ms"]
        self.latency_device_p50_ms = lat.get("latency_device_p50_ms")
        self.throughput_ips = lat["throughput_ips"]
        self.contended = bool(lat.get("contended"))
        self.latency_meta = {
            "repeat_p50_ms": lat.get("latency_p50_repeats_ms"),
            "iters": lat.get("iters"),
            "threads": lat.get("threads"),
            "load": lat.get("load"),
            "remeasured": lat.get("remeasured"),
            "p50_spread_pct": lat.get("p50_spread_pct"),
        }
        if self.gflops_per_image and self.throughput_ips:
            self.achieved_gflops = self.gflops_per_image * self.throughput_ips

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepPoint:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
