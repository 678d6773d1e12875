"""The one way in and out of the bus: :class:`Bus` (paho-mqtt 2.x, MQTT v5).

No component imports paho; each talks to the broker through a Bus:

* ``subscribe(pattern, model, handler)``: every message on ``pattern`` is parsed once, by
  :func:`gpuheal.wire.decode`, checked against its topic (host, GPU, component) and handed to
  ``handler`` as a frozen, paho-free :class:`Received` (the message, the topic's parts, the
  retain flag, the receive time). A payload that is not a valid message never reaches a
  handler: it goes to ``P/deadletter/<component>`` (or to the ``on_reject`` hook, e.g. the
  recorder's dead-letter table) and is counted. An empty payload (a cleared retained topic)
  goes to ``on_cleared`` when given.
* it connects in the background with paho's doubling backoff (1 s to 30 s) and says why an
  attempt failed in one line (refused, no route, bad credentials, TLS mismatch);
* it checks the reason code in ``on_connect``, re-subscribes every pattern and runs every
  re-announce hook (retained state) on *every* connect;
* the Last Will is a retained ``offline`` on ``P/H/<component>/status`` with the MQTT v5 user
  property ``gpuheal-reason: lost``; a clean stop publishes ``offline`` with ``stopped``;
  ``online`` on every connect;
* handler errors are caught and logged, so one bad message never stops the loop;
* a QoS 1 publication the broker refuses (an ACL, a quota) is logged with its reason code;
* at most ``min(100, the broker's Receive Maximum)`` QoS 1 publications are in flight; a
  component that publishes a lot (the analyzer's States) asks :meth:`Bus.publish_room` first,
  so that paho's unbounded queue never fills.

The client is :class:`gpuheal.mqtt_client.GpuhealClient`: paho with a cheaper receive path.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gpuheal.models import DeadLetter, M
from gpuheal.mqtt_client import GpuhealClient
from gpuheal.topics import TopicParts, Topics
from gpuheal.wire import STATUS_REASON_PROPERTY, PayloadError, decode, topic_mismatch

log = logging.getLogger(__name__)

DEADLETTER_PAYLOAD_CHARS = 1024
INSTANCE_PROPERTY = "gpuheal-instance"
SINCE_PROPERTY = "gpuheal-since"
"""User properties of an exclusive component's ``online``: who claims the host, since when."""
REFUSAL_LOG_INTERVAL_S = 60.0
"""A refused publication on one topic is logged at most this often (seconds)."""
TOPIC_CACHE_SIZE = 16384
"""Parsed topics remembered per subscription (then the cache starts over)."""
_UNPARSED: Any = object()
MAX_INFLIGHT = 100
"""QoS 1 publications in flight (sent, not yet acknowledged) at most; fewer when the broker's
CONNACK says a smaller Receive Maximum (paho itself ignores it). The rest wait in paho's queue;
:meth:`Bus.publish_room` says how many more can go out at once."""


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

    @property
    def address(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.port}"

    def redacted(self) -> str:
        """The URL without the password, for logs."""
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Received(Generic[M]):
    """One valid message as a handler gets it (no paho object in sight)."""

    topic: str
    parts: TopicParts
    """What the topic names: host, GPU index, kind, component."""
    message: M
    """The parsed, validated message."""
    retain: bool
    """True when the broker replayed a retained message (on subscribe): history, not news."""
    qos: int
    received_ts: float
    """Wall clock (UNIX seconds) when it arrived."""
    payload: bytes
    """The bytes as received (e.g. to record them when storing the message fails)."""
    mid: int = 0
    generation: int = 0
    """Which connection delivered it: an acknowledgement only makes sense on that one."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A payload that did not make a message, and why (for the ``on_reject`` hook)."""

    topic: str
    payload: bytes
    reason: str
    received_ts: float
    qos: int = 0
    mid: int = 0
    generation: int = 0


class Delivery:
    """What became of one publication."""

    __slots__ = ("_info",)

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def queued(self) -> bool:
        """paho took it (it is sent now or after the next reconnect)."""
        return self._info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def wait(self, timeout_s: float) -> bool:
        """Wait until it is sent (QoS 0) or acknowledged (QoS 1); True when it was."""
        try:
            self._info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):
            return False
        return self._info.is_published()


@dataclass
class _Subscription:
    pattern: str
    model: type[Any]
    handler: Callable[[Received[Any]], None]
    qos: int
    no_local: bool
    on_cleared: Callable[[TopicParts], None] | None


@dataclass
class BusStats:
    """Counters a component can report."""

    connects: int = 0
    connect_failures: int = 0
    handler_errors: int = 0
    refused_publications: int = 0
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
        on_reject: Callable[[Rejected], None] | None = None,
        exclusive: bool = False,
    ) -> None:
        """``on_reject``: instead of publishing a dead letter, hand rejected payloads to this
        hook (it runs on the network thread and, with ``manual_ack``, must ack them itself).
        ``exclusive``: one such component per host: the client id is
        ``gpuheal-<prefix>-<component>-<host>``, so a second one started for the same host takes the
        session over and this one stops reconnecting (``taken_over``) instead of fighting."""
        self.broker = BrokerURL.parse(broker) if isinstance(broker, str) else broker
        self.component = component
        self.host = host
        self.topics = topics or Topics()
        self.stats = BusStats()
        self.manual_ack = manual_ack
        self._on_reject = on_reject
        self._subs: list[_Subscription] = []
        self._hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._stopping = False
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        """MQTT v5 Receive Maximum: unacknowledged QoS>0 messages the broker may send us."""
        self._keepalive_s = keepalive_s
        self._generation = 0
        self._got_connack = False
        self._refusals: dict[str, float] = {}
        self._pending_refusal: dict[int, str] = {}
        self._refusal_lock = threading.Lock()
        self._max_inflight = MAX_INFLIGHT
        self._room = threading.Event()
        self._room_wanted = False
        self.last_connect_error: str | None = None
        """Why the last connection attempt failed (one line), None once connected."""
        self.auth_failed = False
        """The broker refused our credentials (a one-shot command gives up on this)."""
        self.taken_over = threading.Event()
        """Another client with our (exclusive) client id connected: this one must stop."""
        self.refused_topics: set[str] = set()
        """Topics of QoS 1 publications the broker refused (its ACL, a quota)."""
        self._exclusive = exclusive and announce_status
        self._instance = uuid.uuid4().hex
        self._claim_ts = time.time()
        if exclusive and client_id is None:
            client_id = f"gpuheal-{self.topics.prefix}-{component}-{host}"
        self.status_topic = self.topics.status(host, component) if announce_status else None

        self.client = GpuhealClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or "",
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        paho_log = logging.getLogger(f"paho.{component}")
        paho_log.setLevel(logging.WARNING)  # paho's chatter is DEBUG; a clean stop says nothing
        if not any(isinstance(f, _PahoNoise) for f in paho_log.filters):
            paho_log.addFilter(_PahoNoise())
        self.client.enable_logger(paho_log)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
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
            self.client.will_set(self.status_topic, "offline", qos=1, retain=True,
                                 properties=self._status_properties(
                                     "lost", PacketTypes.WILLMESSAGE))
        if self._exclusive and self.status_topic:
            self.client.message_callback_add(self.status_topic, self._on_own_status)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish

    # --- registration ------------------------------------------------------------
    def subscribe(
        self,
        pattern: str,
        model: type[M],
        handler: Callable[[Received[M]], None],
        *,
        qos: int = 1,
        no_local: bool = False,
        on_cleared: Callable[[TopicParts], None] | None = None,
    ) -> None:
        """Hand every valid ``model`` message on ``pattern`` to ``handler`` (on the network
        thread: it must not block). (Re-)subscribed on every connect.

        ``no_local``: the MQTT v5 No Local option, so the broker does not send this client's
        own publications back to it (e.g. the analyzer reading retained states it writes).
        ``on_cleared``: called with the topic's parts for an empty payload (a retained message
        deleted); without it such messages are ignored.
        """
        sub = _Subscription(pattern, model, handler, qos, no_local, on_cleared)
        self._subs.append(sub)
        self.client.message_callback_add(pattern, self._dispatcher(sub))
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
        """Wait until connected; gives up early when the broker refused our credentials."""
        deadline = time.monotonic() + timeout_s
        while not self._connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self.auth_failed or time.monotonic() >= deadline:
                return False
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, timeout_s: float = 3.0) -> None:
        """Clean exit: retained ``offline`` (reason ``stopped``), then disconnect (no Will)."""
        self._stopping = True
        if self._connected.is_set() and self.status_topic and not self.taken_over.is_set():
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True,
                                       properties=self._status_properties("stopped"))
            Delivery(info).wait(timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # --- publishing --------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str, qos: int = 0,
                retain: bool = False) -> Delivery:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            with self._refusal_lock:
                if len(self._pending_refusal) < 10_000:
                    self._pending_refusal[info.mid] = topic
        return Delivery(info)

    @property
    def inflight_window(self) -> int:
        """QoS 1 publications that may be in flight at once on this connection."""
        return self._max_inflight

    def publish_room(self) -> int:
        """How many more QoS 1 publications go out at once (the in-flight window less those
        not yet acknowledged, queued ones included); 0 while disconnected."""
        if not self._connected.is_set():
            return 0
        return max(0, self._max_inflight - self.client.unacknowledged())

    def wait_publish_room(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for an acknowledgement that may make room; True when
        there is room now."""
        if self.publish_room() > 0:
            return True
        self._room.clear()
        self._room_wanted = True
        try:
            if self.publish_room() > 0:
                return True
            self._room.wait(timeout_s)
        finally:
            self._room_wanted = False
        return self.publish_room() > 0

    def ack(self, received: Received[Any] | Rejected) -> None:
        """Acknowledge a QoS>0 message (only with ``manual_ack``) once it is safely handled;
        a message of an earlier connection is not acknowledged (the broker resends it)."""
        if self.manual_ack and received.qos > 0 and received.generation == self._generation:
            self.client.ack(received.mid, received.qos)

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

    # --- receiving (paho's network thread) ------------------------------------------
    def _dispatcher(self, sub: _Subscription) -> Callable[..., None]:
        topics = self.topics
        model = sub.model
        handler = sub.handler
        is_status = model.__name__ == "Status"
        parsed: dict[str, TopicParts | None] = {}
        """``topics.parse`` per topic, remembered (a site has a few thousand topics; only the
        network thread reads and writes it)."""

        def dispatch(_client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
            now = time.time()
            topic = msg.topic
            payload = msg.payload
            try:
                parts = parsed.get(topic, _UNPARSED)
                if parts is _UNPARSED:
                    if len(parsed) >= TOPIC_CACHE_SIZE:
                        parsed.clear()
                    parts = parsed[topic] = topics.parse(topic)
                if parts is None:
                    raise PayloadError(f"not a topic of prefix {topics.prefix!r}")
                if not payload:
                    if sub.on_cleared is not None:
                        sub.on_cleared(parts)
                    self._ack_raw(msg)
                    return
                reason = None
                if is_status:
                    reason = _user_property(msg, STATUS_REASON_PROPERTY)
                message = decode(model, payload, status_reason=reason)
                mismatch = topic_mismatch(parts, message)
                if mismatch is not None:
                    raise PayloadError(mismatch)
            except PayloadError as exc:
                self._reject(Rejected(topic, bytes(payload), exc.reason, now, msg.qos, msg.mid,
                                      self._generation))
                return
            except Exception:  # a handler bug must not kill the network loop
                self.stats.handler_errors += 1
                log.exception("%s: failed on a message on %s", self.component, topic)
                return
            try:
                handler(Received(topic, parts, message, bool(msg.retain), msg.qos, now,
                                 payload, msg.mid, self._generation))
            except Exception:  # a handler bug must not kill the network loop
                self.stats.handler_errors += 1
                log.exception("%s: handler failed on %s", self.component, topic)

        return dispatch

    def _reject(self, rejected: Rejected) -> None:
        if self._on_reject is not None:
            self._on_reject(rejected)
            return
        self.deadletter(rejected.topic, rejected.payload, rejected.reason)
        self.ack(rejected)

    def _ack_raw(self, msg: paho.MQTTMessage) -> None:
        if self.manual_ack and msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    # --- paho callbacks ------------------------------------------------------------
    def _on_connect(self, client: paho.Client, _userdata, _flags, reason_code, props) -> None:
        self._got_connack = True
        if reason_code.is_failure:
            self.stats.connect_failures += 1
            name = str(reason_code)
            if name in ("Not authorized", "Bad user name or password"):
                self.auth_failed = True
                who = f"user {self.broker.username!r}" if self.broker.username else \
                    "an anonymous login"
                self.last_connect_error = f"broker {self.broker.address} rejected {who} ({name})"
            else:
                self.last_connect_error = f"broker {self.broker.address} refused the " \
                                          f"connection ({name})"
            log.error("%s: %s; retrying in %.0f s", self.component, self.last_connect_error,
                      self.client.next_reconnect_delay_s())
            return
        self.stats.connects += 1
        receive_maximum = getattr(props, "ReceiveMaximum", None)
        self._max_inflight = min(MAX_INFLIGHT, receive_maximum or MAX_INFLIGHT)
        self.client.set_inflight_window(self._max_inflight)
        self.last_connect_error = None
        self.auth_failed = False
        self._generation += 1
        subs = [(s.pattern, SubscribeOptions(qos=s.qos, noLocal=s.no_local)) for s in self._subs]
        if self._exclusive and self.status_topic:
            subs.append((self.status_topic, SubscribeOptions(qos=1)))  # not No Local: the
            # other instance has the same client id
        if subs:
            client.subscribe(subs)
        if self.status_topic:
            client.publish(self.status_topic, "online", qos=1, retain=True,
                           properties=self._status_properties(None))
        for hook in self._hooks:
            try:
                hook()
            except Exception:  # a failing re-announce must not stop the others
                log.exception("%s: re-announce hook failed", self.component)
        self._connected.set()
        log.info("%s: connected to %s", self.component, self.broker.redacted())

    def _status_properties(self, reason: str | None,
                           packet: int = PacketTypes.PUBLISH) -> Properties | None:
        """A status's user properties: why it went offline, and (exclusive) who says it."""
        pairs = [] if reason is None else [(STATUS_REASON_PROPERTY, reason)]
        if self._exclusive:
            pairs += [(INSTANCE_PROPERTY, self._instance), (SINCE_PROPERTY, repr(self._claim_ts))]
        if not pairs:
            return None
        props = Properties(packet)
        props.UserProperty = pairs
        return props

    def _on_own_status(self, client: paho.Client, _userdata: object,
                       msg: paho.MQTTMessage) -> None:
        """A newer instance of this exclusive component spoke on its status topic (its
        ``online``, or its Last Will when this one's reconnect pushed it out): the newest
        wins, this one stops reconnecting."""
        if self.taken_over.is_set():
            return
        other = _user_property(msg, INSTANCE_PROPERTY)
        since = _user_property(msg, SINCE_PROPERTY)
        try:
            newer = other is not None and other != self._instance and since is not None \
                and float(since) > self._claim_ts
        except ValueError:
            return
        if newer:
            self.taken_over.set()
            self._stopping = True
            log.error("%s: another %s started as host %s (the same --host-name); it takes "
                      "over and this one stops", self.component, self.component, self.host)
            client.disconnect()

    def _on_disconnect(self, client, _userdata, _flags, reason_code, _props) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            return
        if str(reason_code) == "Session taken over":
            self.taken_over.set()
            self._stopping = True
            log.error("%s: another %s connected as host %s (the same --host-name): it took "
                      "over; this one stops", self.component, self.component, self.host)
            client.disconnect()  # no reconnect: two of them would take turns forever
            return
        if was_connected:
            log.warning("%s: disconnected from %s (%s); reconnecting", self.component,
                        self.broker.address, reason_code)
        elif not self._got_connack:
            hint = "" if self.broker.tls else " (a TLS port? then use mqtts://)"
            self.last_connect_error = (f"broker {self.broker.address} closed the connection "
                                       f"before answering{hint}")
            log.error("%s: %s; retrying in %.0f s", self.component, self.last_connect_error,
                      self.client.next_reconnect_delay_s())
        self._got_connack = False

    def _on_connect_fail(self, _client, _userdata) -> None:
        self.stats.connect_failures += 1
        self.last_connect_error = describe_connect_error(self.broker,
                                                         self.client.last_connect_exception)
        log.warning("%s: %s, retrying in %.0f s", self.component, self.last_connect_error,
                    self.client.next_reconnect_delay_s())

    def _on_publish(self, _client, _userdata, mid, reason_code, _props) -> None:
        if self._room_wanted:
            self._room.set()
        with self._refusal_lock:
            topic = self._pending_refusal.pop(mid, None)
        if topic is None or not reason_code.is_failure:
            return
        self.stats.refused_publications += 1
        if len(self.refused_topics) < 10_000:
            self.refused_topics.add(topic)
        now = time.monotonic()
        last = self._refusals.get(topic)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_S:
            return
        if len(self._refusals) > 1000:
            self._refusals.clear()
        self._refusals[topic] = now
        who = f"user {self.broker.username!r}" if self.broker.username else "this client"
        log.error("%s: the broker refused a message on %s: %s (does the ACL let %s write "
                  "there?)", self.component, topic, reason_code, who)


class _PahoNoise(logging.Filter):
    """Drops what paho 2.2 logs as an error on its normal reconnect path ("Client is not
    connected" after a refused connection): the Bus says what happened, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


def describe_connect_error(broker: BrokerURL, exc: OSError | None) -> str:
    """One line for a failed connection attempt: what failed and, when it helps, a hint."""
    where = f"cannot reach broker {broker.address}"
    if exc is None:
        return f"{where} (connection failed)"
    if isinstance(exc, ssl.SSLError):
        text = str(exc)
        if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
            return f"{where} (TLS handshake failed: the port answers without TLS; use mqtt://)"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"{where} (TLS certificate not trusted: {exc.verify_message}; give ?ca=PATH)"
        return f"{where} (TLS error: {exc.reason or text})"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where} (connection refused)"
    if isinstance(exc, TimeoutError):
        return f"{where} (timed out)"
    if exc.strerror:
        return f"{where} ({exc.strerror.lower()})"
    return f"{where} ({type(exc).__name__}: {exc})"


def _user_property(msg: paho.MQTTMessage, name: str) -> str | None:
    props = getattr(msg, "properties", None)
    pairs = getattr(props, "UserProperty", None) if props is not None else None
    for key, value in pairs or ():
        if key == name:
            return str(value)
    return None
