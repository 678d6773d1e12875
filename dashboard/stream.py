"""Fan-out of live messages to server-sent-event clients.

The MQTT network thread calls :meth:`Broadcaster.publish`; it never waits: the message is
serialized once and handed to the event loop with ``call_soon_threadsafe``, where it goes into
each client's bounded queue. A client whose queue is full (it reads too slowly) is dropped: its
queue is emptied and closed, its response ends, and the browser's ``EventSource`` reconnects
and starts again from a fresh overview.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
"""Messages one client may lag behind before it is dropped."""
MAX_CLIENTS = 100
"""Concurrent stream clients; more are refused (HTTP 503)."""

_CLOSE = None
"""What a client's queue gets when it is to end (dropped, or the server stops)."""


def sse(kind: str, data: Any) -> str:
    """One server-sent event: ``event: kind`` and ``data:`` compact JSON (one line)."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Client:
    """One connected stream reader: its queue and whether it was dropped."""

    __slots__ = ("dropped", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.dropped = False


class Broadcaster:
    """The set of stream clients of one server, fed from any thread."""

    def __init__(self, max_clients: int = MAX_CLIENTS) -> None:
        self.max_clients = max_clients
        self._clients: set[Client] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.dropped = 0

    @property
    def clients(self) -> int:
        return len(self._clients)

    # --- the event loop's side ----------------------------------------------------------
    def add(self) -> Client | None:
        """A new client (on the event loop); None when there are too many."""
        if len(self._clients) >= self.max_clients:
            return None
        with self._lock:
            self._loop = asyncio.get_running_loop()
        client = Client()
        self._clients.add(client)
        return client

    def remove(self, client: Client) -> None:
        self._clients.discard(client)

    def _fanout(self, text: str | None) -> None:
        for client in list(self._clients):
            if text is _CLOSE:
                self._close(client)
                continue
            try:
                client.queue.put_nowait(text)
            except asyncio.QueueFull:
                self.dropped += 1
                client.dropped = True
                log.warning("dashboard: a stream client fell %d messages behind: dropped",
                            QUEUE_SIZE)
                self._close(client)

    def _close(self, client: Client) -> None:
        self._clients.discard(client)
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(_CLOSE)

    # --- any thread -----------------------------------------------------------------------
    def publish(self, kind: str, make: Callable[[], Any]) -> None:
        """Send ``make()`` as event ``kind`` to every client; ``make`` runs only when there
        is a client (the common case without a browser costs nothing)."""
        if not self._clients:
            return
        loop = self._loop
        if loop is None:
            return
        text = sse(kind, make())
        try:
            loop.call_soon_threadsafe(self._fanout, text)
            self.sent += 1
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    def close_all(self) -> None:
        """End every client's stream (the server is stopping)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            loop.call_soon_threadsafe(self._fanout, _CLOSE)
