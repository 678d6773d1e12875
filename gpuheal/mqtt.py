"""The one MQTT client wrapper every component uses (paho-mqtt 2.x, MQTT v5).

What it does for a component:

* parses ``mqtt://[user:pass@]host:port`` / ``mqtts://`` broker URLs (TLS options as query
  parameters ``?ca=PATH&cert=PATH&key=PATH&insecure=1``);
* connects in the background with exponential backoff and keeps reconnecting;
* checks the reason code in ``on_connect``, re-subscribes every registered pattern and runs
  every re-announce hook (retained state) on *every* connect;
* sets the Last Will ``offline`` (retained, QoS 1) on ``P/H/<component>/status``, publishes
  retained ``online`` on connect and ``offline`` on a clean stop;
* dispatches each message to the handler of its pattern, catching and logging handler errors
  so that one bad message never stops the loop;
* publishes rejected payloads to ``P/deadletter/<component>`` and counts them.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gpuheal.models import DeadLetter
from gpuheal.topics import Topics

log = logging.getLogger(__name__)

Handler = Callable[[paho.MQTTMessage], None]
DEADLETTER_PAYLOAD_CHARS = 1024


class BrokerURLError(ValueError):
    """A broker URL that cannot be used."""


@dataclass(frozen=True)
class BrokerURL:
    """Where the broker is and how to log in."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    tls_insecure: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (default ports 1883 / 8883)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise BrokerURLError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise BrokerURLError(f"broker URL has no host: {url!r}")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise BrokerURLError(f"broker URL has an invalid port: {url!r}") from None
        query = parse_qs(parts.query)

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_certs=one("ca"),
            certfile=one("cert"),
            keyfile=one("key"),
            tls_insecure=one("insecure") in ("1", "true", "yes"),
        )

    def redacted(self) -> str:
        """The URL without the password, for logs."""
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass
class _Subscription:
    pattern: str
    qos: int
    handler: Handler
    no_local: bool = False


@dataclass
class BusStats:
    """Counters a component can report."""

    connects: int = 0
    connect_failures: int = 0
    handler_errors: int = 0
    deadletters: Counter[str] = field(default_factory=Counter)


class Bus:
    """A component's connection to the broker."""

    def __init__(
        self,
        broker: BrokerURL | str,
        component: str,
        host: str,
        topics: Topics | None = None,
        *,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry_s: int | None = None,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        announce_status: bool = True,
        keepalive_s: int = 30,
    ) -> None:
        self.broker = BrokerURL.parse(broker) if isinstance(broker, str) else broker
        self.component = component
        self.host = host
        self.topics = topics or Topics()
        self.stats = BusStats()
        self.manual_ack = manual_ack
        self._announce_status = announce_status
        self._subs: list[_Subscription] = []
        self._hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._stopping = False
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        """MQTT v5 Receive Maximum: unacknowledged QoS>0 messages the broker may send us."""
        self._keepalive_s = keepalive_s
        self.last_connect_error: str | None = None
        self.status_topic = self.topics.status(host, component) if announce_status else None

        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or "",
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        self.client.enable_logger(logging.getLogger(f"paho.{component}"))
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(100)
        if self.broker.username is not None:
            self.client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            self.client.tls_set(
                ca_certs=self.broker.ca_certs,
                certfile=self.broker.certfile,
                keyfile=self.broker.keyfile,
                cert_reqs=ssl.CERT_NONE if self.broker.tls_insecure else ssl.CERT_REQUIRED,
            )
            if self.broker.tls_insecure:
                self.client.tls_insecure_set(True)
        if self.status_topic:
            self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail

    # --- registration ------------------------------------------------------------
    def subscribe(
        self, pattern: str, handler: Handler, qos: int = 1, *, no_local: bool = False
    ) -> None:
        """Register a handler; it is (re-)subscribed on every connect.

        ``no_local``: the MQTT v5 No Local option, so the broker does not send this client's
        own publications back to it (e.g. the analyzer reading retained states it writes).
        """
        sub = _Subscription(pattern, qos, handler, no_local)
        self._subs.append(sub)
        self.client.message_callback_add(pattern, self._wrap(handler))
        if self._connected.is_set():
            self.client.subscribe([(pattern, SubscribeOptions(qos=qos, noLocal=no_local))])

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after every (re)connect: republish retained state there."""
        self._hooks.append(hook)

    # --- life --------------------------------------------------------------------
    def start(self, wait_s: float | None = None) -> bool:
        """Connect in the background (retrying with backoff); optionally wait for it."""
        props = Properties(PacketTypes.CONNECT)
        if self._session_expiry_s is not None:
            props.SessionExpiryInterval = self._session_expiry_s
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        self.client.connect_async(
            self.broker.host,
            self.broker.port,
            keepalive=self._keepalive_s,
            clean_start=self._clean_start,
            properties=props,
        )
        self.client.loop_start()
        if wait_s is not None:
            return self.wait_connected(wait_s)
        return True

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, timeout_s: float = 3.0) -> None:
        """Clean exit: retained ``offline``, then disconnect (no Last Will)."""
        self._stopping = True
        if self._connected.is_set() and self.status_topic:
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            deadline = time.monotonic() + timeout_s
            while not info.is_published() and time.monotonic() < deadline:
                info.wait_for_publish(0.05)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # --- publishing --------------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def ack(self, msg: paho.MQTTMessage) -> None:
        """Acknowledge a QoS>0 message (only with ``manual_ack``) once it is safely handled."""
        if self.manual_ack and msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def deadletter(self, topic: str, payload: bytes, reason: str) -> None:
        """Publish a rejected payload, truncated, with its reason; count it."""
        self.stats.deadletters[reason.split(":", 1)[0]] += 1
        text = payload[: DEADLETTER_PAYLOAD_CHARS * 4].decode("utf-8", errors="replace")
        letter = DeadLetter(
            component=self.component,
            topic=topic[:512],
            reason=reason[:1024],
            payload=text[:DEADLETTER_PAYLOAD_CHARS],
            ts=time.time(),
        )
        log.warning("%s: rejected message on %s: %s", self.component, topic, reason)
        if self._connected.is_set():
            self.publish(self.topics.deadletter(self.component), letter.to_json(), qos=0)

    @property
    def deadletter_count(self) -> int:
        return sum(self.stats.deadletters.values())

    # --- paho callbacks ------------------------------------------------------------
    def _wrap(self, handler: Handler) -> Callable[..., None]:
        def call(_client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
            try:
                handler(msg)
            except Exception:  # a handler bug must not kill the network loop
                self.stats.handler_errors += 1
                log.exception("%s: handler failed on %s", self.component, msg.topic)

        return call

    def _on_connect(self, client: paho.Client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            self.stats.connect_failures += 1
            self.last_connect_error = str(reason_code)
            log.error(
                "%s: broker %s refused the connection: %s",
                self.component, self.broker.redacted(), reason_code,
            )
            return
        self.stats.connects += 1
        self.last_connect_error = None
        if self._subs:
            client.subscribe([(s.pattern, SubscribeOptions(qos=s.qos, noLocal=s.no_local))
                              for s in self._subs])
        if self.status_topic:
            client.publish(self.status_topic, "online", qos=1, retain=True)
        for hook in self._hooks:
            try:
                hook()
            except Exception:  # a failing re-announce must not stop the others
                log.exception("%s: re-announce hook failed", self.component)
        self._connected.set()
        log.info("%s: connected to %s", self.component, self.broker.redacted())

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self._connected.clear()
        if not self._stopping:
            log.warning("%s: disconnected (%s); reconnecting", self.component, reason_code)

    def _on_connect_fail(self, _client, _userdata) -> None:
        self.stats.connect_failures += 1
        self.last_connect_error = "connection failed"


def broker_answers(url: BrokerURL | str, timeout_s: float = 2.0) -> bool:
    """True when an MQTT broker accepts a TCP connection at ``url``."""
    import socket

    broker = BrokerURL.parse(url) if isinstance(url, str) else url
    try:
        with socket.create_connection((broker.host, broker.port), timeout=timeout_s):
            return True
    except OSError:
        return False


def publish_ok(info: paho.MQTTMessageInfo) -> bool:
    return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
