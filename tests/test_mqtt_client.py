"""gpuheal's paho client (:mod:`gpuheal.mqtt_client`) against a real Mosquitto, plain TCP and
TLS: what it receives, acknowledges and reports is what stock paho would.

Its own Mosquitto (a TLS listener, an in-flight window of 20) for the module. Where a test must
show that nothing more arrives (no redelivery, no second acknowledgement, nothing past the
Receive Maximum), a sentinel published after it on the same connection is waited for: the
broker delivers in order, so whatever would come arrives before the sentinel.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gpuheal.broker import PrivateBroker, start_broker
from gpuheal.mqtt_client import FAST_PATH, FastClient, GpuhealClient, InMessage
from gpuheal.net import free_port, port_answers
from tests.support import wait_for

pytestmark = pytest.mark.skipif(not FAST_PATH, reason="the fast path is for paho-mqtt 2.2")

BIG = 256 * 1024
INFLIGHT = 20
"""The broker's ``max_inflight_messages`` (its Receive Maximum to clients)."""
SENTINEL = b"SENTINEL"


class TlsBroker:
    """A Mosquitto with a plain and a TLS listener (self-signed certificate)."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed: cannot make a test certificate")
        self.port, self.tls_port = free_port(), free_port()
        self.cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(self.cert)],
                       check=True, capture_output=True, timeout=60)
        conf = tmp / "mosquitto.conf"
        conf.write_text(
            "per_listener_settings false\nallow_anonymous true\n"
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            f"max_inflight_messages {INFLIGHT}\nmax_queued_messages 100000\n"
            "max_packet_size 1048576\nlog_dest stderr\nlog_type error\n"
            f"listener {self.port} 127.0.0.1\n"
            f"listener {self.tls_port} 127.0.0.1\ncertfile {self.cert}\nkeyfile {key}\n")
        self.proc: PrivateBroker = start_broker(conf, self.port, tmp / "mosquitto.log")
        wait_for(lambda: port_answers("127.0.0.1", self.tls_port, 0.2), 10, "the TLS listener")

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    b = TlsBroker(tmp_path_factory.mktemp("mosquitto-tls"))
    yield b
    b.stop()


@pytest.fixture
def topic(prefix: str) -> str:
    return f"{prefix}/t"


class Sub:
    """A subscriber (the fast client, or stock paho) that keeps what it gets."""

    def __init__(self, broker: TlsBroker, cls: type = FastClient, *, tls: bool = False,
                 client_id: str = "", clean_start: bool = True, expiry: int | None = None,
                 receive_maximum: int | None = None, manual_ack: bool = False,
                 protocol: int = paho.MQTTv5,
                 on_msg: Callable[[Any, paho.MQTTMessage], None] | None = None) -> None:
        self.client = cls(callback_api_version=CallbackAPIVersion.VERSION2,
                          client_id=client_id, protocol=protocol, manual_ack=manual_ack)
        self.msgs: list[paho.MQTTMessage] = []
        self.lock = threading.Lock()
        self.subs: list[tuple[str, int]] = []
        self.connects = 0
        self.on_msg = on_msg
        self.suback = threading.Event()
        self.sent = bytearray()
        """Every byte this client wrote to the socket (its acknowledgements among them)."""
        self.v5 = protocol == paho.MQTTv5
        if tls:
            self.client.tls_set(ca_certs=str(broker.cert))
        self.client.reconnect_delay_set(0, 1)
        real_send = self.client._sock_send

        def recording_send(buf: bytes) -> int:
            n = real_send(buf)
            with self.lock:
                self.sent.extend(bytes(buf[:n]))
            return n

        self.client._sock_send = recording_send  # type: ignore[method-assign]

        def on_message(c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            with self.lock:
                self.msgs.append(msg)
            if self.on_msg:
                self.on_msg(c, msg)

        def on_connect(c: Any, *_a: Any) -> None:
            self.connects += 1
            if self.subs:
                c.subscribe([(t, SubscribeOptions(qos=q)) if self.v5 else (t, q)
                             for t, q in self.subs])

        self.client.on_message = on_message
        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: self.suback.set()
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            if receive_maximum is not None:
                props.ReceiveMaximum = receive_maximum
        kw: dict[str, Any] = {"clean_start": clean_start, "properties": props} if self.v5 \
            else {}
        self.client.connect("127.0.0.1", broker.tls_port if tls else broker.port, 30, **kw)
        self.client.loop_start()
        wait_for(lambda: self.connects > 0, 10, "connect")

    def subscribe(self, t: str, qos: int) -> None:
        self.suback.clear()
        self.subs.append((t, qos))
        self.client.subscribe([(t, SubscribeOptions(qos=qos))] if self.v5 else [(t, qos)])
        assert self.suback.wait(10)

    def count(self) -> int:
        with self.lock:
            return len(self.msgs)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.msgs]

    def acks(self) -> dict[int, list[int]]:
        """The acknowledgements this client sent: packet type → message ids, in order."""
        with self.lock:
            sent = bytes(self.sent)
        out: dict[int, list[int]] = {0x40: [], 0x50: [], 0x70: []}
        i = 0
        while i < len(sent):
            head = sent[i]
            length, shift, j = 0, 0, i + 1
            while True:
                byte = sent[j]
                j += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            if head in out:
                out[head].append(int.from_bytes(sent[j:j + 2], "big"))
            i = j + length
        return out

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publisher(broker: TlsBroker, protocol: int = paho.MQTTv5) -> paho.Client:
    """Stock paho, windowed on the broker's Receive Maximum (paho itself ignores it)."""
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=protocol)
    c.max_inflight_messages_set(INFLIGHT)
    c.connect("127.0.0.1", broker.port, 30)
    c.loop_start()
    return c


def close(pub: paho.Client) -> None:
    pub.disconnect()
    pub.loop_stop()


def payload_of(i: int, size: int = 600) -> bytes:
    head = f"{i:08d}:".encode()
    body = head + hashlib.sha256(head).hexdigest().encode() * (size // 64 + 1)
    return body[:max(size, len(head))]


def check_payload(p: bytes) -> int:
    i = int(p[:8])
    assert p == payload_of(i, len(p)), f"corrupt payload {i}"
    return i


def numbered(sub: Sub) -> list[int]:
    """The numbers of the payloads received, the sentinel left out."""
    return [check_payload(p) for p in sub.payloads() if p != SENTINEL]


def send_sentinel(pub: paho.Client, topic: str, sub: Sub, qos: int = 1) -> None:
    """Publish the sentinel on ``pub`` and wait until ``sub`` has it."""
    pub.publish(topic, SENTINEL, qos=qos).wait_for_publish(10)
    wait_for(lambda: SENTINEL in sub.payloads(), 15, "the sentinel")


# --- receiving ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_receive_each_qos_in_order(tls_broker: TlsBroker, topic: str, qos: int,
                                   tls: bool) -> None:
    sub = Sub(tls_broker, tls=tls)
    sub.subscribe(topic + "/#", qos)
    pub = publisher(tls_broker)
    n = 1500
    infos = [pub.publish(f"{topic}/{i % 7}", payload_of(i), qos=qos) for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
    wait_for(lambda: sub.count() >= n, 30, f"{n} messages")
    assert numbered(sub) == list(range(n))
    assert all(m.qos == qos and not m.retain and not m.dup for m in sub.msgs)
    assert [m.topic for m in sub.msgs] == [f"{topic}/{i % 7}" for i in range(n)]
    assert all(isinstance(m, InMessage) and isinstance(m.payload, bytes) for m in sub.msgs)
    assert all(m.properties is not None and m.properties.isEmpty() for m in sub.msgs)
    if qos:  # each acknowledged once, in arrival order
        kind = 0x40 if qos == 1 else 0x70
        wait_for(lambda: len(sub.acks()[kind]) >= n, 10, "the acknowledgements")
        assert sub.acks()[kind] == [m.mid for m in sub.msgs]
    sub.stop()
    close(pub)


def test_each_message_is_acknowledged_exactly_once_beyond_the_window(
        tls_broker: TlsBroker, topic: str) -> None:
    """The broker lets 20 QoS 1/2 messages wait unacknowledged (and we allow only 5): 3,000
    only arrive if we acknowledge; each gets exactly one PUBACK, or one PUBREC and one
    PUBCOMP, in arrival order."""
    sub = Sub(tls_broker, receive_maximum=5)
    sub.subscribe(topic, 2)
    pub = publisher(tls_broker)
    n = 3000
    for i in range(n):
        pub.publish(topic, payload_of(i, 100), qos=1 + i % 2)
    wait_for(lambda: sub.count() >= n, 30, f"{n} acknowledged messages")
    send_sentinel(pub, topic, sub)
    # every acknowledgement of the stream left before the sentinel's own
    wait_for(lambda: sub.acks()[0x40][-1:] == [sub.msgs[-1].mid], 10, "the sentinel's PUBACK")
    got = numbered(sub)
    # each exactly once (Mosquitto 2.0.11 itself reorders a mixed QoS 1/2 stream under a
    # small Receive Maximum; stock paho sees the same)
    assert sorted(got) == list(range(n))
    wait_for(lambda: len(sub.acks()[0x70]) >= n // 2, 10, "the PUBCOMPs")
    acks = sub.acks()
    with sub.lock:
        qos1 = [m.mid for m in sub.msgs if m.qos == 1]
        qos2 = [m.mid for m in sub.msgs if m.qos == 2]
    assert acks[0x40] == qos1
    assert acks[0x50] == qos2
    assert sorted(acks[0x70]) == sorted(qos2) and len(acks[0x70]) == len(qos2)
    sub.stop()
    close(pub)


def test_persistent_session_acked_messages_are_not_redelivered(tls_broker: TlsBroker,
                                                                topic: str,
                                                                prefix: str) -> None:
    cid = f"{prefix}-persist"
    sub = Sub(tls_broker, client_id=cid, clean_start=False, expiry=300)
    sub.subscribe(topic, 1)
    pub = publisher(tls_broker)
    for i in range(200):
        pub.publish(topic, payload_of(i), qos=1)
    wait_for(lambda: sub.count() >= 200, 15, "200 messages")
    # the acknowledgements left before we drop the connection
    wait_for(lambda: len(sub.acks()[0x40]) >= 200, 10, "200 PUBACKs sent")
    sub.stop()
    for i in range(200, 250):  # queued by the broker while we are away
        pub.publish(topic, payload_of(i), qos=1).wait_for_publish(5)
    sub2 = Sub(tls_broker, client_id=cid, clean_start=False, expiry=300)
    send_sentinel(pub, topic, sub2)  # a redelivery would come before it
    assert numbered(sub2) == list(range(200, 250))
    sub2.stop()
    close(pub)


@pytest.mark.parametrize("ack_from", ["callback", "other_thread"])
def test_manual_ack(tls_broker: TlsBroker, topic: str, prefix: str, ack_from: str) -> None:
    """Unacknowledged messages hold the Receive Maximum window; acknowledgements (from the
    network thread or any other) let the rest through; unacknowledged ones are redelivered
    to a resumed session."""
    cid = f"{prefix}-manual"
    window = 10
    acked: list[int] = []
    pending: list[paho.MQTTMessage] = []

    def on_msg(c: Any, msg: paho.MQTTMessage) -> None:
        if msg.payload == SENTINEL:
            return
        i = check_payload(msg.payload)
        if i >= 40:
            return  # never acknowledged: must come back after the reconnect
        if ack_from == "callback":
            c.ack(msg.mid, msg.qos)
            acked.append(i)
        else:
            pending.append(msg)

    sub = Sub(tls_broker, client_id=cid, clean_start=True, expiry=300,
              receive_maximum=window, manual_ack=True, on_msg=on_msg)
    sub.subscribe(topic + "/#", 1)
    pub = publisher(tls_broker)
    for i in range(50):
        pub.publish(topic + "/m", payload_of(i), qos=1)
    if ack_from == "other_thread":
        wait_for(lambda: sub.count() >= window, 10, "a full window")
        # QoS 0 passes the window: had the broker sent an 11th, it would be here before this
        send_sentinel(pub, topic + "/s", sub, qos=0)
        assert len(numbered(sub)) == window, "more than Receive Maximum unacked messages"
        while len(acked) < 40:
            # (after each acknowledgement Mosquitto 2.0.11 sends up to a window more, to
            # stock paho alike: only the first window is checked)
            wait_for(lambda: len(pending) > 0, 10, "the next message")
            msg = pending.pop(0)
            sub.client.ack(msg.mid, msg.qos)
            acked.append(check_payload(msg.payload))
    wait_for(lambda: len(numbered(sub)) >= 50, 15, "50 messages")
    assert acked == list(range(40))
    sub.client.loop_stop()  # drop without the DISCONNECT handshake ... then resume
    sub.client.disconnect()
    assert numbered(sub) == list(range(50))
    got: list[int] = []
    sub2 = Sub(tls_broker, client_id=cid, clean_start=False, expiry=300, manual_ack=True,
               on_msg=lambda c, m: (got.append(check_payload(m.payload)), c.ack(m.mid, m.qos)))
    wait_for(lambda: len(got) >= 10, 15, "the redelivered messages")
    assert got == list(range(40, 50))
    assert all(m.dup for m in sub2.msgs)
    sub2.stop()
    close(pub)


def test_properties_and_retain_as_stock_paho_sees_them(tls_broker: TlsBroker,
                                                       topic: str) -> None:
    pub = publisher(tls_broker)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("gpuheal-reason", "lost")
    props.UserProperty = ("k2", "v2")
    props.ContentType = "application/json"
    props.MessageExpiryInterval = 3600
    props.CorrelationData = b"\x00\x01"
    pub.publish(topic + "/r", b"retained", qos=1, retain=True,
                properties=props).wait_for_publish(5)
    fast = Sub(tls_broker)
    stock = Sub(tls_broker, cls=paho.Client)
    for s in (fast, stock):
        s.subscribe(topic + "/#", 1)
    wait_for(lambda: fast.count() >= 1 and stock.count() >= 1, 10, "the retained message")
    pub.publish(topic + "/live", b"live", qos=0, properties=props).wait_for_publish(5)
    pub.publish(topic + "/plain", b"plain", qos=1).wait_for_publish(5)
    pub.publish(topic + "/r", b"", qos=1, retain=True).wait_for_publish(5)  # cleared
    wait_for(lambda: fast.count() >= 4 and stock.count() >= 4, 10, "four messages")

    def view(m: paho.MQTTMessage) -> tuple[Any, ...]:
        return (m.topic, m.payload, m.qos, m.retain, m.mid, m.properties.json())

    assert [view(m) for m in fast.msgs] == [view(m) for m in stock.msgs]
    r, live, plain, cleared = fast.msgs
    assert r.retain and not live.retain and not plain.retain
    assert r.properties.UserProperty == [("gpuheal-reason", "lost"), ("k2", "v2")]
    assert r.properties.ContentType == "application/json"
    assert live.properties.CorrelationData == b"\x00\x01"
    assert plain.properties.isEmpty() and plain.properties.packetType == PacketTypes.PUBLISH
    # the shared tables stay untouched when a user adds a property to one message
    plain.properties.UserProperty = ("x", "y")
    assert cleared.properties.isEmpty() and cleared.payload == b""
    assert str(plain.properties) == "[UserProperty : [('x', 'y')]]"
    assert plain.info.mid == plain.mid  # made on demand
    fast.stop()
    stock.stop()
    close(pub)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_large_payloads_split_over_reads(tls_broker: TlsBroker, topic: str, tls: bool) -> None:
    sub = Sub(tls_broker, tls=tls)
    sub.subscribe(topic, 1)
    pub = publisher(tls_broker)
    sizes = [BIG if i % 3 == 0 else (9 if i % 3 == 1 else 70_000) for i in range(60)]
    for i, size in enumerate(sizes):
        pub.publish(topic, payload_of(i, size), qos=i % 2)
    wait_for(lambda: sub.count() >= len(sizes), 30, "every payload")
    got = numbered(sub)
    assert sorted(got) == list(range(len(sizes)))
    for qos in (0, 1):  # in order per QoS (the broker may let a QoS 0 message overtake)
        assert [i for i in got if i % 2 == qos] == list(range(qos, len(sizes), 2))
    assert {check_payload(p): len(p) for p in sub.payloads()} == dict(enumerate(sizes))
    sub.stop()
    close(pub)


@pytest.mark.parametrize("cls", [FastClient, paho.Client], ids=["fast", "stock"])
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_connection_drop_mid_stream(tls_broker: TlsBroker, topic: str, prefix: str,
                                    tls: bool, cls: type) -> None:
    """Cut the TCP connection several times while QoS 1 messages (some 100 KB, so that a cut
    often leaves half a packet in the buffer) flow: the resumed session delivers every message
    and no packet is ever parsed from bytes of the old connection."""
    sub = Sub(tls_broker, cls=cls, tls=tls, client_id=f"{prefix}-drop", clean_start=False,
              expiry=300)
    sub.subscribe(topic, 1)
    pub = publisher(tls_broker)
    n = 2000
    done = threading.Event()

    def flood() -> None:
        for start in range(0, n, 100):  # paced by the broker's acknowledgements
            infos = [pub.publish(topic, payload_of(i, 100_000 if i % 20 == 0 else 600), qos=1)
                     for i in range(start, start + 100)]
            for info in infos:
                info.wait_for_publish(30)
        done.set()

    t = threading.Thread(target=flood)
    t.start()
    drops = 0
    while not done.is_set() or drops < 5:
        before = sub.count()
        wait_for(lambda b=before: sub.count() > b + 150 or (done.is_set() and
                                                             sub.count() >= n), 30,
                 "messages between cuts")
        sock = sub.client.socket()
        if sock is not None:
            # cut the TCP connection under paho, as a network failure would: not through the
            # SSLSocket, whose shutdown() drops its TLS state so that a concurrent recv() would
            # return raw TLS records as if they were MQTT bytes (stock paho too)
            try:
                with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                    raw.shutdown(socket.SHUT_RDWR)
                drops += 1
            except OSError:
                pass
        if done.is_set() and sub.count() >= n:
            break
    t.join()
    wait_for(lambda: len(set(numbered(sub))) >= n, 60, "every message after the cuts")
    assert sub.connects >= 2 and drops >= 1
    assert set(numbered(sub)) == set(range(n))
    sub.stop()
    close(pub)


def test_mqtt_311(tls_broker: TlsBroker, topic: str) -> None:
    sub = Sub(tls_broker, protocol=paho.MQTTv311)
    sub.subscribe(topic, 1)
    pub = publisher(tls_broker, paho.MQTTv311)
    for i in range(100):
        pub.publish(topic, payload_of(i), qos=i % 2)
    wait_for(lambda: sub.count() >= 100, 10, "100 messages")
    got = numbered(sub)
    assert [i for i in got if i % 2] == list(range(1, 100, 2))  # QoS 1 in order
    assert sorted(got) == list(range(100))
    assert all(m.properties is None for m in sub.msgs)
    sub.stop()
    close(pub)


def test_filtered_callbacks_follow_add_and_remove(tls_broker: TlsBroker, topic: str) -> None:
    sub = Sub(tls_broker)
    seen: list[str] = []
    sub.client.message_callback_add(topic + "/a/#", lambda c, u, m: seen.append("a:" + m.topic))
    sub.subscribe(topic + "/#", 0)
    pub = publisher(tls_broker)
    pub.publish(topic + "/a/1", b"1").wait_for_publish(5)
    pub.publish(topic + "/b", b"2").wait_for_publish(5)
    wait_for(lambda: len(seen) + sub.count() >= 2, 10, "two messages")
    sub.client.message_callback_remove(topic + "/a/#")
    sub.client.message_callback_add(topic + "/b", lambda c, u, m: seen.append("b:" + m.topic))
    pub.publish(topic + "/a/1", b"3").wait_for_publish(5)
    pub.publish(topic + "/b", b"4").wait_for_publish(5)
    wait_for(lambda: len(seen) + sub.count() >= 4, 10, "four messages")
    assert seen == [f"a:{topic}/a/1", f"b:{topic}/b"]
    assert sub.payloads() == [b"2", b"3"]  # on_message: the ones no filter matched
    sub.stop()
    close(pub)


def test_keepalive_pings_through_the_buffered_reader(tls_broker: TlsBroker) -> None:
    """A 1 s keepalive: three PINGRESPs come through the buffered reader; the link stays up
    (a PINGRESP it missed would have made paho drop the connection)."""
    c = FastClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    drops: list[Any] = []
    pings: list[str] = []
    c.on_disconnect = lambda *a: drops.append(a)
    c.on_log = lambda _c, _u, _level, text: pings.append(text) if "PINGRESP" in text else None
    c.connect("127.0.0.1", tls_broker.port, keepalive=1)
    c.loop_start()
    wait_for(lambda: len(pings) >= 3, 15, "three PINGRESPs")
    assert c.is_connected() and not drops
    c.disconnect()
    c.loop_stop()


def test_mixed_stream_equal_to_stock_paho(tls_broker: TlsBroker, topic: str) -> None:
    """Differential: the same mixed stream seen by stock paho and the fast client."""
    fast, stock = Sub(tls_broker), Sub(tls_broker, cls=paho.Client)
    for s in (fast, stock):
        s.subscribe(topic + "/#", 2)
    pub = publisher(tls_broker)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("a", "b")
    for i in range(500):
        pub.publish(f"{topic}/{i % 5}", json.dumps({"i": i}).encode() * (1 + i % 40),
                    qos=i % 3, retain=False, properties=props if i % 4 == 0 else None)
    wait_for(lambda: fast.count() >= 500 and stock.count() >= 500, 15, "500 messages each")

    def view(m: paho.MQTTMessage) -> tuple[Any, ...]:
        return (m.topic, m.payload, m.qos, m.retain, m.properties.json())

    # as multisets: Mosquitto 2.0.11 reorders across QoS levels for both clients alike
    assert sorted(map(repr, map(view, fast.msgs))) == sorted(map(repr, map(view, stock.msgs)))
    assert len(fast.msgs) == 500
    fast.stop()
    stock.stop()
    close(pub)


# --- our own publications ----------------------------------------------------------------------
def test_own_publications_acknowledged_and_counted(tls_broker: TlsBroker, topic: str) -> None:
    """on_publish gets a working ReasonCode (Success and, with nobody subscribed, No matching
    subscribers) for QoS 1 and 2, and Success for QoS 0 once sent; wait_for_publish returns;
    ``unacknowledged`` counts QoS 1/2 publications until their acknowledgement."""
    got: list[tuple[Any, ...]] = []
    c = GpuhealClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_publish = lambda _c, _u, mid, rc, props: got.append(
        (mid, rc.value, str(rc), rc.is_failure, props.isEmpty()))
    c.max_inflight_messages_set(5)
    sub = Sub(tls_broker)
    sub.subscribe(topic + "/sub", 2)
    c.connect("127.0.0.1", tls_broker.port, 30)
    assert c.unacknowledged() == 0
    infos = [c.publish(topic + "/sub", b"x", qos=1), c.publish(topic + "/sub", b"y", qos=2),
             c.publish(topic + "/nobody", b"z", qos=1), c.publish(topic + "/sub", b"q", qos=0)]
    # no acknowledgement read yet (the loop is not running)
    assert c.unacknowledged() == 3
    c.loop_start()
    for info in infos:
        info.wait_for_publish(5)
        assert info.is_published()
    wait_for(lambda: len(got) == 4, 10, "four on_publish calls")
    by_mid = {g[0]: g[1:] for g in got}
    assert by_mid[infos[0].mid] == (0, "Success", False, True)
    assert by_mid[infos[1].mid] == (0, "Success", False, True)
    assert by_mid[infos[2].mid] == (16, "No matching subscribers", False, True)
    assert by_mid[infos[3].mid] == (0, "Success", False, True)
    assert c.unacknowledged() == 0
    burst = [c.publish(topic + "/nobody", b"b", qos=1) for _ in range(50)]
    for info in burst:
        info.wait_for_publish(10)
    assert c.unacknowledged() == 0
    c.disconnect()
    c.loop_stop()
    sub.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_nagle_is_off(tls_broker: TlsBroker, tls: bool) -> None:
    """Small MQTT packets go out at once instead of waiting for the peer's delayed TCP
    acknowledgement (paho leaves Nagle's algorithm on)."""
    c = GpuhealClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if tls:
        c.tls_set(ca_certs=str(tls_broker.cert))
    c.connect("127.0.0.1", tls_broker.tls_port if tls else tls_broker.port, 30)
    sock = c.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    c.disconnect()


def test_gpuheal_client_says_why_a_connection_failed() -> None:
    c = GpuhealClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.reconnect_delay_set(1, 30)
    c.connect_async("127.0.0.1", free_port())
    with pytest.raises(ConnectionRefusedError):
        c.reconnect()
    assert isinstance(c.last_connect_exception, ConnectionRefusedError)
    assert c.next_reconnect_delay_s() == 1.0


# --- the reader against a broker that splits packets anywhere ------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish_packet(topic: bytes, payload: bytes, qos: int, mid: int,
                    props: bytes = b"\x00") -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    body += props + payload
    return bytes([0x30 | (qos << 1)]) + _varint(len(body)) + body


def test_packets_split_at_every_byte_boundary_are_reassembled() -> None:
    """A stand-in broker speaking MQTT v5 sends a stream in pieces of 1 to 13 bytes, so that
    every packet boundary and every length byte falls between two reads: the client receives
    every message as sent, properties included, and acknowledges each QoS 1 one once."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    user_prop = b"\x26" + (2).to_bytes(2, "big") + b"k1" + (2).to_bytes(2, "big") + b"v1"
    props = _varint(len(user_prop)) + user_prop
    sizes = [0, 1, 126, 127, 128, 16383, 16384, 70_000, 300]
    sent = [(f"s/{i}".encode(), payload_of(i, size) if size else b"", i % 2,
             props if i % 3 == 0 else b"\x00") for i, size in enumerate(sizes * 3)]
    stream = b"".join(_publish_packet(t, p, q, k + 1, pr) for k, (t, p, q, pr) in
                      enumerate(sent))
    received_acks = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)  # CONNECT
            conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK v5: success, no properties
            step, pos = 1, 0
            while pos < len(stream):
                conn.sendall(stream[pos:pos + step])
                pos += step
                step = step % 13 + 1
            expected = 4 * sum(1 for _t, _p, q, _pr in sent if q)
            conn.settimeout(10)
            while len(received_acks) < expected:
                data = conn.recv(4096)
                if not data:
                    break
                received_acks.extend(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    msgs: list[paho.MQTTMessage] = []
    c = FastClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = lambda _c, _u, m: msgs.append(m)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    try:
        wait_for(lambda: len(msgs) >= len(sent), 30, "every message")
        thread.join(15)
        assert [(m.topic.encode(), m.payload, m.qos) for m in msgs] == \
            [(t, p, q) for t, p, q, _ in sent]
        for m, (_t, _p, _q, pr) in zip(msgs, sent, strict=True):
            if pr == props:
                assert m.properties.UserProperty == [("k1", "v1")]
            else:
                assert m.properties.isEmpty()
        acked = [int.from_bytes(received_acks[i + 2:i + 4], "big")
                 for i in range(0, len(received_acks), 4)]
        assert all(received_acks[i] == 0x40 for i in range(0, len(received_acks), 4))
        assert acked == [k + 1 for k, (_t, _p, q, _pr) in enumerate(sent) if q]
    finally:
        c.disconnect()
        c.loop_stop()
        server.close()
