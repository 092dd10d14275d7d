"""The sweep's latency stage: competitors timed together, one record per graph structure.

A point's latency depends on what the engine computes, not on its weights, so its record is
keyed by the graph's structure signature (:func:`fixres_deploy.measure.graph_key.graph_signature`)
with the backend, precision, shapes, batch, resolution, machine, threads, library versions and
latency settings (:func:`member_inputs`). The FixRes fine-tuned and the base model at one
resolution — and int8 variants whose calibrations differ only in their scales — share one
record: one measurement, no noise-made difference between them.

All engines that compete in one selection (one batch size, this machine) are timed together
in one ``latency_group`` stage, interleaved in rounds (:func:`fixres_deploy.measure.bench.measure_rounds`),
so that the ratio of any two of them can be computed per round with an interval
(:mod:`fixres_deploy.choose.ratios`). The group's record keeps every round; a group with the
same members (a later sweep over other weights of the same architecture) is a store hit. Each
member also gets its own ``latency`` record under its key (its result and the key of the first
group that timed it): the index of what has been measured on this machine. Points always take
their values from their own group, so that their ratios stay paired.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fixres_deploy.sweep.points import SweepPoint

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    point: SweepPoint
    art: dict
    inputs: dict
    key: str


class LatencyGroups:
    """Collects the sweep's points while engines are built; times them per batch in :meth:`run`."""

    def __init__(self, sweep):
        self.sweep = sweep
        self.pending: list[_Pending] = []
        self._signatures: dict[str, str] = {}

    def signature(self, onnx_path: str) -> str:
        from fixres_deploy.measure.graph_key import graph_signature

        if onnx_path not in self._signatures:
            self._signatures[onnx_path] = graph_signature(onnx_path)
        return self._signatures[onnx_path]

    def member_inputs(self, art: dict, var_path: str, batch: int, res: int, shapes: dict) -> dict:
        """Everything one latency depends on — and nothing about the weights."""
        sw = self.sweep
        return {
            "graph": self.signature(var_path),
            "backend": art.get("backend"),
            "precision": art.get("precision"),
            "shapes": shapes,
            "options": {k: v for k, v in sw.build_options().to_dict().items() if k != "timing_cache"},
            "batch": batch,
            "resolution": res,
            "latency": sw.lat_cfg.to_dict(),
            "machine": sw.machine,
            "threads": sw.cfg.threads,
            "versions": sw.versions,
        }

    def add(self, point: SweepPoint, art: dict, var_path: str, batch: int, res: int, shapes: dict) -> None:
        inputs = self.member_inputs(art, var_path, batch, res, shapes)
        self.pending.append(_Pending(point, art, inputs, self.sweep.store.key("latency", inputs)))

    def run(self) -> list[dict]:
        """Time every batch size's group; fill the points. Returns one summary per group."""
        summaries = []
        for batch in sorted({p.point.batch_size for p in self.pending}):
            summaries.append(self._run_group([p for p in self.pending if p.point.batch_size == batch], batch))
        return summaries

    def _run_group(self, members: list[_Pending], batch: int) -> dict:
        from fixres_deploy.sweep.store import StageFailed

        sw = self.sweep
        unique: dict[str, _Pending] = {}
        for m in sorted(members, key=lambda m: m.key):
            unique.setdefault(m.key, m)
        keys = list(unique)
        what = f"batch {batch}: {len(keys)} engines for {len(members)} points"

        def do_group(d: Path) -> dict:
            from fixres_deploy.backends.base import load_runner
            from fixres_deploy.measure.bench import measure_rounds

            cases, names = [], []
            for k in keys:
                m = unique[k]
                res = m.inputs["resolution"]
                x = np.random.default_rng(0).standard_normal((batch, 3, res, res)).astype(np.float32)
                cases.append((load_runner(m.art), x))
                names.append(m.point.label)
            pairs = self._pairs_that_matter(members, keys, batch)
            return {
                "rounds": measure_rounds(cases, sw.lat_cfg, names=names, pairs=pairs).to_dict(),
                "members": keys,
            }

        inputs = {"members": keys, "latency": sw.lat_cfg.to_dict(), "machine": sw.machine, "batch": batch}
        try:
            rec = sw._run("latency_group", inputs, do_group, what)
        except StageFailed as exc:
            for m in members:
                m.point.error = str(exc)
            return {"key": None, "batch": batch, "members": len(keys), "points": len(members), "error": str(exc)}
        from fixres_deploy.measure.bench import RoundsResult

        rounds = RoundsResult.from_dict(rec["result"]["rounds"], f"store record {rec['key']}")
        index = {k: i for i, k in enumerate(rec["result"]["members"])}
        for k, m in unique.items():
            lat = rounds.results[index[k]].to_dict()
            # the member's own record: found by a later sweep of other weights of this graph
            sw.store.run("latency", m.inputs, lambda d, lat=lat: {**lat, "group": rec["key"]})
        for m in members:
            i = index[m.key]
            m.point.set_latency(rounds.results[i].to_dict())
            m.point.key = m.key
            m.point.latency_rounds = {
                "group": rec["key"],
                "index": i,
                **{s: rounds.per_round(i, s) for s in rounds.round_ms},
            }
        return {
            "key": rec["key"],
            "batch": batch,
            "members": len(keys),
            "points": len(members),
            "rounds": rounds.rounds,
            "stop": rounds.stop,
            "rerun_rounds": rounds.rerun_rounds,
            "contended_rounds": rounds.contended_rounds,
            "seed": rounds.config.get("seed"),
        }

    def _pairs_that_matter(self, members: list[_Pending], keys: list[str], batch: int):
        """The engine pairs the choice depends on, for the adaptive round count.

        Given the engines' current median p50s: neighbours on the Pareto front of the points
        (each point's accuracy is known before timing), and the naive deployment against every
        front point (the headline ratios). Rounds are added until these are decided.
        """
        from dataclasses import replace

        from fixres_deploy.choose.select import naive_point, pareto_front
        from fixres_deploy.sweep.config import SelectionConfig

        engine = [keys.index(m.key) for m in members]
        cfg = SelectionConfig(batch_size=batch)
        train_res = self.sweep.cfg.train_res
        backends = sorted({str(m.point.backend) for m in members})
        modes = sorted({str(m.point.shape_mode) for m in members})

        def pairs(p50_ms: list[float]) -> list[tuple[int, int]]:
            pts = [replace(m.point, latency_p50_ms=p50_ms[e]) for m, e in zip(members, engine)]
            front = pareto_front(pts, cfg)
            out = {(engine[a], engine[b]) for a, b in itertools.pairwise(front)}
            for backend in backends:  # the report's naive point follows the selected one's backend and shape mode
                for mode in modes:
                    n = naive_point(pts, train_res, backend=backend, batch_size=batch, shape_mode=mode)
                    if n is not None:
                        out |= {(engine[n], engine[f]) for f in front}
            return sorted((i, j) for i, j in out if i != j)

        return pairs
