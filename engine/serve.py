"""`admrt serve`: an HTTP server that batches requests step by step.

The batching is the C++ core's (engine/csrc/serving.cpp, `core.StepBatcher`): every stage of the
stack is a pool of slots, each slot one image at its own step of its own plan; a request's images
join the running batch at the next step boundary and leave it when done (continuous batching, as
vLLM does for tokens; for diffusion: InstGenIE, SynerDiff). `--batching static` admits a new batch
only when the previous one has left (request-level batching, the baseline). One worker thread runs
the iterations (the GIL released during the steps); the ASGI app (Starlette on uvicorn) validates,
admits or rejects, and waits.

    POST /v1/images/generations  {"class_label": 207, "n": 4, "guidance": 1.0, "seed": 7,
                                  "steps": "ddim25", "response_format": "b64_json" | "png" | "npz",
                                  "stream": false}
    GET  /health   live            GET /ready   models loaded and warm
    GET  /metrics  Prometheus: queue depth, occupied slots, step time, request latency, images,
                   rejections

Errors are one JSON object, {"error": {"message", "type", "param"}}: 400 malformed JSON, 401 a
missing or wrong API key, 413 an oversized body, 422 a bad field (naming it, the value and what was
expected), 503 (with Retry-After) past the queue bound or while draining, 504 past the request
timeout. A client that closes its connection cancels its request: its slots are freed at the next
step boundary. SIGTERM: stop admitting, let in-flight requests finish within --grace seconds
(then cancel them), exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from admrt.cli import CommandError, device_value

log = logging.getLogger("admrt.serve")

RESPONSE_FORMATS = ("b64_json", "png", "npz")
FIELDS = ("class_label", "n", "guidance", "seed", "steps", "response_format", "stream")
MAX_BODY_BYTES = 64 * 1024
CORE_ARGS = {"classes": "class_label", "guidance": "guidance", "steps": "steps", "seeds": "seed"}  # core -> field
SEED_LIMIT = 2 ** 64


# -------------------------------------------------------------------------------------------------
# Request validation: one message per field, naming it, the value and what was expected.

class RequestError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Generation:
    classes: list
    n: int
    guidance: Optional[float]
    seed: int
    steps: str
    response_format: str
    stream: bool


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_generation(body: bytes, max_images: int, num_classes: Optional[int]) -> Generation:
    """The JSON body of POST /v1/images/generations, checked field by field (value ranges of
    classes, guidance and plans are checked again by the core, with the same message style)."""
    try:
        data = json.loads(body, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body: malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"{unknown[0]}: unknown field; expected some of {', '.join(FIELDS)}", unknown[0])

    n = data.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= max_images):
        raise RequestError(422, f"n={json.dumps(n)}: expected an int in [1, {max_images}]", "n")
    label = data.get("class_label")
    if label is None:
        if num_classes is not None:
            raise RequestError(422, f"class_label: required; expected an int in [0, {num_classes}) or a list of them",
                               "class_label")
        classes = []
    elif _is_int(label):
        classes = [label] * (n or 1)
    elif isinstance(label, list) and label and all(_is_int(c) for c in label):
        if n is not None and n != len(label):
            raise RequestError(422, f"n={n}: differs from len(class_label)={len(label)}", "n")
        if len(label) > max_images:
            raise RequestError(422, f"class_label: {len(label)} labels; expected at most {max_images}", "class_label")
        classes = list(label)
    else:
        raise RequestError(422, f"class_label={json.dumps(label)[:60]}: expected an int or a non-empty list of ints",
                           "class_label")
    if num_classes is not None:
        bad = sorted({c for c in classes if not 0 <= c < num_classes})
        if bad:
            raise RequestError(422, f"class_label={bad[:5]}: out of range; expected ids in [0, {num_classes})",
                               "class_label")
    count = len(classes) if classes else (n or 1)

    guidance = data.get("guidance")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise RequestError(422, f"guidance={json.dumps(guidance)}: expected a finite number", "guidance")
        guidance = float(guidance)
    seed = data.get("seed")
    if seed is None:
        seed = random.randrange(2 ** 63)
    elif not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise RequestError(422, f"seed={json.dumps(seed)[:40]}: expected an int in [0, 2**64) (image i gets seed + i)",
                           "seed")
    steps = data.get("steps", "")
    if not isinstance(steps, str) or len(steps) > 64:
        raise RequestError(422, f"steps={json.dumps(steps)[:60]}: expected a step plan such as 'ddim25'", "steps")
    fmt = data.get("response_format", "b64_json")
    if fmt not in RESPONSE_FORMATS:
        raise RequestError(422, f"response_format={json.dumps(fmt)[:40]}: expected one of {', '.join(RESPONSE_FORMATS)}",
                           "response_format")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, f"stream={json.dumps(stream)[:40]}: expected true or false", "stream")
    return Generation(classes, count, guidance, seed, steps, fmt, stream)


# -------------------------------------------------------------------------------------------------
# The worker: the one thread that runs the core's iterations.

@dataclass
class Ticket:
    id: int
    images: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    progress: Optional[asyncio.Queue] = None


class Worker:
    """Runs core.StepBatcher.iterate() while there is work, and hands each finished request's
    result (or error) to the event loop that waits for it."""

    def __init__(self, batcher, metrics):
        self.batcher, self.metrics = batcher, metrics
        self.tickets: dict[int, Ticket] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.pending_images = 0   # admitted, not yet finished
        self.thread = None
        self.step_seconds = 0.0   # the last iteration's time (Retry-After estimates)

    def start(self):
        """Runs the iterations in a thread of their own (tests; `admrt serve` runs them in the
        main thread instead: on CPU, torch runs these steps about 2x slower in a second thread,
        measured 1.6 s vs 3.4-3.6 s for one image of the bundled stack, glibc's per-thread heaps)."""
        self.thread = threading.Thread(target=self.run, name="admrt-steps", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0):
        self.stopping = True
        self.wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def submit(self, gen: Generation, loop, stream: bool = False) -> Ticket:
        """Queues a validated request; raises ValueError with the core's message."""
        guidance = [] if gen.guidance is None else [gen.guidance]
        with self.lock:  # registered before the worker can report it finished
            rid = self.batcher.submit(gen.classes, guidance, [gen.seed], None if gen.classes else gen.n, gen.steps)
            ticket = Ticket(rid, gen.n, loop.create_future(), loop, progress=asyncio.Queue() if stream else None)
            self.tickets[rid] = ticket
            self.pending_images += gen.n
        # A cancelled request's error (core.Cancelled) may have no one left to read it.
        ticket.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.wake.set()
        return ticket

    def cancel(self, ticket: Ticket):
        self.batcher.cancel(ticket.id)
        self.wake.set()

    def run(self):
        """The loop: until stop()."""
        while not self.stopping:
            if not self.batcher.busy:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            start = time.perf_counter()
            try:
                finished = self.batcher.iterate()
            except Exception as exc:  # a bug: keep serving, fail nothing silently
                log.exception("iteration failed: %s", exc)
                finished = []
            self.step_seconds = time.perf_counter() - start
            self.metrics.observe_iteration(self.step_seconds, self.batcher.stats())
            with self.lock:
                tickets = dict(self.tickets)
            for rid, ticket in tickets.items():
                if ticket.progress is not None and rid not in finished:
                    try:
                        p = self.batcher.progress(rid)
                    except ValueError:
                        continue
                    ticket.loop.call_soon_threadsafe(ticket.progress.put_nowait, p)
            for rid in finished:
                with self.lock:
                    ticket = self.tickets.pop(rid, None)
                    if ticket is not None:
                        self.pending_images -= ticket.images
                if ticket is None:  # not submitted through this worker: free it, say so
                    log.warning("request %d finished with no one waiting for it; dropped", rid)
                    try:
                        self.batcher.take(rid)
                    except Exception:
                        pass
                    continue
                try:
                    outcome = ("ok", self.batcher.take(rid))
                except Exception as exc:  # the request's error: Cancelled, a non-finite sample, ...
                    outcome = ("error", exc)
                ticket.loop.call_soon_threadsafe(_resolve, ticket.future, outcome)


def _resolve(future: asyncio.Future, outcome):
    if future.done():
        return
    kind, value = outcome
    if kind == "ok":
        future.set_result(value)
    else:
        future.set_exception(value)


# -------------------------------------------------------------------------------------------------
# Metrics

class Metrics:
    """Prometheus metrics in a registry of their own (GET /metrics)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.queue = Gauge("admrt_queue_images", "Images waiting for a slot", registry=r)
        self.slots = Gauge("admrt_occupied_slots", "Occupied slots", ["stage"], registry=r)
        self.step = Histogram("admrt_step_seconds", "Time of one batched step (all stages)", registry=r,
                              buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.latency = Histogram("admrt_request_latency_seconds", "Request latency, arrival to response", ["outcome"],
                                 registry=r, buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120, 300))
        self.images = Counter("admrt_images_total", "Images returned", registry=r)
        self.requests = Counter("admrt_requests_total", "Requests by outcome", ["outcome"], registry=r)
        self.rejections = Counter("admrt_rejections_total", "Requests refused", ["reason"], registry=r)

    def observe_iteration(self, seconds: float, stats: dict):
        self.step.observe(seconds)
        self.queue.set(stats["queued_images"])
        self.slots.labels("base").set(stats["base_slots"])
        self.slots.labels("upsampler").set(stats["upsampler_slots"])


# -------------------------------------------------------------------------------------------------
# The app

@dataclass
class ServerConfig:
    max_queue: int = 64          # images admitted and not finished, beyond which 503
    max_images: int = 16         # per request
    request_timeout: float = 300.0
    api_key: Optional[str] = None


def create_app(batcher, config: ServerConfig, num_classes: Optional[int], warm: bool = True,
               worker_thread: bool = True):
    """The Starlette app over a core.StepBatcher (its Worker: app.state.worker). worker_thread:
    the worker starts in a thread of its own with the app; else the caller runs worker.run().
    /ready turns 200 once one image has gone through every stage (warm)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = Metrics()
    worker = Worker(batcher, metrics)
    state = {"ready": False, "draining": False, "steps_per_image": 25}

    def error(status: int, message: str, param: Optional[str] = None, headers=None):
        kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
                422: "invalid_request_error", 503: "server_busy", 504: "timeout"}.get(status, "server_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                            headers=headers)

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def ready(request):
        if state["ready"] and not state["draining"]:
            return JSONResponse({"status": "ready", "plans": list(batcher.plans), "slots": batcher.slots})
        return error(503, "draining" if state["draining"] else "warming up", headers={"Retry-After": "1"})

    async def metrics_route(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestError(413, f"body: {declared} bytes; expected at most {MAX_BODY_BYTES}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"body: more than {MAX_BODY_BYTES} bytes; expected at most {MAX_BODY_BYTES}")
            chunks.append(chunk)
        return b"".join(chunks)

    def retry_after() -> str:
        """Seconds until the backlog has gone through the slots, at the last step's time."""
        rounds = math.ceil(worker.pending_images / max(1, batcher.slots))
        return str(max(1, math.ceil(rounds * state["steps_per_image"] * max(worker.step_seconds, 0.001))))

    async def generations(request):
        start = time.perf_counter()
        if state["draining"]:
            metrics.rejections.labels("draining").inc()
            return error(503, "the server is shutting down; retry on another replica", headers={"Retry-After": "1"})
        try:
            gen = parse_generation(await read_body(request), config.max_images, num_classes)
        except RequestError as exc:
            metrics.rejections.labels(f"http_{exc.status}").inc()
            return error(exc.status, exc.message, exc.param)
        if worker.pending_images + gen.n > config.max_queue:
            metrics.rejections.labels("queue_full").inc()
            return error(503, f"queue full: {worker.pending_images} images pending, bound {config.max_queue} "
                              "(--max-queue)", headers={"Retry-After": retry_after()})
        loop = asyncio.get_running_loop()
        try:
            ticket = worker.submit(gen, loop, stream=gen.stream)
        except ValueError as exc:  # the core's validation: class range, plan, guidance without classifier
            message = str(exc)
            param = next((p for arg, p in CORE_ARGS.items() if message.startswith(arg)), None)
            metrics.rejections.labels("http_422").inc()
            return error(422, message.replace("classes:", "class_label:", 1), param)
        if gen.stream:
            return StreamingResponse(_events(ticket, gen, start), media_type="text/event-stream")
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({ticket.future, disconnect}, timeout=config.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # shutdown past the grace period
            worker.cancel(ticket)
            raise
        finally:
            disconnect.cancel()
        if ticket.future not in done:
            worker.cancel(ticket)
            outcome = "disconnected" if disconnect in done else "timeout"
            metrics.requests.labels(outcome).inc()
            metrics.latency.labels(outcome).observe(time.perf_counter() - start)
            return error(504, f"timeout: not done within {config.request_timeout:g} s (--request-timeout)")
        return _respond(ticket, gen, start)

    def _respond(ticket, gen, start):
        try:
            images, labels, _, seeds = ticket.future.result()
        except Exception as exc:
            metrics.requests.labels("failed").inc()
            metrics.latency.labels("failed").observe(time.perf_counter() - start)
            return error(500, f"sampling failed: {exc}")
        metrics.requests.labels("ok").inc()
        metrics.images.inc(len(seeds))
        metrics.latency.labels("ok").observe(time.perf_counter() - start)
        return encode(images.numpy(), None if labels is None else labels.numpy(), seeds, gen)

    async def _events(ticket, gen, start):
        """Server-sent events: `progress` after each step, then `result` (b64_json) or `error`."""
        try:
            while not ticket.future.done():
                getter = asyncio.ensure_future(ticket.progress.get())
                done, _ = await asyncio.wait({getter, ticket.future}, timeout=config.request_timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    getter.cancel()
                    worker.cancel(ticket)
                    yield _sse("error", {"error": {"message": "timeout", "type": "timeout"}})
                    return
                if getter in done:
                    p = getter.result()
                    yield _sse("progress", {"steps_done": p["steps_done"], "steps": p["steps"],
                                            "images_done": p["images_done"], "images": p["images"]})
                else:
                    getter.cancel()
            response = _respond(ticket, gen, start)
            yield _sse("result" if response.status_code == 200 else "error", json.loads(response.body))
        finally:
            if not ticket.future.done():  # the client went away: free its slots
                worker.cancel(ticket)
                metrics.requests.labels("disconnected").inc()

    from starlette.middleware.base import BaseHTTPMiddleware

    class ApiKey(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            if config.api_key and request.url.path != "/health":
                if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                    metrics.rejections.labels("http_401").inc()
                    return error(401, "authorization: expected 'Bearer <the server's --api-key>'")
            return await call_next(request)

    def encode(images: np.ndarray, labels, seeds, gen: Generation):
        seeds = [int(s) for s in seeds]
        labels = None if labels is None else [int(c) for c in labels]
        if gen.response_format == "npz":
            buf = io.BytesIO()
            np.savez(buf, images, np.asarray(labels if labels is not None else [], dtype=np.int64),
                     np.asarray(seeds, dtype=np.uint64))
            return Response(buf.getvalue(), media_type="application/octet-stream",
                            headers={"X-Seeds": ",".join(map(str, seeds))})
        if gen.response_format == "png":
            return Response(_png(np.concatenate(list(images), axis=1)), media_type="image/png",
                            headers={"X-Seeds": ",".join(map(str, seeds)),
                                     "X-Class-Labels": ",".join(map(str, labels or []))})
        data = [{"b64_json": base64.b64encode(_png(img)).decode(), "seed": s,
                 "class_label": None if labels is None else labels[i]} for i, (img, s) in enumerate(zip(images, seeds))]
        return JSONResponse({"created": int(time.time()), "steps": gen.steps or batcher.plans[0], "data": data})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if worker_thread:
            worker.start()
        if warm:  # one image through every stage: lazy initialisation before /ready says ready
            gen = Generation([0] if num_classes else [], 1, None, 0, "", "b64_json", False)
            ticket = worker.submit(gen, asyncio.get_running_loop())
            state["steps_per_image"] = batcher.progress(ticket.id)["steps"]
            await ticket.future
        state["ready"] = True
        try:
            yield
        finally:
            state["draining"] = True
            if worker_thread:
                worker.stop()

    routes = [Route("/health", health), Route("/ready", ready), Route("/metrics", metrics_route),
              Route("/v1/images/generations", generations, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(ApiKey)], lifespan=lifespan)
    app.state.serving = state
    app.state.worker = worker
    return app


async def _wait_disconnect(request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------
# The command

def add_arguments(p: argparse.ArgumentParser) -> None:
    from admrt.stack_loading import DEFAULT_STACK, DEFAULT_STEPS
    from .cli import add_backend_arguments, add_step_options

    p.add_argument("--model", default=None, help="preset name or checkpoint path; default: the bundled stack "
                                                 f"{', '.join(DEFAULT_STACK)}")
    p.add_argument("--model-preset", default=None, help="preset of a released .pt checkpoint")
    p.add_argument("--classifier", default=None, help="noisy classifier for guidance; 'none' for no guidance")
    p.add_argument("--classifier-preset", default=None, help="preset of a released classifier .pt checkpoint")
    p.add_argument("--upsampler", default=None, help="upsampler; 'none' for one stage")
    p.add_argument("--upsampler-preset", default=None, help="preset of a released upsampler .pt checkpoint")
    p.add_argument("--package", default=None, help="an exported package folder (admrt export aoti) instead of models")
    add_backend_arguments(p)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default fp32")
    p.add_argument("--device", type=device_value, default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--steps", default=None,
                   help=f"the step plans served, space-separated, sharing one method (default {DEFAULT_STEPS}); "
                        "the first is a request's default")
    p.add_argument("--upsampler-steps", default=None, help="the upsampler's plan (default: as admrt sample)")
    p.add_argument("--method", default=None, help="sampler over the plans' respacings (as admrt sample)")
    add_step_options(p)
    p.add_argument("--max-batch", type=int, default=16, help="slots per stage: images stepped together")
    p.add_argument("--batching", choices=("step", "static"), default="step",
                   help="step: requests join the running batch at every step boundary; static: a new batch starts "
                        "when the previous one has left (request-level batching)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="images admitted and not finished beyond which a request gets 503 (default 4 x --max-batch)")
    p.add_argument("--max-images", type=int, default=None, help="images per request, n (default --max-batch)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is cancelled (504)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (or ADMRT_API_KEY)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's access and error log")


def build_batcher(args):
    """(core.StepBatcher, the labels a request may ask for) from the command line's models."""
    import torch
    from admrt import core
    from admrt.stack_loading import DEFAULT_STEPS, load_models, upsampler_steps
    from .cli import models_engine, package_engine

    for flag in ("max_batch", "max_queue", "max_images", "port"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise CommandError(f"--{flag.replace('_', '-')}={value}: expected a positive int")
    if not (args.request_timeout > 0 and math.isfinite(args.request_timeout)):
        raise CommandError(f"--request-timeout={args.request_timeout}: expected a positive number of seconds")
    if not (args.grace >= 0 and math.isfinite(args.grace)):
        raise CommandError(f"--grace={args.grace}: expected seconds >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.gd_flags = args.upsampler_gd_flags = None  # admrt sample's options that serve does not take
    if args.package is not None:
        engine = package_engine(args, device)
    else:
        loaded = load_models(args, device)
        args.upsampler_steps = upsampler_steps(args, loaded)
        args.steps = args.steps or DEFAULT_STEPS
        engine = models_engine(args, loaded, device)
    plans = (args.steps or "").split()
    try:
        # The same settings an Engine context takes (checked there), then the batcher over them.
        ctx = engine.context(plans[0] if plans else None, args.upsampler_steps, args.max_batch, eta=args.eta,
                             method=args.method, dynamic_threshold=args.dynamic_threshold,
                             guidance_interval=args.guidance_interval, guidance_every=args.guidance_every, keep=False)
        batcher = core.StepBatcher(engine.stack, ctx.params, plans, args.batching == "step")
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc).split("\n")[0]) from None
    return batcher, engine.num_classes


def run(args: argparse.Namespace) -> int:
    import os
    import signal

    import uvicorn

    batcher, num_classes = build_batcher(args)
    config = ServerConfig(max_queue=args.max_queue or 4 * args.max_batch,
                          max_images=args.max_images or args.max_batch, request_timeout=args.request_timeout,
                          api_key=args.api_key or os.environ.get("ADMRT_API_KEY") or None)
    app = create_app(batcher, config, num_classes, worker_thread=False)
    worker = app.state.worker
    logging.basicConfig(level=args.log_level.upper(), format="admrt serve: %(message)s")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.grace, lifespan="on"))
    # The HTTP server runs in a thread (uvicorn leaves signals alone there); the steps run here, in
    # the main thread. SIGTERM / Ctrl-C: stop admitting, let uvicorn drain within --grace, exit 0;
    # a second signal stops at once.
    signals = []

    def on_signal(sig, frame):
        signals.append(sig)
        app.state.serving["draining"] = True
        server.should_exit = True
        if len(signals) > 1:
            server.force_exit = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    http = threading.Thread(target=server.run, name="admrt-http", daemon=True)
    http.start()
    print(f"admrt serve: {args.batching} batching, {batcher.slots} slots, plans {' '.join(batcher.plans)}; "
          f"http://{args.host}:{args.port}/v1/images/generations", file=sys.stderr, flush=True)
    watcher = threading.Thread(target=lambda: (http.join(), worker.stop()), daemon=True)
    watcher.start()
    worker.run()   # until the HTTP server has shut down
    if not server.started:
        raise CommandError(f"could not serve on {args.host}:{args.port} (in use, or not an address of this machine)")
    if signals:
        print(f"admrt serve: stopped by {signal.Signals(signals[0]).name}; in-flight requests drained",
              file=sys.stderr)
    return 0
