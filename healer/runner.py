"""Runs actuator requests on worker threads, with a watchdog for ones that never answer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from healer.actuators import Actuator, Result
from healer.policy import ActuatorRequest

log = logging.getLogger(__name__)

ResultSink = Callable[[str, Result], None]
"""Receives ``(action_id, result)``; called from a worker thread."""


class ActionRunner:
    """Executes each request once on a thread of its own and reports its Result to ``sink``.

    The threads are daemons: a stopping healer does not wait for an actuator still running
    (its command has its own timeout, and its outcome is unknown either way), so Ctrl-C and
    SIGTERM stop the healer at once. Actions are rare (one at a time per GPU), so a thread
    per action costs nothing worth pooling.
    """

    def __init__(self, actuator: Actuator, sink: ResultSink, watchdog_s: float) -> None:
        self.actuator = actuator
        self.sink = sink
        self.watchdog_s = watchdog_s
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._outstanding: dict[str, float] = {}

    def submit(self, request: ActuatorRequest) -> None:
        with self._lock:
            if request.action_id in self._outstanding:
                log.warning("action %s is already running; not running it twice",
                            request.action_id)
                return
            if self._closed:
                log.warning("healer stopping: action %s not started", request.action_id)
                return
            self._outstanding[request.action_id] = time.monotonic()
            thread = threading.Thread(target=self._run, args=(request,), daemon=True,
                                      name=f"healer-act-{request.action}-{request.index}")
            self._threads.add(thread)
        thread.start()

    def _run(self, request: ActuatorRequest) -> None:
        try:
            self._execute(request)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _execute(self, request: ActuatorRequest) -> None:
        result = self.actuator.run(request.action, request.index, dict(request.params))
        with self._lock:
            if self._outstanding.pop(request.action_id, None) is None:
                log.warning("action %s answered after its watchdog expired; ignored",
                            request.action_id)
                return
        self.sink(request.action_id, result)

    def check_overdue(self) -> None:
        """Report every request outstanding longer than the watchdog as timed out."""
        now = time.monotonic()
        with self._lock:
            overdue = [a for a, t in self._outstanding.items() if now - t > self.watchdog_s]
            for action_id in overdue:
                del self._outstanding[action_id]
        for action_id in overdue:
            self.sink(action_id, Result(False, {
                "message": f"the actuator did not answer within {self.watchdog_s:g} s"},
                self.watchdog_s, "timeout"))

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every running actuator; True when none is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            threads[0].join(remaining)

    def shutdown(self) -> None:
        """Stop taking work; running actuators finish on their own timeouts."""
        with self._lock:
            self._closed = True
