"""The HTTP layer: Starlette routes over the batcher, served by Uvicorn.

Routes:

* Open Inference Protocol (KServe v2, what Triton, KServe and MLServer speak, so
  ``tritonclient.http`` works): ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``,
  ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``.
  Inputs: ``image`` (BYTES [N]: encoded image files; base64 strings in JSON, raw bytes with
  the binary-data extension) served through the batcher and the resolution policy, or
  ``input`` (FP32 [N, 3, R, R], preprocessed by the client at one of the bundle's resolutions:
  the client chose the resolution, the tensor runs as given). Outputs: ``label`` (BYTES),
  ``score`` (FP32), ``resolution`` (INT32), ``probabilities`` (FP32 [N, K]).
* ``POST /v1/classify``: the image file as the body (``Content-Type: image/*`` or
  ``application/octet-stream``) → ``{"label", "index", "score", "resolution", ...}``.
* ``GET /healthz`` and ``GET /metrics`` (Prometheus text).

Latency is counted from the request's arrival: the handler's start, or the time an
``X-Request-Start: t=<unix seconds>`` header states (a proxy's or the client's send time on
the same clock), so the policy sees time spent before the handler ran.

Bad requests get a 4xx with a JSON ``{"error": message}``: 400 (not an image, empty body,
malformed tensors), 404 (unknown model), 413 (over the size limit), 415 (wrong content type).
Overload gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from fixres_deploy.core.errors import require
from fixres_deploy.ship.serve.batcher import Answer, Batcher, Overloaded
from fixres_deploy.ship.serve.metrics import Metrics
from fixres_deploy.ship.serve.model import (
    MAX_IMAGE_BYTES,
    BadImageError,
    ImageTooLargeError,
    decode_image,
)
from fixres_deploy.ship.serve.policy import LatencyTable, Policy

log = logging.getLogger(__name__)

IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
#: ``X-Request-Start: t=<unix seconds>`` (the NGINX / New Relic convention): when a proxy or the
#: client sent the request. The objective is end to end, so time spent before the handler ran
#: (sockets, HTTP parsing, a busy event loop) counts too. Trusted only within this window.
REQUEST_START_HEADER = "x-request-start"
MAX_REQUEST_START_AGE_S = 60.0
V2_DATATYPES = {"FP32": np.float32, "INT32": np.int32}


class RequestError(Exception):
    """A client error: ``status`` and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerConfig:
    """The serving knobs (``fixres-deploy serve`` flags).

    Attributes:
        slo_p99_ms: latency objective, arrival to answer.
        fixed_resolution: serve only this resolution (None: adaptive).
        max_batch: most requests per batch (None: the engine's max, at most 16).
        max_delay_ms: longest wait for a batch to fill.
        max_queue: hard bound of waiting requests.
        max_image_bytes: refuse larger request bodies (413).
        margin: fraction of the objective the policy plans with.
    """

    slo_p99_ms: float
    fixed_resolution: int | None = None
    max_batch: int | None = None
    max_delay_ms: float = 5.0
    max_queue: int = 512
    max_image_bytes: int = MAX_IMAGE_BYTES
    margin: float = 0.8


class Server:
    """A multires model, its policy, batcher and metrics (the state behind the routes)."""

    def __init__(self, model, config: ServerConfig, *, clock=time.monotonic):
        self.model = model
        self.config = config
        self.clock = clock
        max_batch = min(int(config.max_batch or 16), int(model.max_batch))
        table = LatencyTable.from_dict(model.resolutions, model.latency)
        self.policy = Policy(
            table,
            config.slo_p99_ms,
            accuracy=model.accuracy,
            fixed_resolution=config.fixed_resolution,
            max_batch=max_batch,
            margin=config.margin,
            clock=clock,
        )
        self.metrics = Metrics(config.slo_p99_ms, model.resolutions)
        self.batcher = Batcher(
            model.run_batch,
            self.policy,
            self.metrics,
            max_batch=max_batch,
            max_delay_ms=config.max_delay_ms,
            max_queue=config.max_queue,
        )

    def start(self) -> None:
        self.warm_up()
        self.batcher.start()

    def warm_up(self) -> None:
        """Decode one image and run one batch per resolution before serving: the first request
        must not pay for lazy imports and first-run engine setup (its age counts against the
        objective, and admission would refuse it)."""
        import io

        import starlette.concurrency  # noqa: F401  (imported here, not on the first request)
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 64, 32)).save(buf, format="PNG")
        image = decode_image(buf.getvalue())
        for r in self.model.resolutions:
            self.model.run_batch([image], r)

    def stop(self) -> None:
        self.batcher.stop()

    async def classify(self, data: bytes, arrival: float) -> Answer:
        from starlette.concurrency import run_in_threadpool

        self.batcher.admit(arrival)  # refuse before decoding: an overloaded server spends nothing more on it
        image = await run_in_threadpool(decode_image, data, max_bytes=self.config.max_image_bytes)
        future = self.batcher.submit(image, arrival)
        return await asyncio.wrap_future(future)


def arrival_time(server: Server, headers) -> float:
    """The request's arrival on the server's clock: now, or earlier by the age an
    ``X-Request-Start`` header states (ignored when malformed, in the future or too old)."""
    now = server.clock()
    value = headers.get(REQUEST_START_HEADER)
    if not value:
        return now
    try:
        sent = float(value.strip().removeprefix("t="))
    except ValueError:
        return now
    if sent > 1e11:  # microseconds or milliseconds since the epoch
        sent /= 1e6 if sent > 1e14 else 1e3
    age = time.time() - sent
    return now - age if 0.0 <= age <= MAX_REQUEST_START_AGE_S else now


def _error(status: int, message: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _prediction(server: Server, answer: Answer) -> dict:
    p = np.asarray(answer.result)
    i = int(p.argmax())
    return {
        "label": server.model.class_names[i],
        "index": i,
        "score": float(p[i]),
        "resolution": int(answer.resolution),
        "batch_size": answer.batch_size,
        "queue_ms": round(answer.queue_ms, 3),
        "service_ms": round(answer.service_ms, 3),
    }


# --------------------------------------------------------------------------- v2 tensors


def _parse_v2_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON part, the binary part) of an inference request (binary-data extension aware)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(400, f"Inference-Header-Content-Length is not an integer: {header_length!r}") from None
        if not 0 < n <= len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {n} outside the body of {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    if not head:
        raise RequestError(400, "empty inference request: send a JSON body with 'inputs'")
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"inference request is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise RequestError(400, "inference request needs a non-empty 'inputs' list")
    return doc, rest


def _bytes_elements(inp: dict, binary: bytes | None) -> list[bytes]:
    """The elements of a BYTES input: length-prefixed raw bytes (binary) or base64 strings (JSON)."""
    if binary is not None:
        out, pos = [], 0
        while pos < len(binary):
            if pos + 4 > len(binary):
                raise RequestError(400, f"input '{inp['name']}': truncated BYTES element")
            n = int.from_bytes(binary[pos : pos + 4], "little")
            out.append(binary[pos + 4 : pos + 4 + n])
            pos += 4 + n
        return out
    data = inp.get("data")
    if not isinstance(data, list):
        raise RequestError(400, f"input '{inp['name']}' has no 'data' list")
    flat = list(np.asarray(data, dtype=object).reshape(-1))
    out = []
    for i, el in enumerate(flat):
        if not isinstance(el, str):
            raise RequestError(400, f"input '{inp['name']}' element {i}: BYTES elements are base64 strings in JSON")
        try:
            out.append(base64.b64decode(el, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(
                400, f"input '{inp['name']}' element {i} is not base64 (encode the image file)"
            ) from None
    return out


def _split_binary(inputs: list[dict], rest: bytes) -> dict[str, bytes]:
    """Each input's slice of the binary part (``parameters.binary_data_size``)."""
    parts, pos = {}, 0
    for inp in inputs:
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            parts[inp["name"]] = rest[pos : pos + int(size)]
            pos += int(size)
    if pos != len(rest):
        raise RequestError(400, f"binary data of {len(rest)} bytes does not match the inputs' binary_data_size")
    return parts


def _v2_outputs(server: Server, answers: list[tuple[np.ndarray, int]]) -> list[dict]:
    probs = np.stack([p for p, _ in answers]).astype(np.float32)
    idx = probs.argmax(1)
    n = len(answers)
    return [
        {"name": "label", "datatype": "BYTES", "shape": [n], "data": [server.model.class_names[i] for i in idx]},
        {"name": "score", "datatype": "FP32", "shape": [n], "data": [float(probs[j, i]) for j, i in enumerate(idx)]},
        {"name": "resolution", "datatype": "INT32", "shape": [n], "data": [int(r) for _, r in answers]},
        {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.reshape(-1).tolist()},
    ]


def _model_metadata(server: Server) -> dict:
    m = server.model
    return {
        "name": m.name,
        "versions": ["1"],
        "platform": f"fixres-deploy_multires_{m.classifier.engine.backend}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, -1, -1]},
        ],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "resolution", "datatype": "INT32", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(m.class_names)]},
        ],
        "parameters": {
            "resolutions": m.resolutions,
            "accuracy": {str(r): a for r, a in m.accuracy.items()},
            "slo_p99_ms": server.config.slo_p99_ms,
            "fixed_resolution": server.config.fixed_resolution,
        },
    }


# --------------------------------------------------------------------------- the app


def create_app(server: Server):
    """The Starlette application over ``server`` (started and stopped with the app's lifespan)."""
    require("starlette", "serve", "fixres-deploy serve")
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    limit = server.config.max_image_bytes

    async def read_body(request: Request, limit_bytes: int) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit_bytes:
            raise RequestError(413, f"body of {length} bytes is over the limit of {limit_bytes} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit_bytes:
                raise RequestError(413, f"body is over the limit of {limit_bytes} bytes")
        return body

    def guard(handler):
        async def wrapped(request: Request):
            try:
                return await handler(request)
            except RequestError as exc:
                server.metrics.reject("bad_request")
                return _error(exc.status, str(exc))
            except ImageTooLargeError as exc:
                server.metrics.reject("bad_request")
                return _error(413, str(exc))
            except BadImageError as exc:
                server.metrics.reject("bad_request")
                return _error(400, str(exc))
            except Overloaded as exc:
                return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

        return wrapped

    async def healthz(request: Request):
        return JSONResponse({"status": "ok", "model": server.model.name, "queue_length": server.batcher.queue_length})

    async def metrics(request: Request):
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    async def classify(request: Request):
        arrival = arrival_time(server, request.headers)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(IMAGE_CONTENT_TYPES):
            raise RequestError(
                415,
                f"Content-Type {ctype or '(none)'!r}: send the image file's bytes as image/* or application/octet-stream",
            )
        body = await read_body(request, limit)
        if not body:
            raise RequestError(400, "empty body: send the image file's bytes")
        answer = await server.classify(body, arrival)
        return JSONResponse(_prediction(server, answer))

    async def v2_server(request: Request):
        return JSONResponse({"name": "fixres-deploy", "version": _version(), "extensions": ["binary_tensor_data"]})

    async def v2_live(request: Request):
        return Response(status_code=200)

    async def v2_ready(request: Request):
        return Response(status_code=200 if server.batcher.running else 503)

    def check_model(request: Request) -> None:
        name = request.path_params["name"]
        if name != server.model.name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {server.model.name!r}")

    async def v2_model(request: Request):
        check_model(request)
        return JSONResponse(_model_metadata(server))

    async def v2_model_ready(request: Request):
        check_model(request)
        return Response(status_code=200 if server.batcher.running else 503)

    async def v2_infer(request: Request):
        arrival = arrival_time(server, request.headers)
        check_model(request)
        body = await read_body(request, limit * 16)
        doc, rest = _parse_v2_request(body, request.headers.get("inference-header-content-length"))
        binary = _split_binary(doc["inputs"], rest)
        if len(doc["inputs"]) != 1:
            raise RequestError(400, "send one input: 'image' (BYTES) or 'input' (FP32 N x 3 x R x R)")
        inp = doc["inputs"][0]
        name, dtype = inp.get("name"), inp.get("datatype")
        if name == "image":
            if dtype != "BYTES":
                raise RequestError(400, f"input 'image' must be BYTES, got {dtype!r}")
            blobs = _bytes_elements(inp, binary.get("image"))
            if not blobs:
                raise RequestError(400, "input 'image' has no elements")
            answers = await asyncio.gather(*(server.classify(b, arrival) for b in blobs))
            pairs = [(np.asarray(a.result), a.resolution) for a in answers]
        elif name == "input":
            if dtype != "FP32":
                raise RequestError(400, f"input 'input' must be FP32, got {dtype!r}")
            shape = inp.get("shape")
            try:
                if "input" in binary:
                    x = np.frombuffer(binary["input"], dtype="<f4").reshape(shape)
                else:
                    x = np.asarray(inp.get("data"), dtype=np.float32).reshape(shape)
            except (TypeError, ValueError) as exc:
                raise RequestError(400, f"input 'input' does not match its shape {shape}: {exc}") from None
            if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] not in server.model.resolutions:
                raise RequestError(
                    400,
                    f"input 'input' must be N x 3 x R x R with R in {server.model.resolutions}, got {list(x.shape)}",
                )
            logits = await run_in_threadpool(server.model.logits, x)
            from fixres_deploy.ship.runtime import softmax

            pairs = [(p, int(x.shape[2])) for p in softmax(logits)]
        else:
            raise RequestError(400, f"unknown input {name!r}: send 'image' (BYTES) or 'input' (FP32)")
        outputs = _v2_outputs(server, pairs)
        wanted = [o.get("name") for o in doc.get("outputs") or []]
        if wanted:
            unknown = sorted(set(wanted) - {o["name"] for o in outputs})
            if unknown:
                raise RequestError(400, f"unknown output(s) {unknown}")
            outputs = [o for o in outputs if o["name"] in wanted]
        result = {"model_name": server.model.name, "model_version": "1", "outputs": outputs}
        if "id" in doc:
            result["id"] = doc["id"]
        return JSONResponse(result)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/v1/classify", guard(classify), methods=["POST"]),
        Route("/v2", v2_server),
        Route("/v2/health/live", v2_live),
        Route("/v2/health/ready", v2_ready),
        Route("/v2/models/{name}", guard(v2_model)),
        Route("/v2/models/{name}/ready", guard(v2_model_ready)),
        Route("/v2/models/{name}/infer", guard(v2_infer), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _version() -> str:
    from fixres_deploy import __version__

    return __version__


def serve(
    bundle_dir: str,
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    workers: int = 2,
    verify: bool = True,
    log_level: str = "warning",
) -> None:
    """`fixres-deploy serve`: load the bundle and serve until interrupted."""
    uvicorn = require("uvicorn", "serve", "fixres-deploy serve")
    require("starlette", "serve", "fixres-deploy serve")
    from fixres_deploy.ship.serve.model import MultiresModel

    model = MultiresModel(bundle_dir, threads=threads, workers=workers, verify=verify)
    try:
        app = create_app(Server(model, config))
        log.info("serving %s (resolutions %s) on http://%s:%d", model.name, model.resolutions, host, port)
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        model.close()
