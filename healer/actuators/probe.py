"""The workload probe: before a GPU reset, does the LLM the GPU serves still answer?

A tiny request with a deadline to Ollama (``POST /api/generate``, one token, to a model it
has loaded). Its ``Result`` is always ``ok`` with a ``verdict`` in the detail:

* ``answers``: the workload answered within the deadline: the GPU works, a reset is vetoed;
* ``stuck``: it did not answer within the deadline (or failed while generating): corroborates
  the hang;
* ``inconclusive``: nothing to ask (no endpoint, Ollama not running, no model loaded): the
  probe says nothing either way, so the other evidence decides.
"""

from __future__ import annotations

import time
from typing import Any

from healer.actuators import Result
from healer.actuators.ollama import OllamaActuator, OllamaError

PROMPT = "Reply with one word: ok"


class WorkloadProbe:
    """Asks Ollama (at ``url``) for one token within ``deadline_s`` wall seconds."""

    def __init__(self, url: str, deadline_s: float = 30.0, model: str | None = None,
                 list_timeout_s: float = 5.0) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.model = model
        self._lister = OllamaActuator(url, list_timeout_s)
        self._asker = OllamaActuator(url, deadline_s)

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        t0 = time.monotonic()
        detail: dict[str, Any] = {"url": self.url, "deadline_s": self.deadline_s}
        try:
            models = self._lister.loaded_models()
        except OllamaError as exc:
            return Result(True, {**detail, "verdict": "inconclusive", "why": exc.reason,
                                 "message": f"no workload to ask: {exc}"},
                          time.monotonic() - t0)
        model = self.model or (models[0] if models else None)
        if model is None:
            return Result(True, {**detail, "verdict": "inconclusive", "why": "no_model_loaded",
                                 "message": "Ollama has no model loaded: nothing runs on the "
                                            "GPU to ask"}, time.monotonic() - t0)
        detail["model"] = model
        try:
            self._asker.call("POST", "/api/generate", {
                "model": model, "prompt": PROMPT, "stream": False,
                "options": {"num_predict": 1}})
        except OllamaError as exc:
            verdict = "stuck" if exc.reason in ("timeout", "ollama_error", "http_error") \
                else "inconclusive"
            return Result(True, {**detail, "verdict": verdict, "why": exc.reason,
                                 "message": str(exc)}, time.monotonic() - t0)
        took = time.monotonic() - t0
        return Result(True, {**detail, "verdict": "answers", "answer_s": round(took, 3),
                             "message": f"{model} answered in {took:.2f} s"}, took)


class NoProbe:
    """No workload to ask (the simulated GPU): always ``inconclusive``."""

    def run(self, action: str, index: int, params: dict[str, Any]) -> Result:
        return Result(True, {"verdict": "inconclusive", "why": "no_endpoint",
                             "message": "no workload endpoint for this GPU"})
