"""Test helpers: waiting on conditions with a deadline, and a real MQTT collector."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition",
             interval_s: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.payload)


class Collector:
    """A plain paho subscriber that keeps every message it gets (thread-safe)."""

    def __init__(self, url: str, patterns: list[str] | str, qos: int = 1,
                 username: str | None = None, password: str | None = None) -> None:
        from gpuheal.mqtt import BrokerURL

        self.broker = BrokerURL.parse(url)
        self.patterns = [patterns] if isinstance(patterns, str) else patterns
        self.qos = qos
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.connect_reason: Any = None
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=paho.MQTTv5)
        if username is not None or self.broker.username is not None:
            self.client.username_pw_set(username or self.broker.username,
                                        password or self.broker.password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, _u, _f, reason_code, _p) -> None:
        self.connect_reason = reason_code
        if not reason_code.is_failure:
            client.subscribe([(p, self.qos) for p in self.patterns])

    def _on_message(self, _c, _u, msg) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain),
                                          msg.qos))

    def start(self, timeout_s: float = 10.0) -> Collector:
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise AssertionError(f"collector could not subscribe: {self.connect_reason}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def on(self, suffix: str) -> list[Received]:
        """Messages whose topic ends with ``suffix`` (``/event``, ``/healer/state``...)."""
        return [m for m in self.snapshot() if m.topic.endswith(suffix)]

    def payloads(self, suffix: str) -> list[Any]:
        return [m.json() for m in self.on(suffix) if m.payload]

    def wait(self, predicate: Callable[[list[Received]], Any], timeout_s: float = 10.0,
             what: str = "messages") -> Any:
        return wait_for(lambda: predicate(self.snapshot()), timeout_s, what)


def publish(url: str, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
            username: str | None = None, password: str | None = None) -> None:
    """Publish one message and wait until the broker has it (QoS 1)."""
    from gpuheal.mqtt import BrokerURL

    broker = BrokerURL.parse(url)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if username or broker.username:
        client.username_pw_set(username or broker.username, password or broker.password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


class Speaker:
    """One paho connection (with the URL's credentials, if any) that publishes and reports
    each PUBACK's reason code: what the broker said to a publish, e.g. Not authorized."""

    def __init__(self, url: str) -> None:
        from gpuheal.mqtt import BrokerURL

        broker = BrokerURL.parse(url)
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  protocol=paho.MQTTv5)
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.password)
        self._acks: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.connect_rc: Any = None
        self.dropped = threading.Event()
        """Set when the broker closes the connection (paho then reconnects by itself)."""
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda _c, _u, _f, _rc, _p: self.dropped.set()
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._connected.wait(5), "speaker: no CONNACK"
        assert not self.connect_rc.is_failure, f"speaker refused: {self.connect_rc}"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        self.connect_rc = reason_code
        self._connected.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        with self._lock:
            self._acks[mid] = reason_code

    def send(self, topic: str, payload: bytes | str, qos: int = 1,
             retain: bool = False) -> Any:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code (QoS 0: None)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return None
        wait_for(lambda: info.mid in self._acks, 10, f"PUBACK for {topic}")
        with self._lock:
            return self._acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Speaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeOllama:
    """A tiny HTTP server speaking Ollama's /api/ps and /api/generate; records requests."""

    def __init__(self, models: list[str], fail_generate: bool = False,
                 stuck: threading.Event | None = None) -> None:
        """``stuck``: while it is not set, a generation request never answers (a hung GPU:
        the model runner waits on it)."""
        self.models = list(models)
        self.requests: list[tuple[str, str, Any]] = []
        self.stuck = stuck
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, None))
                if self.path != "/api/ps":
                    self._reply(404, {"error": "not found"})
                    return
                self._reply(200, {"models": [
                    {"name": m, "model": m, "size": 5137025024, "digest": "a" * 64,
                     "expires_at": "2025-11-11T12:05:00Z", "size_vram": 5137025024}
                    for m in fake.models]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, body))
                if self.path != "/api/generate":
                    self._reply(404, {"error": "not found"})
                    return
                if fake.fail_generate:
                    self._reply(500, {"error": "model runner crashed"})
                    return
                if body.get("keep_alive") == 0 and body.get("model") in fake.models:
                    fake.models.remove(body["model"])
                    self._reply(200, {"model": body.get("model"), "created_at":
                                      "2025-11-11T12:00:00Z", "response": "", "done": True,
                                      "done_reason": "unload"})
                    return
                if fake.stuck is not None:
                    fake.stuck.wait(60)  # the client's deadline comes first
                self._reply(200, {"model": body.get("model"), "created_at":
                                  "2025-11-11T12:00:00Z", "response": "ok", "done": True,
                                  "done_reason": "length", "eval_count": 1})

        self.fail_generate = fail_generate
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a client that gave up (a probe past its deadline) is not an error of the stand-in
        self.server.handle_error = lambda *_: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def __enter__(self) -> FakeOllama:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


from pathlib import Path  # noqa: E402  (appended: the constants below need it)

REPO = Path(__file__).resolve().parent.parent
"""The repository root."""
FIXTURES = REPO / "tests" / "fixtures"
"""Test fixtures: stand-in executables, recorded outputs."""
