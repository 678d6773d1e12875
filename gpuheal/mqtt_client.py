"""paho-mqtt's client with a cheap receive path, and what gpuheal needs to say why a
connection fails.

:class:`GpuhealClient` is ``paho.mqtt.client.Client`` (paho-mqtt 2.x, see pyproject.toml)
plus the exception of the last failed connection attempt, which paho itself drops, so that
:class:`gpuheal.mqtt.Bus` can tell an operator "connection refused" from "no route to host" from
a TLS mismatch. It builds on :class:`FastClient`, which changes how paho 2.2 spends CPU, never
the protocol (tests/test_mqtt_client.py checks it against stock paho through a real Mosquitto,
TCP and TLS):

* one ``recv()`` of up to 64 KiB per read event, then every complete packet in the buffer,
  instead of paho's three ``recv()`` calls per packet (command byte, length bytes, body);
* incoming PUBLISH parsed inline; a packet without MQTT v5 properties gets an empty
  ``Properties`` that shares paho's lookup tables instead of building them (~15 µs each);
* the PUBACK/PUBCOMP of our own publications decoded without rebuilding ``ReasonCode`` and
  ``Properties`` tables; the same for the ``on_publish`` of a QoS 0 publication (paho builds
  both for every message it sends when ``on_publish`` is set);
* an incoming message's ``info`` (a ``threading.Condition`` inside) is made only when read;
* the callbacks matching a topic are remembered (cleared when a filter is added or removed);
* the acknowledgements paho sends from its network thread (PUBACK, PUBREC, PUBCOMP) are
  batched into one ``send()`` after each read, in order, each exactly once. Mosquitto 2.0.11
  mishandles a message acknowledged twice: an ack is never repeated;
* ``TCP_NODELAY`` on the connection (paho leaves Nagle's algorithm on): MQTT writes small
  packets one after the other, and with Nagle a packet that follows an unacknowledged one
  waits for the peer's delayed TCP acknowledgement, up to 40 ms on Linux (an Event published
  right after a State, a healer's Action right after its HealerState); and, where Linux has
  it, ``TCP_QUICKACK`` again after every read, so that our acknowledgements are not delayed
  either: a broker that leaves Nagle on (Mosquitto does unless ``set_tcp_nodelay true``)
  would otherwise hold the next message to us until then.

Every override of the receive and write paths is for paho 2.2's internals; with another paho
version :data:`FAST_PATH` is False and those paths are stock paho's. The fixes are worth
offering upstream (paho.mqtt.python): buffered reads, no ``Properties()`` for packets without
properties, ReasonCode without copying its table.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as PAHO_VERSION
from paho.mqtt.enums import (
    CallbackAPIVersion,
    MQTTErrorCode,
    MQTTProtocolVersion,
    _ConnectionState,
)
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

FAST_PATH = PAHO_VERSION.startswith("2.2.")
"""The overrides below are written against paho-mqtt 2.2's internals."""
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
READ_CHUNK_BYTES = 65536
"""Bytes asked of the socket per read event."""
MATCH_CACHE_TOPICS = 16384
"""Distinct topics whose matching callbacks are remembered (then the cache starts over)."""

_ACK = struct.Struct("!BBH")
_OK = MQTTErrorCode.MQTT_ERR_SUCCESS
_AGAIN = MQTTErrorCode.MQTT_ERR_AGAIN
_PROTOCOL = MQTTErrorCode.MQTT_ERR_PROTOCOL
_LOST = MQTTErrorCode.MQTT_ERR_CONN_LOST
_V5 = MQTTProtocolVersion.MQTTv5
_PUBLISH = 0x30
_DISCONNECT = 0xE0
_TEMPLATE = Properties(PacketTypes.PUBLISH)
_SHARED_TABLES = {"types": _TEMPLATE.types, "names": _TEMPLATE.names,
                  "properties": _TEMPLATE.properties}
_VALID_REASONS: set[tuple[int, int]] = set()


def _empty_in_packet() -> dict[str, Any]:
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": 0, "packet": bytearray(), "to_process": 0, "pos": 0}


def new_properties(packet_type: int) -> Properties:
    """An empty ``Properties(packet_type)`` sharing the tables paho builds per object (its
    methods only read ``types``, ``names`` and ``properties``): ~1 µs instead of ~15 µs."""
    props = object.__new__(Properties)
    props.__dict__.update(_SHARED_TABLES, packetType=packet_type)
    return props


def new_reason_code(packet_type: int, value: int) -> ReasonCode:
    """``ReasonCode(packet_type, identifier=value)`` without copying the name table into the
    object (~1 µs instead of ~6 µs); MalformedPacket for a code the packet type does not have."""
    if (packet_type, value) not in _VALID_REASONS:
        try:
            ReasonCode(packet_type, identifier=value)
        except (KeyError, ValueError) as exc:
            raise MalformedPacket(f"bad reason code {value} for packet {packet_type}") from exc
        _VALID_REASONS.add((packet_type, value))
    rc = object.__new__(ReasonCode)
    rc.__dict__.update(names=ReasonCode.names, packetType=packet_type, value=value)
    return rc


class InMessage(paho.MQTTMessage):
    """An incoming message whose ``info`` (a threading.Condition inside) is made on first
    read; otherwise paho's MQTTMessage."""

    __slots__ = ("_lazy_info",)

    @property  # type: ignore[override]
    def info(self) -> paho.MQTTMessageInfo:
        if self._lazy_info is None:
            self._lazy_info = paho.MQTTMessageInfo(self.mid)
        return self._lazy_info

    @info.setter
    def info(self, value: paho.MQTTMessageInfo) -> None:
        self._lazy_info = value


class FastClient(paho.Client):
    """paho 2.2's Client with the cheap receive path of the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray()
        self._rbuf_sock: object = None
        """The socket the buffered bytes came from: a new connection drops them."""
        self._match_cache: dict[str, tuple[Any, ...]] = {}
        self._ack_entry: dict[str, Any] | None = None
        """The out-packet collecting this read's acknowledgements (None: start a new one)."""

    def _create_socket_connection(self) -> socket.socket:
        sock = super()._create_socket_connection()
        with contextlib.suppress(OSError):  # not TCP (a proxy's socket type): left as it is
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if _QUICKACK is not None:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return sock

    # --- one recv per read event, then every complete packet in the buffer ------------------
    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if not FAST_PATH or self._sock is None or self._transport == "websockets":
            return super().loop_read(max_packets)
        rc = self._packet_read()
        if rc == _AGAIN:
            rc = _OK
        if rc > 0:
            return self._loop_rc_handle(rc)
        if self._ack_entry is not None and self._sock is not None:
            return self.loop_write()  # this read's acknowledgements, in one send()
        return _OK

    def _packet_read(self) -> MQTTErrorCode:
        if not FAST_PATH or self._transport == "websockets":
            return super()._packet_read()
        sock = self._sock
        if sock is not self._rbuf_sock:  # a new connection: bytes of the old one are void
            self._rbuf.clear()
            self._rbuf_sock = sock
        try:
            data = self._sock_recv(READ_CHUNK_BYTES)  # TLS want-read/write: BlockingIOError
        except BlockingIOError:
            return _AGAIN
        except OSError as err:  # TimeoutError and ConnectionError (no socket) included
            self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return _LOST
        if not data:
            return _LOST
        if _QUICKACK is not None:  # Linux turns quick acks off again by itself: renew
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[union-attr]
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        self._rbuf += data
        return self._drain(sock)

    def _drain(self, sock: object) -> MQTTErrorCode:
        """Handle every complete packet in the buffer; keep an incomplete one's bytes."""
        buf = self._rbuf
        n, pos = len(buf), 0
        view = memoryview(buf)
        try:
            while n - pos >= 2:
                length, shift, i = 0, 0, pos + 1
                while True:
                    if i >= n:
                        return _OK  # remaining length incomplete: wait for more bytes
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift >= 28:
                        return _PROTOCOL  # more than 4 length bytes
                if i + length > n:
                    return _OK  # body incomplete
                in_packet = _empty_in_packet()
                in_packet.update(command=buf[pos], have_remaining=1, remaining_length=length,
                                 packet=bytes(view[i:i + length]))
                pos = i + length
                self._in_packet = in_packet  # type: ignore[assignment]
                try:
                    rc = self._packet_handle()
                except MalformedPacket as exc:
                    self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
                    rc = _PROTOCOL
                if rc:
                    return rc
                if self._sock is not sock:  # closed or replaced by a callback or DISCONNECT
                    return _OK
            return _OK
        finally:
            self._in_packet = _empty_in_packet()  # type: ignore[assignment]
            view.release()
            del buf[:pos]

    # --- PUBLISH in: parsed inline, cheap Properties, no Condition per message --------------
    def _handle_publish(self) -> MQTTErrorCode:
        if not FAST_PATH:
            return super()._handle_publish()
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        try:
            pos = 2 + ((packet[0] << 8) | packet[1])
            if pos > len(packet):
                raise MalformedPacket("topic longer than the packet")
            if self._protocol != _V5 and pos == 2:
                raise MalformedPacket("topic can't be empty in MQTTv3")
            topic = packet[2:pos]
            mid = 0
            if qos:
                mid = (packet[pos] << 8) | packet[pos + 1]
                pos += 2
            props = None
            if self._protocol == _V5:
                props = new_properties(PacketTypes.PUBLISH)
                if packet[pos] == 0:
                    pos += 1
                else:
                    pos += props.unpack(packet[pos:])[1]
        except IndexError as exc:
            raise MalformedPacket(f"truncated PUBLISH: {exc}") from exc
        except MQTTException as exc:  # MalformedPacket, or a property that is not allowed
            raise MalformedPacket(str(exc)) from exc
        m = object.__new__(InMessage)
        m._lazy_info, m.timestamp, m.state = None, paho.time_func(), paho.mqtt_ms_invalid
        m.dup, m.mid, m._topic, m.payload = bool(header & 0x08), mid, topic, packet[pos:]
        m.qos, m.retain, m.properties = qos, bool(header & 0x01), props
        if self._on_log is not None or (
                self._logger is not None and self._logger.isEnabledFor(logging.DEBUG)):
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), %r, "
                           "properties=%s, ...  (%d bytes)", m.dup, qos, m.retain, mid, topic,
                           props, len(m.payload))
        if qos == 0:
            self._handle_on_message(m)
            return _OK
        if qos == 1:
            self._handle_on_message(m)
            return _OK if self._manual_ack else self._send_puback(mid)
        if qos == 2:
            rc = self._send_pubrec(mid)
            m.state = paho.mqtt_ms_wait_for_pubrel
            with self._in_message_mutex:
                self._in_messages[mid] = m
            return rc
        return _PROTOCOL

    # --- dispatch: the callbacks of a topic remembered -------------------------------------
    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        if not FAST_PATH:
            super()._handle_on_message(message)
            return
        try:
            topic: str | None = message.topic
        except UnicodeDecodeError:
            topic = None
        with self._callback_mutex:
            callbacks: tuple[Any, ...] | None = ()
            if topic is not None:
                callbacks = self._match_cache.get(topic)
                if callbacks is None:
                    callbacks = tuple(self._on_message_filtered.iter_match(topic))
                    if len(self._match_cache) >= MATCH_CACHE_TOPICS:
                        self._match_cache.clear()
                    self._match_cache[topic] = callbacks
            if not callbacks and self._on_message is not None:
                callbacks = (self._on_message,)
        for callback in callbacks:
            with self._in_callback_mutex:
                try:
                    callback(self, self._userdata, message)
                except Exception as err:
                    self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in %s: %s",
                                   getattr(callback, "__name__", callback), err)
                    if not self.suppress_exceptions:
                        raise

    def message_callback_add(self, sub: str, callback: Any) -> None:
        with self._callback_mutex:
            super().message_callback_add(sub, callback)
            self._match_cache.clear()

    def message_callback_remove(self, sub: str) -> None:
        with self._callback_mutex:
            super().message_callback_remove(sub)
            self._match_cache.clear()

    # --- PUBACK/PUBCOMP in: cheap ReasonCode and Properties ------------------------------------
    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if not FAST_PATH or self._protocol != _V5 or len(packet) not in (2, 3):
            return super()._handle_pubackcomp(cmd)  # with properties (or v3): paho's path
        ptype = PacketTypes.PUBACK if cmd == "PUBACK" else PacketTypes.PUBCOMP
        mid = (packet[0] << 8) | packet[1]
        reason = new_reason_code(ptype, packet[2] if len(packet) == 3 else 0)
        self._easy_log(paho.MQTT_LOG_DEBUG, "Received %s (Mid: %d)", cmd, mid)
        with self._out_message_mutex:
            if mid in self._out_messages:  # only the first ack of a message counts
                return self._do_on_publish(mid, reason, new_properties(ptype))
        return _OK

    # --- acks out: batched on loop_start's thread, paho's path from any other thread --------
    def _send_puback(self, mid: int) -> MQTTErrorCode:
        rc = self._queue_ack(0x40, mid)
        return super()._send_puback(mid) if rc is None else rc

    def _send_pubrec(self, mid: int) -> MQTTErrorCode:
        rc = self._queue_ack(0x50, mid)
        return super()._send_pubrec(mid) if rc is None else rc

    def _send_pubcomp(self, mid: int) -> MQTTErrorCode:
        rc = self._queue_ack(0x70, mid)
        return super()._send_pubcomp(mid) if rc is None else rc

    def _queue_ack(self, command: int, mid: int) -> MQTTErrorCode | None:
        """Append the ack to this read's batch; None when not on the network thread of
        ``loop_start`` (the only thread that writes then), where paho's own path is taken."""
        thread = self._thread
        if not FAST_PATH or thread is None or threading.current_thread() is not thread:
            return None
        entry = self._ack_entry
        if entry is None or not self._out_packet or self._out_packet[-1] is not entry:
            entry = {"command": command, "mid": mid, "qos": 1, "pos": 0, "to_process": 0,
                     "packet": bytearray(), "info": None}
            self._out_packet.append(entry)  # type: ignore[arg-type]
            self._ack_entry = entry
        entry["packet"] += _ACK.pack(command, 2, mid)
        entry["to_process"] += 4
        return _OK  # MQTT_ERR_SUCCESS is 0, falsy: never `_queue_ack(...) or super()...`

    def loop_write(self) -> MQTTErrorCode:
        self._ack_entry = None  # what is queued is being written: the next ack starts a batch
        return super().loop_write()

    # --- writes: paho's _packet_write with a cheap on_publish for QoS 0 ------------------------
    def _packet_write(self) -> MQTTErrorCode:
        if not FAST_PATH:
            return super()._packet_write()
        while True:
            try:
                packet = self._out_packet.popleft()
            except IndexError:
                return _OK
            try:
                write_length = self._sock_send(packet["packet"][packet["pos"]:])
            except (AttributeError, ValueError):
                self._out_packet.appendleft(packet)
                return _OK
            except BlockingIOError:
                self._out_packet.appendleft(packet)
                return _AGAIN
            except OSError as err:
                self._out_packet.appendleft(packet)
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return _LOST
            if write_length <= 0:
                break
            packet["to_process"] -= write_length
            packet["pos"] += write_length
            if packet["to_process"] != 0:
                self._out_packet.appendleft(packet)  # not finished with this packet
                continue
            command = packet["command"] & 0xF0
            if command == _PUBLISH and packet["qos"] == 0:
                self._qos0_published(packet)
            elif command == _DISCONNECT:
                with self._msgtime_mutex:
                    self._last_msg_out = paho.time_func()
                self._do_on_disconnect(packet_from_broker=False, v1_rc=_OK)
                self._sock_close()
                # only a disconnection the client wanted makes it disconnected; after one the
                # broker decided, the client may reconnect
                if self._state == _ConnectionState.MQTT_CS_DISCONNECTING:
                    self._state = _ConnectionState.MQTT_CS_DISCONNECTED
                return _OK
        with self._msgtime_mutex:
            self._last_msg_out = paho.time_func()
        return _OK

    def _qos0_published(self, packet: dict[str, Any]) -> None:
        """A QoS 0 PUBLISH left: ``on_publish`` (as paho calls it) and its ``info``."""
        with self._callback_mutex:
            on_publish = self.on_publish
        if on_publish:
            with self._in_callback_mutex:
                try:
                    if self._callback_api_version == CallbackAPIVersion.VERSION1:
                        on_publish(self, self._userdata, packet["mid"])  # type: ignore[call-arg]
                    else:
                        on_publish(self, self._userdata, packet["mid"],
                                   new_reason_code(PacketTypes.PUBACK, 0),
                                   new_properties(PacketTypes.PUBACK))
                except Exception as err:
                    self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_publish: %s",
                                   err)
                    if not self.suppress_exceptions:
                        raise
        info = packet["info"]
        if info is not None:
            info._set_as_published()

    # --- what gpuheal asks of its client -------------------------------------------------------
    def set_inflight_window(self, window: int) -> None:
        """Set ``max_inflight_messages`` on an open connection (from ``on_connect``, to the
        broker's CONNACK Receive Maximum, which paho ignores). paho refuses the change while
        connected only because a switch between 0 (no limit) and a limit is untested; this
        takes a limit >= 1 only."""
        if window < 1:
            raise ValueError("the in-flight window needs at least 1")
        self._max_inflight_messages = window

    def unacknowledged(self) -> int:
        """Our QoS 1/2 publications not yet acknowledged by the broker: those in flight and
        those paho queues behind its in-flight window (``max_inflight_messages``)."""
        return len(self._out_messages)


class GpuhealClient(FastClient):
    """The fast client; remembers why the last connection attempt failed."""

    last_connect_exception: OSError | None = None

    def reconnect(self) -> paho.MQTTErrorCode:
        try:
            result = super().reconnect()
        except OSError as exc:
            self.last_connect_exception = exc
            raise
        self.last_connect_exception = None
        return result

    def next_reconnect_delay_s(self) -> float:
        """Seconds paho waits before its next attempt (its own doubling backoff)."""
        current = self._reconnect_delay
        if current is None:
            return float(self._reconnect_min_delay)
        return float(min(current * 2, self._reconnect_max_delay))
