"""Adaptive-resolution serving: the policy on a fake clock, the batcher's admission control,
and the server end to end with real clients (httpx on /v1/classify, tritonclient on v2)."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from helpers import fixres_checkpoints

RES = (48, 64, 80)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _table(rows=((2.0, 4.0, 8.0), (4.0, 8.0, 16.0), (8.0, 16.0, 32.0)), batches=(1, 4, 8), res=RES):
    from fixres_deploy.ship.serve.policy import LatencyTable

    return LatencyTable.from_dict(list(res), {"batch_sizes": list(batches), "service_ms": [list(r) for r in rows]})


# --------------------------------------------------------------------------- policy (fake clock)


def test_latency_table_interpolates_and_extrapolates():
    t = _table()
    assert t.predict_ms(64, 1) == 4.0
    assert t.predict_ms(64, 2) == pytest.approx(4.0 + (8.0 - 4.0) / 3)
    assert t.predict_ms(64, 8) == 16.0
    assert t.predict_ms(64, 10) == pytest.approx(16.0 + 2 * (16.0 - 8.0) / 4)
    assert t.drain_ms(10, 48, 8) == pytest.approx(t.predict_ms(48, 8) + t.predict_ms(48, 2))


def test_latency_table_refuses_a_malformed_table():
    from fixres_deploy.core.errors import UserInputError

    with pytest.raises(UserInputError, match="one positive time per resolution"):
        _table(rows=((1.0, 2.0, 3.0),))
    with pytest.raises(UserInputError, match="ascending"):
        _table(batches=(4, 1, 8))


def test_policy_serves_the_most_accurate_resolution_that_meets_the_slo():
    from fixres_deploy.ship.serve.policy import Policy

    clock = FakeClock()
    p = Policy(_table(), slo_ms=50, max_batch=8, margin=1.0, clock=clock)
    # an idle server: the most accurate (highest) resolution
    assert p.choose([clock.t]).resolution == 80
    # the oldest request of the batch waited 30 ms: 80 px of 8 requests (32 ms) would finish at 62 ms
    d = p.choose([clock.t - 0.030] + [clock.t] * 7)
    assert (d.resolution, d.feasible) == (64, True)
    assert d.predicted_ms == 16.0
    # 45 ms waited: only the fastest fits (45 + 8 = 53 > 50 at 48 px too): best effort, flagged
    d = p.choose([clock.t - 0.045] + [clock.t] * 7)
    assert (d.resolution, d.feasible) == (48, False)


def test_policy_looks_at_the_queue_behind_the_batch():
    from fixres_deploy.ship.serve.policy import Policy

    clock = FakeClock()
    p = Policy(_table(), slo_ms=50, max_batch=8, margin=1.0, clock=clock)
    batch = [clock.t] * 8
    assert p.choose(batch, []).resolution == 80
    # 16 requests queued behind, the oldest 10 ms old: draining them at 48 px takes 16 ms, so the
    # batch gets at most 50 - 10 - 16 = 24 ms: 64 px (16 ms), not 80 px (32 ms)
    assert p.choose(batch, [clock.t - 0.010] * 16).resolution == 64
    # a longer queue leaves room for the fastest resolution only
    assert p.choose(batch, [clock.t - 0.010] * 32).resolution == 48


def test_policy_ranks_by_accuracy_and_keeps_a_fixed_resolution():
    from fixres_deploy.core.errors import UserInputError
    from fixres_deploy.ship.serve.policy import Policy

    clock = FakeClock()
    # 64 px is the most accurate here (FixRes' best test resolution is not always the largest)
    p = Policy(_table(), slo_ms=100, accuracy={48: 0.80, 64: 0.92, 80: 0.90}, clock=clock)
    assert p.choose([clock.t]).resolution == 64
    fixed = Policy(_table(), slo_ms=10, fixed_resolution=80, margin=1.0, clock=clock)
    d = fixed.choose([clock.t - 0.005] * 8)
    assert (d.resolution, d.feasible) == (80, False)
    with pytest.raises(UserInputError, match="--fixed-resolution 72 is not a resolution"):
        Policy(_table(), slo_ms=10, fixed_resolution=72)
    with pytest.raises(UserInputError, match="--slo-p99-ms must be > 0"):
        Policy(_table(), slo_ms=0)


def test_policy_plans_with_the_observed_slowdown():
    from fixres_deploy.ship.serve.policy import Policy

    clock = FakeClock()
    p = Policy(_table(), slo_ms=40, max_batch=8, margin=1.0, adapt=0.5, clock=clock)
    batch = [clock.t] * 8
    assert p.choose(batch).resolution == 80  # 32 ms predicted
    p.observe(80, 8, 64.0)  # the machine is twice as slow as when the table was measured
    assert p.slowdown == pytest.approx(1.5)
    d = p.choose(batch)
    assert (d.resolution, d.predicted_ms) == (64, pytest.approx(24.0))
    for _ in range(20):
        p.observe(64, 8, 200.0)
    assert p.slowdown == pytest.approx(12.5, rel=1e-3)
    assert p.choose(batch).feasible is False
    frozen = Policy(_table(), slo_ms=40, adapt=0.0, clock=clock)
    frozen.observe(80, 8, 640.0)
    assert frozen.slowdown == 1.0


def test_batcher_refuses_what_even_the_fastest_resolution_cannot_serve_in_time():
    from fixres_deploy.ship.serve.batcher import Batcher, Overloaded
    from fixres_deploy.ship.serve.metrics import Metrics
    from fixres_deploy.ship.serve.policy import Policy

    clock = FakeClock()
    policy = Policy(_table(), slo_ms=50, max_batch=8, margin=1.0, clock=clock)
    metrics = Metrics(50, RES)
    b = Batcher(lambda items, r: items, policy, metrics, max_batch=8, max_queue=100)  # not started: nothing drains
    accepted = 0
    with pytest.raises(Overloaded) as err:
        for _ in range(100):
            b.submit(object())
            accepted += 1
    # 48 px drains 8 requests in 8 ms: 6 full batches (48 ms) + 1 more request (2 ms) fit in 50 ms
    assert accepted == 6 * 8 + 1
    assert err.value.retry_after_s >= 1
    assert metrics.snapshot()["rejected"] == {"overload": 1}
    b.stop()


def test_admission_counts_the_time_a_request_already_waited():
    from fixres_deploy.ship.serve.batcher import Batcher, Overloaded
    from fixres_deploy.ship.serve.metrics import Metrics
    from fixres_deploy.ship.serve.policy import Policy

    clock = FakeClock()
    policy = Policy(_table(), slo_ms=50, max_batch=8, margin=1.0, clock=clock)
    b = Batcher(lambda items, r: items, policy, Metrics(50, RES), max_batch=8)
    b.admit(clock.t - 0.040)  # 40 ms old + 2 ms at 48 px: in time
    with pytest.raises(Overloaded, match="predicted answer 50 ms after arrival"):
        b.admit(clock.t - 0.0485)  # 48.5 ms + 2 ms > 50 ms: refused before any work
    b.submit("x", clock.t - 0.040)
    assert b.queue_length == 1


def test_batcher_runs_batches_and_records_metrics():
    from fixres_deploy.ship.serve.batcher import Batcher
    from fixres_deploy.ship.serve.metrics import Metrics
    from fixres_deploy.ship.serve.policy import Policy

    policy = Policy(_table(), slo_ms=1000, max_batch=4)
    metrics = Metrics(1000, RES)
    seen = []

    def run(items, r):
        seen.append((len(items), r))
        return [x * 2 for x in items]

    b = Batcher(run, policy, metrics, max_batch=4, max_delay_ms=20).start()
    futures = [b.submit(i) for i in range(6)]
    answers = [f.result(timeout=10) for f in futures]
    b.stop()
    assert [a.result for a in answers] == [0, 2, 4, 6, 8, 10]
    assert {a.resolution for a in answers} == {80}
    assert sum(n for n, _ in seen) == 6 and max(n for n, _ in seen) <= 4
    snap = metrics.snapshot()
    assert snap["count"] == 6 and snap["requests"][80] == 6
    text = metrics.render()
    assert 'fixres_requests_total{resolution="80"} 6' in text
    assert 'fixres_request_latency_seconds_bucket{le="+Inf"} 6' in text


# --------------------------------------------------------------------------- the server, end to end


@pytest.fixture(scope="module")
def bundle(demo_trained, tmp_path_factory):
    from fixres_deploy.cli.app import main

    root = tmp_path_factory.mktemp("serve")
    cks = fixres_checkpoints(demo_trained, root / "ck", RES)
    out = root / "demo_multires"
    rc = main(
        [
            "export-multires", "--checkpoints", *cks, "--bundle", str(out), "--val-data", demo_trained["val"],
            "--validation-data", demo_trained["val"], "--max-batch", "8", "--batch-sizes", "1,4,8",
            "--repeats", "2", "--threads", "1", "--val-limit", "30",
        ]
    )  # fmt: skip
    assert rc == 0
    return str(out)


def test_bundle_accuracy_scored_on_the_images_asked_for(bundle, demo_trained, tmp_path, capsys):
    """--val-limit bounds the images behind the manifest's per-resolution top-1 (class-balanced); -1 is refused."""
    from fixres_deploy.cli.app import main

    acc = json.loads(open(os.path.join(bundle, "manifest.json")).read())["multires"]["accuracy"]
    assert [a["resolution"] for a in acc] == list(RES) and all(a["n"] == 30 for a in acc)
    rc = main(
        ["export-multires", "--checkpoints", "a.pt", "b.pt", "--bundle", str(tmp_path / "b"), "--val-limit", "-1"]
    )
    assert rc == 2 and "--val-limit" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model(bundle):
    from fixres_deploy.ship.serve.model import MultiresModel

    m = MultiresModel(bundle, threads=1, workers=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def val_images(demo_trained):
    from fixres_deploy.data.folders import class_balanced_subset, index_image_folder

    index = class_balanced_subset(index_image_folder(demo_trained["val"]), 2)
    return [(open(s.path, "rb").read(), index.classes[s.label], s.path) for s in index.samples]


def _client(model, **config):
    from starlette.testclient import TestClient

    from fixres_deploy.ship.serve.app import Server, ServerConfig, create_app

    server = Server(model, ServerConfig(**{"slo_p99_ms": 1000.0, **config}))
    return TestClient(create_app(server)), server


def test_classify_labels_demo_images_like_the_runtime(model, bundle, val_images):
    from PIL import Image

    from fixres_deploy.ship.runtime import Classifier

    client, _ = _client(model)
    reference = Classifier(bundle, threads=1)
    with client:
        answers = [
            client.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"}).json()
            for data, _, _ in val_images
        ]
    correct = [a["label"] == label for a, (_, label, _) in zip(answers, val_images)]
    assert np.mean(correct) >= 0.7
    for a, (_, _, path) in zip(answers, val_images):
        assert a["resolution"] in RES
        x = reference.prepare(Image.open(path), resolution=a["resolution"])[None]
        expect = reference.class_names[int(reference.logits(x).argmax())]
        assert a["label"] == expect
    reference.close()


def test_fixed_resolution_mode(model, val_images):
    client, _ = _client(model, fixed_resolution=48)
    with client:
        r = client.post("/v1/classify", content=val_images[0][0], headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["resolution"] == 48


def test_bad_requests_get_a_4xx_with_a_message(model, val_images):
    client, server = _client(model, max_image_bytes=len(val_images[0][0]) - 1)
    with client:
        cases = {
            "not an image": client.post("/v1/classify", content=b"hello", headers={"Content-Type": "image/jpeg"}),
            "empty": client.post("/v1/classify", content=b"", headers={"Content-Type": "image/jpeg"}),
            "content type": client.post(
                "/v1/classify", content=val_images[0][0], headers={"Content-Type": "text/plain"}
            ),
            "too large": client.post("/v1/classify", content=val_images[0][0], headers={"Content-Type": "image/jpeg"}),
            "unknown model": client.post("/v2/models/nope/infer", json={"inputs": []}),
            "no inputs": client.post(f"/v2/models/{model.name}/infer", json={"inputs": []}),
            "not json": client.post(f"/v2/models/{model.name}/infer", content=b"{"),
            "not base64": client.post(
                f"/v2/models/{model.name}/infer",
                json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***"]}]},
            ),
            "wrong resolution": client.post(
                f"/v2/models/{model.name}/infer",
                json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]},
            ),
        }
        alive = client.get("/healthz")
    expected = {
        "not an image": 400, "empty": 400, "content type": 415, "too large": 413, "unknown model": 404,
        "no inputs": 400, "not json": 400, "not base64": 400, "wrong resolution": 400,
    }  # fmt: skip
    assert {k: r.status_code for k, r in cases.items()} == expected
    assert all(r.json()["error"] for r in cases.values())
    assert "not a readable image" in cases["not an image"].json()["error"]
    assert "over the limit" in cases["too large"].json()["error"]
    assert alive.status_code == 200  # never a crash
    assert server.metrics.snapshot()["rejected"]["bad_request"] == len(cases)


def test_overload_gets_503_with_retry_after(model, val_images):
    import asyncio

    import httpx

    from fixres_deploy.ship.serve.app import Server, ServerConfig, create_app

    hold, release = threading.Event(), threading.Event()

    class Blocked:
        """The real model, with batches held until released (a burst the server cannot absorb)."""

        def __getattr__(self, name):
            return getattr(model, name)

        def run_batch(self, images, resolution):
            if hold.is_set():  # after the server's warm-up
                release.wait(30)
            return model.run_batch(images, resolution)

    server = Server(Blocked(), ServerConfig(slo_p99_ms=1000.0, max_batch=2, max_queue=4, max_delay_ms=0))
    app = create_app(server)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            server.start()
            hold.set()
            try:
                tasks = [
                    asyncio.create_task(
                        client.post("/v1/classify", content=val_images[0][0], headers={"Content-Type": "image/jpeg"})
                    )
                    for _ in range(12)
                ]
                while server.metrics.snapshot()["rejected"].get("overload", 0) < 6:
                    await asyncio.sleep(0.01)
                release.set()
                return await asyncio.gather(*tasks)
            finally:
                release.set()
                server.stop()

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    # at most the batch in flight (max_batch 2) + max_queue 4 are served; the rest are refused at once.
    # Fewer may be served on a busy machine: admission also refuses a request whose predicted answer
    # (its age + the queue ahead) would miss the objective, and ages grow while decoding is slow.
    assert 1 <= codes.count(200) <= 6 and codes.count(503) == 12 - codes.count(200)
    refused = [r for r in responses if r.status_code == 503]
    assert all(int(r.headers["Retry-After"]) >= 1 and "overloaded" in r.json()["error"] for r in refused)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(model):
    """A real uvicorn on a free localhost port."""
    uvicorn = pytest.importorskip("uvicorn")
    from fixres_deploy.ship.serve.app import Server, ServerConfig, create_app

    server = Server(model, ServerConfig(slo_p99_ms=1000.0))
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield f"127.0.0.1:{port}", server
    uv.should_exit = True
    thread.join(timeout=10)


def test_tritonclient_speaks_v2_to_the_server(live_server, model, val_images):
    httpclient = pytest.importorskip("tritonclient.http")
    url, _ = live_server
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model.name)
    meta = client.get_model_metadata(model.name)
    assert meta["name"] == model.name and {i["name"] for i in meta["inputs"]} == {"image", "input"}
    labels = [label for _, label, _ in val_images]
    for binary in (False, True):  # JSON tensors (base64 strings) and the binary-data extension (raw bytes)
        data = [base64.b64encode(d) if not binary else d for d, _, _ in val_images]
        inp = httpclient.InferInput("image", [len(data)], "BYTES")
        inp.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
        outs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("label", "score", "resolution")]
        result = client.infer(model.name, inputs=[inp], outputs=outs)
        got = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
        assert np.mean([g == want for g, want in zip(got, labels)]) >= 0.7
        assert set(result.as_numpy("resolution").tolist()) <= set(RES)
        assert ((result.as_numpy("score") > 0) & (result.as_numpy("score") <= 1)).all()
    # a client-preprocessed tensor at one of the resolutions runs that resolution's head
    from PIL import Image

    x = model.classifier.prepare(Image.open(val_images[0][2]), resolution=64)[None]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer(
        model.name, inputs=[inp], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    )
    expect = model.classifier.logits(x)
    assert int(result.as_numpy("probabilities").argmax()) == int(expect.argmax())


def test_httpx_classify_and_metrics_on_a_live_server(live_server, val_images):
    import httpx

    url, server = live_server
    before = server.metrics.snapshot()["count"]
    with httpx.Client(base_url=f"http://{url}") as client:
        answers = [
            client.post("/v1/classify", content=d, headers={"Content-Type": "image/jpeg"}) for d, _, _ in val_images
        ]
        metrics = client.get("/metrics")
        health = client.get("/healthz")
    assert all(a.status_code == 200 for a in answers)
    assert np.mean([a.json()["label"] == label for a, (_, label, _) in zip(answers, val_images)]) >= 0.7
    assert health.json()["status"] == "ok"
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "fixres_request_latency_seconds_bucket",
        "fixres_requests_total{resolution=",
        "fixres_queue_length",
        "fixres_slo_misses_total",
        'fixres_rejected_total{reason="overload"}',
    ):
        assert name in text
    count = int(
        next(ln for ln in text.splitlines() if ln.startswith("fixres_request_latency_seconds_count")).split()[1]
    )
    assert count == before + len(val_images)


def test_serve_refuses_a_bundle_without_multires_section(bundle, tmp_path):
    import json
    import shutil

    from fixres_deploy.ship.manifest import BundleError
    from fixres_deploy.ship.serve.model import MultiresModel

    plain = tmp_path / "plain"
    shutil.copytree(bundle, plain)
    d = json.loads((plain / "manifest.json").read_text())
    d["multires"] = None
    (plain / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="not a multires bundle"):
        MultiresModel(str(plain), verify=False)


def test_serve_help_needs_no_server_libraries():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "fixres_deploy", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=True,
    )
    assert "--slo-p99-ms" in out.stdout


def test_request_start_header_moves_the_arrival_back():
    from fixres_deploy.ship.serve.app import arrival_time

    class S:
        clock = FakeClock(500.0)

    now = time.time()
    assert arrival_time(S(), {"x-request-start": f"t={now - 0.25:.6f}"}) == pytest.approx(499.75, abs=0.05)
    assert arrival_time(S(), {"x-request-start": f"t={int((now - 0.25) * 1e6)}"}) == pytest.approx(499.75, abs=0.05)
    for bad in ("t=abc", f"t={now + 30}", f"t={now - 3600}", ""):
        assert arrival_time(S(), {"x-request-start": bad}) == 500.0
    assert arrival_time(S(), {}) == 500.0
