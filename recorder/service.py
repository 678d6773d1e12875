"""The recorder's MQTT adapter: nothing lost, nothing doubled.

* A persistent session (fixed client id, clean start off, session expiry) with QoS 1
  subscriptions to samples, states, events, actions, component statuses, healer states and
  dead letters of every host (or ``--only-host``): while the recorder is down, the broker
  keeps what it misses.
* Manual acknowledgement: the network thread only appends each message (validated by the
  Bus) to a bounded buffer; the writer thread takes batches (lingering up to
  ``flush_interval_s`` for them to fill while messages keep coming: a pause of
  :data:`LINGER_GAP_S` ends it, since a broker may hold the rest back until these are
  acknowledged), stores each in one transaction, and only then queues their
  acknowledgements, which go out in arrival order from the network thread as the next
  message arrives (or from the writer once nothing is left to store). A message received
  but not committed when the process dies is not acknowledged, so the broker sends it again
  when the session resumes; the table keys turn the second copy into a no-op. The MQTT
  Receive Maximum (``min(buffer_max, 65535)``) caps how many unacknowledged messages the
  broker sends.
* Bad input (malformed, schema-invalid, inconsistent with its topic: the Bus's ``on_reject``)
  becomes a row of the ``deadletter`` table with the reason, and is then acknowledged. It is
  not republished.
* A locked or full disk: the batch is kept and retried with backoff (nothing is
  acknowledged meanwhile, so nothing is lost), new messages keep buffering, and a warning is
  published on ``P/deadletter/recorder`` (a DeadLetter whose ``topic`` is the recorder's
  status topic and whose ``reason`` starts with ``storage unavailable``) at most every
  ``warn_interval_s``; the retained status stays ``online``. The recorder records its own
  warnings too, once the disk takes writes again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

from pydantic import BaseModel

from gpuheal.models import DeadLetter, Sample
from gpuheal.mqtt import Bus, Received, Rejected
from gpuheal.options import RecorderOptions
from gpuheal.records import MODEL_OF_KIND
from gpuheal.runtime import BusOptions, RunFailure, run_service
from gpuheal.wire import PayloadError
from recorder.buffer import BoundedBuffer
from recorder.rows import RECORDER, Record, deadletter_record, record_of
from recorder.schema import SchemaError
from recorder.store import Store

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0
"""How often (seconds) an idle writer looks at the retention schedule."""
LINGER_GAP_S = 0.005
"""A batch that is filling is committed once no message came for this long (seconds): the
broker sends at most its in-flight window of unacknowledged messages (Mosquitto takes the
recorder's Receive Maximum, other brokers cap it lower, EMQX at 32 by default), so waiting for
more than that would only wait out ``flush_interval_s``."""
_STORE_ERRORS = (sqlite3.Error, OverflowError, ValueError, TypeError)
"""What a single row can fail with besides a locked/full disk (OperationalError)."""

Pending = Received[BaseModel] | Rejected
"""A received message waiting to be stored and acknowledged (a valid one, or a payload that
becomes a dead-letter row)."""


@dataclass
class RecorderStats:
    """Counters (messages unless said otherwise)."""

    received: int = 0
    committed: int = 0
    """Messages whose row is committed (duplicates included)."""
    rows_changed: int = 0
    """Rows inserted or updated (duplicates excluded)."""
    acked: int = 0
    deadlettered: int = 0
    dropped: int = 0
    """QoS 0 messages refused because the buffer was full."""
    write_failures: int = 0
    unstorable: int = 0
    """Messages that could not be stored even as a dead letter (logged, acknowledged)."""
    batch_errors: int = 0
    """Batches the writer failed on unexpectedly (logged, not acknowledged)."""
    degraded_since: float | None = None
    """UNIX seconds when storage started failing; None while it works."""
    downsampled: int = 0
    """Samples acknowledged but not stored (``--sample-every``)."""
    retention_passes: int = 0
    samples_folded: int = 0
    first_received_mono: float | None = None
    last_commit_mono: float | None = None


class Recorder:
    """Subscribes, buffers, stores, acknowledges."""

    component = RECORDER

    def __init__(self, opts: RecorderOptions, store: Store | None = None) -> None:
        self.opts = opts
        self.cfg = opts.common.config.recorder
        self.topics = opts.common.topics
        self.host = opts.common.host_name
        self.stats = RecorderStats()
        self.finished = threading.Event()
        self.buffer: BoundedBuffer[Pending] = BoundedBuffer(self.cfg.buffer_max)
        only = opts.common.only_host
        t = self.topics
        self._patterns = [(t.gpu_pattern(kind, only), kind)
                          for kind in ("sample", "state", "event", "action")]
        self._patterns += [(t.status_pattern(only), "status"),
                           (t.healer_state_pattern(only), "healer_state"),
                           (t.deadletter_pattern(), "deadletter")]
        try:
            self.store = store or Store(opts.db, busy_timeout_s=self.cfg.busy_timeout_s,
                                        synchronous=self.cfg.synchronous)
        except (SchemaError, sqlite3.Error, OSError, ValueError) as exc:
            raise RunFailure(f"cannot record to {opts.db}: {exc}") from None
        self.bus: Bus | None = None
        self._last_kept: dict[tuple[str, int], float] = {}
        """Event time of the last sample stored per GPU (``--sample-every``)."""
        self._acks: list[Pending] = []
        """Committed messages waiting for their acknowledgement (see ``_flush_acks``)."""
        self._acks_lock = threading.Lock()
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._last_warn_mono: float | None = None
        self._next_retention_mono = 0.0
        self._writer = threading.Thread(target=self._writer_loop, name="recorder-writer",
                                        daemon=True)
        log.info("recorder: recording to %s (schema migrations applied: %s)", opts.db,
                 self.store.migrated or "none")

    # --- lifecycle -----------------------------------------------------------------------
    def bus_options(self) -> BusOptions:
        return BusOptions(
            client_id=self.opts.client_id or f"gpuheal-recorder-{self.host}",
            clean_start=False, session_expiry_s=self.cfg.session_expiry_s, manual_ack=True,
            receive_maximum=min(self.cfg.buffer_max, 65_535), on_reject=self._on_message)

    def attach(self, bus: Bus) -> None:
        self.bus = bus
        for pattern, kind in self._patterns:
            bus.subscribe(pattern, MODEL_OF_KIND[kind], self._on_message)

    def start(self) -> None:
        """Start the writer (the bus connects in the background)."""
        self._writer.start()

    def stop(self) -> None:
        """Commit and acknowledge what is buffered (up to ``drain_timeout_s``)."""
        self._closing.set()
        self.buffer.wake()
        if self._writer.is_alive():
            self._writer.join(self.cfg.drain_timeout_s)
        if self._writer.is_alive():
            log.warning("recorder: %d messages not stored at exit; not acknowledged, so the "
                        "broker sends them again on the next start", len(self.buffer))
            self._abort.set()
            self.buffer.wake()
            self._writer.join()
        self._flush_acks()  # what was committed: acknowledged before going offline
        self.store.close()

    def summary(self) -> str:
        s = self.stats
        return (f"{s.received} messages received, {s.committed} stored, {s.deadlettered} "
                f"dead letters, {s.dropped} dropped")

    # --- network thread: never block -------------------------------------------------------
    def _on_message(self, item: Pending) -> None:
        if self._acks:
            self._flush_acks()
        self.stats.received += 1
        if self.stats.first_received_mono is None:
            self.stats.first_received_mono = time.monotonic()
        if not self.buffer.put(item, droppable=item.qos == 0):
            self.stats.dropped = self.buffer.dropped
            if self.buffer.dropped in (1, 10, 100) or self.buffer.dropped % 1000 == 0:
                log.warning("recorder: buffer full (%d); %d QoS 0 samples dropped so far",
                            self.buffer.max_items, self.buffer.dropped)

    def _downsampled(self, item: Pending) -> bool:
        """With ``--sample-every``: a sample of a GPU recorded less than that long ago (event
        time) is acknowledged but not stored; an unavailable one, or one with XIDs, always is."""
        every = self.opts.sample_every_s
        if every is None or isinstance(item, Rejected) or not isinstance(item.message, Sample):
            return False
        sample = item.message
        key = (sample.host, sample.index)
        last = self._last_kept.get(key)
        if (last is not None and 0 <= sample.ts - last < every and sample.available
                and not sample.xids):
            self.stats.downsampled += 1
            return True
        self._last_kept[key] = sample.ts
        return False

    # --- writer thread --------------------------------------------------------------------
    def _writer_loop(self) -> None:
        while not self._abort.is_set():
            self._maybe_retention()
            batch = self._take_batch()
            if not batch:
                if self._closing.is_set():
                    return
                continue
            try:
                pairs = [(p, None if self._downsampled(p) else _record(p)) for p in batch]
                if not self._commit(pairs):
                    return  # stopping while the disk refuses writes: leave them unacked
            except Exception:  # a bug must not kill the writer; unacked: resent on reconnect
                self.stats.batch_errors += 1
                log.exception("recorder: failed to store a batch of %d messages", len(batch))
                continue
            self.stats.last_commit_mono = time.monotonic()
            with self._acks_lock:
                self._acks.extend(p for p in batch if p.qos > 0)
            if not len(self.buffer):
                self._flush_acks()

    def _take_batch(self) -> list[Pending]:
        """Up to ``batch_size`` messages: the first one as soon as it comes (or none within
        IDLE_POLL_S), then more while they keep coming, for at most ``flush_interval_s``."""
        size = self.cfg.batch_size
        batch = self.buffer.take(size, IDLE_POLL_S)
        deadline = time.monotonic() + self.cfg.flush_interval_s
        while batch and len(batch) < size and not self._closing.is_set():
            step = min(LINGER_GAP_S, deadline - time.monotonic())
            if step <= 0:
                break
            more = self.buffer.take(size - len(batch), step, step)
            if not more:
                break  # a pause: the broker may wait for these acknowledgements
            batch.extend(more)
        return batch

    def _flush_acks(self) -> None:
        """Acknowledge every committed message still waiting (arrival order).

        Runs on paho's network thread when the next message arrives (acks then go out with
        that thread's own writes, instead of the writer waking it once per ack), and on the
        writer when it has nothing left to store (the stream paused or ended). Only messages
        of the current connection are acknowledged: the broker resends the others anyway."""
        bus = self.bus
        if bus is None:
            return
        with self._acks_lock:  # held while acking: two flushers never interleave
            acks, self._acks = self._acks, []
            for p in acks:
                bus.ack(p)  # only on the connection that delivered it
            self.stats.acked += len(acks)

    def _commit(self, pairs: list[tuple[Pending, Record | None]]) -> bool:
        """Store the batch, retrying while the disk refuses; False if told to give up."""
        delay_s = 0.05
        while True:
            try:
                self.stats.rows_changed += self._write(pairs)
            except sqlite3.OperationalError as exc:  # locked, busy, disk full, I/O error
                self._storage_failed(exc)
                if self._abort.wait(delay_s):
                    return False
                delay_s = min(delay_s * 2, self.cfg.retry_max_s)
                continue
            self.stats.committed += len(pairs)
            self.stats.deadlettered += sum(
                1 for _, r in pairs if r is not None and r.table == "deadletter"
                and r.row["component"] == RECORDER)
            if self.stats.degraded_since is not None:
                log.warning("recorder: storage works again after %.1f s",
                            time.time() - self.stats.degraded_since)
                self.stats.degraded_since = None
                self._last_warn_mono = None
            return True

    def _write(self, pairs: list[tuple[Pending, Record | None]]) -> int:
        records = [r for _, r in pairs if r is not None]
        try:
            return self.store.write(records)
        except sqlite3.OperationalError:
            raise
        except _STORE_ERRORS as exc:
            log.warning("recorder: batch refused (%s); storing its rows one by one", exc)
        changed = 0
        for p, rec in pairs:
            if rec is None:
                continue
            try:
                changed += self.store.write([rec])
            except sqlite3.OperationalError:
                raise
            except _STORE_ERRORS as exc:  # e.g. a lone surrogate SQLite cannot encode
                letter = deadletter_record(p.topic, p.payload, f"cannot store: {exc}",
                                           p.received_ts)
                try:
                    changed += self.store.write([letter])
                except sqlite3.OperationalError:
                    raise
                except _STORE_ERRORS:
                    self.stats.unstorable += 1
                    log.exception("recorder: cannot store message on %s, not even as a dead "
                                  "letter; dropping it", p.topic)
        return changed

    def _storage_failed(self, exc: sqlite3.OperationalError) -> None:
        self.stats.write_failures += 1
        now = time.monotonic()
        if self.stats.degraded_since is None:
            self.stats.degraded_since = time.time()
        if self._last_warn_mono is not None and now - self._last_warn_mono < \
                self.cfg.warn_interval_s:
            return
        self._last_warn_mono = now
        reason = (f"storage unavailable ({self.store.path}): {exc}; {len(self.buffer)} "
                  "messages buffered, none acknowledged until stored")
        log.warning("recorder: %s", reason)
        if self.bus is not None and self.bus.connected and self.bus.status_topic:
            letter = DeadLetter(component=RECORDER, topic=self.bus.status_topic,
                                reason=reason, payload="", ts=time.time())
            self.bus.publish(self.topics.deadletter(RECORDER), letter.to_json(), qos=0)

    def _maybe_retention(self) -> None:
        now = time.monotonic()
        if now < self._next_retention_mono:
            return
        self._next_retention_mono = now + self.cfg.retention_interval_s
        cutoff = time.time() - self.cfg.retention_days * 86_400
        try:
            result = self.store.fold_samples(cutoff)
        except sqlite3.OperationalError as exc:
            log.warning("recorder: retention pass failed (%s); retrying in a minute", exc)
            self._next_retention_mono = now + min(60.0, self.cfg.retention_interval_s)
            return
        self.stats.retention_passes += 1
        self.stats.samples_folded += result.samples_folded
        if result.samples_folded:
            log.info("recorder: folded %d samples older than %.1f days into %d aggregates",
                     result.samples_folded, self.cfg.retention_days, result.aggregate_rows)


def _record(item: Pending) -> Record | None:
    """The row of one buffered message: its table's, or a dead letter with the reason."""
    if isinstance(item, Rejected):
        return deadletter_record(item.topic, item.payload, item.reason, item.received_ts)
    try:
        return record_of(item.parts, item.message, item.received_ts)
    except PayloadError as exc:
        return deadletter_record(item.topic, item.payload, exc.reason, item.received_ts)
    except (ValueError, TypeError, RecursionError) as exc:  # valid, yet not storable
        return deadletter_record(item.topic, item.payload, f"cannot store: {exc}",
                                 item.received_ts)



def run(opts: RecorderOptions, stop: threading.Event | None = None) -> int:
    """Run the recorder until ``stop`` is set (or SIGINT/SIGTERM/SIGHUP when no ``stop`` is
    given); the exit code of :mod:`gpuheal.runtime`."""
    return run_service("recorder", lambda: Recorder(opts), opts.common, stop)
