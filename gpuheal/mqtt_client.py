"""paho-mqtt's client, with what gpuheal needs to say why a connection fails.

:class:`GpuhealClient` is ``paho.mqtt.client.Client`` (paho-mqtt 2.x, pinned in
pyproject.toml) plus the exception of the last failed connection attempt, which paho itself
drops, so that :class:`gpuheal.mqtt.Bus` can tell an operator "connection refused" from "no
route to host" from a TLS mismatch. Nothing here changes the protocol.
"""

from __future__ import annotations

import paho.mqtt.client as paho


class GpuhealClient(paho.Client):
    """paho's client; remembers why the last connection attempt failed."""

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
