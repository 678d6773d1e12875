"""The JSON shapes of the original specification (``../shared/origin``).

* ``GET /api/gpu`` (the metrics collector): ``{"available": true, "gpu": {...}}`` for this
  host's first GPU, or ``{"error": "GPU stats not available", "available": false}`` (HTTP
  200) when none is known. gpuheal adds ``gpus`` (every GPU) and ``broker_connected``; each
  GPU object carries ``stale``. Extra keys never break a client of the original.
* ``GET /api/services/ai`` (the dashboard backend): ``{"llm": {"status", "gpu_load",
  "gpu": {...}}, "gpu_available"}``. Missing readings stay ``null`` (the original's
  ``|| 0`` made them up); ``gpu_load`` is ``0.0`` without a GPU, as in the original.
"""

from __future__ import annotations

from typing import Any

NOT_AVAILABLE: dict[str, Any] = {"error": "GPU stats not available", "available": False}


def first_gpu(gpus: list[dict[str, Any]], host: str | None) -> dict[str, Any] | None:
    """``host``'s GPU with the lowest index; any host's first when ``host`` has none."""
    if not gpus:
        return None
    mine = [g for g in gpus if g["host"] == host]
    pool = mine or gpus
    return min(pool, key=lambda g: (g["host"], g["index"]))


def api_gpu(gpus: list[dict[str, Any]], host: str | None,
            broker_connected: bool) -> dict[str, Any]:
    """The body of ``GET /api/gpu``."""
    gpu = first_gpu(gpus, host)
    if gpu is None:
        return {**NOT_AVAILABLE, "gpus": [], "broker_connected": broker_connected}
    return {"available": True, "gpu": gpu, "gpus": gpus, "broker_connected": broker_connected}


def api_one_gpu(gpu: dict[str, Any] | None, broker_connected: bool) -> dict[str, Any]:
    """The body of ``GET /api/gpu/{host}/{index}``."""
    if gpu is None:
        return {**NOT_AVAILABLE, "broker_connected": broker_connected}
    return {"available": True, "gpu": gpu, "broker_connected": broker_connected}


def services_ai(gpu: dict[str, Any] | None, llm_status: str,
                models: list[str] | None = None,
                llm_error: str | None = None) -> dict[str, Any]:
    """The body of ``GET /api/services/ai`` (``models``: what the LLM has loaded, when it
    said)."""
    details: dict[str, Any] | None = None
    if gpu is not None:
        memory = gpu.get("memory") or {}
        power = gpu.get("power") or {}
        details = {
            "name": gpu.get("name"),
            "temperature": gpu.get("temperature"),
            "utilization": gpu.get("utilization"),
            "memory_used_mb": memory.get("used_mb"),
            "memory_total_mb": memory.get("total_mb"),
            "memory_percent": memory.get("percent"),
            "power_draw_w": power.get("draw_w"),
            "health": gpu.get("health") or "unknown",
            "error": gpu.get("error") or "none",
            "error_message": gpu.get("error_message"),
            "host": gpu.get("host"),
            "index": gpu.get("index"),
            "stale": gpu.get("stale", False),
        }
    llm: dict[str, Any] = {
        "status": llm_status,
        "gpu_load": gpu.get("utilization") if gpu is not None else 0.0,
        "gpu": details,
    }
    if models is not None:
        llm["models"] = models
    if llm_error is not None:
        llm["error"] = llm_error
    return {"llm": llm, "gpu_available": gpu is not None}
