"""TCP probes: is a port answering, and a free one for a private broker or a test."""

from __future__ import annotations

import socket


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts a TCP connection at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
