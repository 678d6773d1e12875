"""Runs actuator requests on worker threads, with a watchdog for ones that never answer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from healer.actuators import Actuator, Result
from healer.policy import ActuatorRequest

log = logging.getLogger(__name__)

ResultSink = Callable[[str, Result], None]
"""Receives ``(action_id, result)``; called from a worker thread."""


class ActionRunner:
    """Executes each request once on a pool thread and reports its Result to ``sink``."""

    def __init__(self, actuator: Actuator, sink: ResultSink, watchdog_s: float,
                 workers: int = 4) -> None:
        self.actuator = actuator
        self.sink = sink
        self.watchdog_s = watchdog_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="healer-act")
        self._lock = threading.Lock()
        self._outstanding: dict[str, float] = {}

    def submit(self, request: ActuatorRequest) -> None:
        with self._lock:
            if request.action_id in self._outstanding:
                log.warning("action %s is already running; not running it twice",
                            request.action_id)
                return
            self._outstanding[request.action_id] = time.monotonic()
        self._pool.submit(self._run, request)

    def _run(self, request: ActuatorRequest) -> None:
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

    def shutdown(self) -> None:
        """Stop taking work; running actuators finish on their own timeouts."""
        self._pool.shutdown(wait=False, cancel_futures=True)
