"""`admrt serve` through real HTTP on the loopback address: a server in a thread of this process
(uvicorn on the app `admrt serve` runs) for most tests, and `admrt serve` itself in a subprocess
for SIGTERM."""
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import admrt
from admrt import core
from admrt.engine import Engine
from admrt.engine.serve import ServerConfig, create_app

MODELS = ["--model", "fashion16-cond", "--classifier", "fashion16-classifier", "--upsampler", "none",
          "--backend", "eager"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port, method, path, body=None, headers=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class ThreadServer:
    """uvicorn serving create_app(...) on a free loopback port, in a thread."""

    def __init__(self, batcher, config, num_classes=10):
        import uvicorn
        self.app = create_app(batcher, config, num_classes)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not (self.server.started and self.app.state.serving["ready"]):
            assert time.time() < deadline, "server not ready"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def engine():
    return Engine(admrt.load_model("fashion16-cond"), classifier=admrt.load_model("fashion16-classifier"), backend="eager")


def _serve(engine, slots=4, plans=("ddim5", "ddim12"), step=True, **config):
    ctx = engine.context(plans[0], None, slots, keep=False)
    batcher = core.StepBatcher(engine.stack, ctx.params, list(plans), step)
    return ThreadServer(batcher, ServerConfig(**config))


@pytest.fixture(scope="module")
def server(engine):
    s = _serve(engine, max_queue=64, max_images=8)
    yield s
    s.stop()


def test_images_equal_admrt_sample(server, tmp_path):
    """npz response == `admrt sample`'s .npz for the same seed, classes and plan."""
    status, headers, body = _call(server.port, "POST", "/v1/images/generations",
                                  {"class_label": [3, 8], "seed": 7, "steps": "ddim5", "response_format": "npz"})
    assert status == 200, body
    served = np.load(io.BytesIO(body))
    from admrt.cli import main
    assert main(["sample", *MODELS, "--num", "2", "--classes", "3,8", "--seed", "7", "--steps", "ddim5",
                 "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    ref = np.load(next((tmp_path / "run").glob("samples_*.npz")))
    assert np.array_equal(served["arr_0"], ref["arr_0"]) and np.array_equal(served["arr_1"], ref["arr_1"])
    assert served["arr_2"].tolist() == [7, 8] and headers["x-seeds"] == "7,8"


def test_b64_and_png_responses_carry_seeds_and_labels(server):
    status, _, body = _call(server.port, "POST", "/v1/images/generations", {"class_label": 4, "n": 2, "seed": 9})
    assert status == 200
    data = json.loads(body)
    assert [d["seed"] for d in data["data"]] == [9, 10] and [d["class_label"] for d in data["data"]] == [4, 4]
    assert base64.b64decode(data["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n" and data["steps"] == "ddim5"
    status, headers, body = _call(server.port, "POST", "/v1/images/generations",
                                  {"class_label": 1, "seed": 3, "response_format": "png"})
    assert status == 200 and body[:4] == b"\x89PNG" and headers["x-seeds"] == "3" and headers["x-class-labels"] == "1"


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "body: malformed JSON"),
    (b"[1, 2]", 400, "expected a JSON object"),
    (b'{"class_label": 1, "guidance": NaN}', 400, "NaN is not JSON"),
    (b'{"class_label": 1, "guidance": "nan"}', 422, "guidance=\"nan\": expected a finite number"),
    (b'{"class_label": 10}', 422, "class_label=[10]: out of range; expected ids in [0, 10)"),
    (b'{"class_label": 1, "steps": "ddim25"}', 422, "steps='ddim25': this server runs ('ddim5', 'ddim12')"),
    (b'{"class_label": 1, "steps": "bogus"}', 422, "steps="),
    (b'{"class_label": 1, "n": 9}', 422, "n=9: expected an int in [1, 8]"),
    (b'{"class_label": 1, "seed": -1}', 422, "seed=-1"),
    (b'{"class_label": 1, "response_format": "../../etc/passwd"}', 422, "response_format="),
    (b'{"class_label": 1, "prompt": "a cat"}', 422, "prompt: unknown field"),
    (b'{"n": 1}', 422, "class_label: required"),
    (b'{"class_label": 1, "pad": "' + b"x" * 70000 + b'"}', 413, "expected at most 65536"),
])
def test_bad_requests_get_one_json_error(server, body, status, needle):
    got, _, text = _call(server.port, "POST", "/v1/images/generations", body)
    assert got == status, text
    error = json.loads(text)["error"]
    assert needle in error["message"], error


def test_requests_at_different_steps_share_the_batch(server):
    batcher = server.app.state.worker.batcher
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(batcher.stats())
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    results = {}

    def send(name, body, delay):
        time.sleep(delay)
        results[name] = _call(server.port, "POST", "/v1/images/generations", body)[0]
    threads = [threading.Thread(target=send, args=("a", {"class_label": 1, "steps": "ddim12", "seed": 1}, 0)),
               threading.Thread(target=send, args=("b", {"class_label": 2, "steps": "ddim12", "seed": 2}, 0.15))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert results == {"a": 200, "b": 200}
    assert any(s["base_slots"] > 1 and len(set(s["base_steps"])) > 1 for s in seen), \
        "the second request never joined the first's batch at another step"


def test_closing_the_connection_cancels_and_frees_slots(engine):
    srv = _serve(engine, slots=2, plans=("ddim12",))
    try:
        batcher = srv.app.state.worker.batcher
        body = json.dumps({"class_label": 1, "n": 2, "seed": 5}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 30
        while batcher.stats()["base_slots"] < 2:
            assert time.time() < deadline
            time.sleep(0.002)
        sock.close()
        while batcher.stats()["base_slots"] > 0 or batcher.busy:
            assert time.time() < deadline, "slots not freed after the client left"
            time.sleep(0.002)
        assert batcher.stats()["requests"] == 0  # taken and dropped, nothing left behind
        status, _, text = _call(srv.port, "GET", "/metrics")
        assert 'admrt_requests_total{outcome="disconnected"} 1.0' in text.decode()
    finally:
        srv.stop()


def test_streamed_progress_then_result(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/images/generations", body=json.dumps({"class_label": 2, "seed": 4, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [block for block in resp.read().decode().split("\n\n") if block]
    conn.close()
    kinds = [e.split("\n")[0] for e in events]
    assert kinds[-1] == "event: result" and "event: progress" in kinds
    assert json.loads(events[-1].split("data: ", 1)[1])["data"][0]["seed"] == 4


def test_queue_bound_gives_503_with_retry_after(engine):
    srv = _serve(engine, slots=1, plans=("ddim12",), max_queue=2, max_images=2)
    try:
        statuses, lock = [], threading.Lock()

        def send(i):
            got = _call(srv.port, "POST", "/v1/images/generations", {"class_label": 1, "n": 2, "seed": i})
            with lock:
                statuses.append((got[0], got[1].get("retry-after")))
        threads = [threading.Thread(target=send, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(s for s, _ in statuses)
        assert len(codes) == 5 and set(codes) == {200, 503} and codes.count(200) >= 1
        assert all(int(r) >= 1 for s, r in statuses if s == 503)
        assert _call(srv.port, "GET", "/health")[0] == 200
    finally:
        srv.stop()


def test_api_key(engine):
    srv = _serve(engine, slots=1, plans=("ddim5",), api_key="s3cret")
    try:
        assert _call(srv.port, "GET", "/health")[0] == 200
        assert _call(srv.port, "GET", "/metrics")[0] == 401
        status, _, text = _call(srv.port, "POST", "/v1/images/generations", {"class_label": 1},
                                {"Authorization": "Bearer wrong"})
        assert status == 401 and "authorization" in json.loads(text)["error"]["message"]
        assert _call(srv.port, "POST", "/v1/images/generations", {"class_label": 1},
                     {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_work_and_exits_0():
    """`admrt serve` in its own process: SIGTERM while a request runs -> it is answered, new
    connections are refused, the process exits 0."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "admrt.cli", "serve", *MODELS, "--steps", "ddim40",
                             "--max-batch", "2", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if _call(port, "GET", "/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        result = {}
        sender = threading.Thread(target=lambda: result.update(
            r=_call(port, "POST", "/v1/images/generations", {"class_label": 1, "n": 2, "seed": 1})))
        sender.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        sender.join(60)
        assert result["r"][0] == 200
        assert proc.wait(60) == 0
        with pytest.raises(OSError):
            _call(port, "GET", "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_bad_options_in_one_line(capsys):
    from admrt.cli import main
    assert main(["serve", *MODELS, "--steps", "ddim5 250"]) == 1
    assert "share one method" in capsys.readouterr().err
    assert main(["serve", *MODELS, "--max-batch", "0"]) == 1
    assert "--max-batch=0: expected a positive int" in capsys.readouterr().err
