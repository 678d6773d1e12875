"""The LLM endpoint's status, as the healer's Ollama actuator sees it: ``GET {url}/api/ps``.

``online`` when it answers with a ``models`` list; ``error`` when something answers there but
not as Ollama does (an HTTP error, no JSON): the LLM service is unwell; ``unknown`` when
nothing answers (refused, timed out, no route: no LLM on that address, or it is down) or no
URL is given. ``error`` (the field) says why in one line. Answers are kept :data:`CACHE_S`
seconds, so a busy page never hammers the LLM; a probe takes at most :data:`TIMEOUT_S` seconds
and runs on a worker thread of the HTTP server, never on its event loop.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Literal

LlmState = Literal["online", "error", "unknown"]
TIMEOUT_S = 2.0
CACHE_S = 5.0
MAX_RESPONSE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LlmStatus:
    status: LlmState
    models: list[str] | None = field(default=None)
    """Names of the loaded models (``online`` only)."""
    error: str | None = None
    """Why it is not ``online``, in one line."""


class LlmProbe:
    """Asks Ollama's ``/api/ps`` (cached)."""

    def __init__(self, url: str | None, timeout_s: float = TIMEOUT_S,
                 cache_s: float = CACHE_S) -> None:
        self.url = (url or "").strip().rstrip("/")
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, LlmStatus] | None = None
        # no proxy: the LLM is a local service, like the healer's actuator reaches it
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def status(self) -> LlmStatus:
        if not self.url:
            return LlmStatus("unknown")
        with self._lock:
            cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self.cache_s:
                return cached[1]
            result = self._probe()
            self._cached = (time.monotonic(), result)
            return result

    def _probe(self) -> LlmStatus:
        url = f"{self.url}/api/ps"
        if not url.startswith(("http://", "https://")):
            return LlmStatus("unknown", error=f"not an http(s) URL: {self.url}")
        try:
            with self._opener.open(url, timeout=self.timeout_s) as resp:
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            return LlmStatus("error", error=f"GET {url} answered HTTP {exc.code}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return LlmStatus("unknown", error=f"GET {url}: no answer ({reason})")
        if len(raw) > MAX_RESPONSE_BYTES:
            return LlmStatus("error", error=f"GET {url}: answer too large")
        try:
            data = json.loads(raw)
        except ValueError:
            return LlmStatus("error", error=f"GET {url}: answer is not JSON")
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            return LlmStatus("error", error=f"GET {url}: answer has no 'models' list")
        names = [str(m.get("model") or m.get("name")) for m in models
                 if isinstance(m, dict) and (m.get("model") or m.get("name"))]
        return LlmStatus("online", models=names)
