"""``clear_llm_cache`` through Ollama's HTTP API: unload every loaded model.

``GET {url}/api/ps`` lists the loaded models; ``POST {url}/api/generate`` with
``{"model": m, "keep_alive": 0}`` and no prompt unloads one. Plain ``urllib.request``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from healer.actuators import Result

MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class OllamaError(RuntimeError):
    """Ollama could not be asked; ``reason`` is short and machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class OllamaActuator:
    """Unloads every model Ollama has loaded."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        t0 = time.monotonic()
        if action != "clear_llm_cache":
            return Result(False, {"message": f"ollama cannot {action}"}, 0.0, "unsupported")
        unloaded: list[str] = []
        try:
            models = self.loaded_models()
            for model in models:
                self.unload(model)
                unloaded.append(model)
        except OllamaError as exc:
            return Result(False, {"message": str(exc), "url": self.base_url,
                                  "unloaded": unloaded}, time.monotonic() - t0, exc.reason)
        return Result(True, {"url": self.base_url, "unloaded": unloaded},
                      time.monotonic() - t0)

    def loaded_models(self) -> list[str]:
        """Names of the loaded models (``GET /api/ps``)."""
        data = self.call("GET", "/api/ps", None)
        models = data.get("models")
        if not isinstance(models, list):
            raise OllamaError("bad_response", "/api/ps answered without a 'models' list")
        names: list[str] = []
        for entry in models:
            name = (entry.get("model") or entry.get("name")) if isinstance(entry, dict) else None
            if isinstance(name, str) and name:
                names.append(name)
        return names

    def unload(self, model: str) -> None:
        """Ask Ollama to unload ``model`` now (``keep_alive: 0``)."""
        self.call("POST", "/api/generate", {"model": model, "keep_alive": 0})

    def call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One request; the answer's JSON object, or OllamaError with a short reason."""
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise OllamaError("http_error",
                              f"{method} {url} answered HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise OllamaError("timeout", f"{method} {url} timed out after "
                                             f"{self.timeout_s:g} s") from None
            raise OllamaError("unreachable", f"{method} {url} failed: {exc.reason}") from None
        except TimeoutError:
            raise OllamaError("timeout",
                              f"{method} {url} timed out after {self.timeout_s:g} s") from None
        except OSError as exc:
            raise OllamaError("unreachable", f"{method} {url} failed: {exc}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise OllamaError("bad_response", f"{method} {url}: response too large")
        return _json_object(raw, f"{method} {url}")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """The last JSON object of a response (``/api/generate`` may stream JSON lines)."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return {}
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(lines[-1]) if len(lines) > 1 else json.loads(text)
    except ValueError:
        raise OllamaError("bad_response", f"{what} did not answer JSON") from None
    if not isinstance(data, dict):
        raise OllamaError("bad_response", f"{what} did not answer a JSON object")
    if isinstance(data.get("error"), str):
        raise OllamaError("ollama_error", f"{what}: {data['error']}")
    return data
