"""The dashboard: the original ``/api/gpu`` and ``/api/services/ai``, a live web page with
history charts, server-sent events and Prometheus ``/metrics``, fed by the pipeline over MQTT
like any other component (it imports only :mod:`gpuheal`).

Modules:

* ``live`` — the live model: retained States, component statuses, healer states, recent
  Events and Actions, counters, staleness (pure; the MQTT handlers feed it);
* ``stream`` — fan-out of live messages to server-sent-event clients (bounded queue per
  client; a slow client is dropped, the MQTT thread never waits);
* ``views`` — the JSON shapes of the original specification (``/api/gpu``,
  ``/api/services/ai``);
* ``history`` — read-only queries of the recorder's SQLite file (events, actions,
  downsampled per-GPU history);
* ``metrics`` — the Prometheus collector (per-GPU gauges, event/action counters);
* ``llm`` — the LLM endpoint's status (Ollama ``GET /api/ps``);
* ``api`` — the FastAPI application (routes, validation, write guard);
* ``service`` — the MQTT + HTTP adapter: subscriptions, uvicorn in a thread, ``run``;
* ``static/`` — the page (HTML, JS, CSS) and the vendored uPlot charting library.
"""
