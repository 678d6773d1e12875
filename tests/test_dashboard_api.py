"""The dashboard's HTTP API against a running pipeline.

A real Mosquitto, the real recorder writing a real SQLite file, the analyzer and the healer
(``--source sim``) as real processes, and the simulated publisher running the ``hang``
scenario on two GPUs at 50x: by the time the tests ask, GPU 0 hung, was reset and verified
healthy, and everything was recorded. The dashboard runs in this process on a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuheal.broker import PrivateBroker, start_broker
from gpuheal.broker_init import init_broker
from gpuheal.models import Action, Event, HealerState, State
from gpuheal.net import free_port
from gpuheal.wire import decode
from tests.support import Collector, FakeOllama, publish, wait_for
from tests.support_dashboard import (
    HOST,
    REPO,
    Dashboard,
    Pipeline,
    gpuheal_env,
    http,
    start_dashboard,
)

ORIGINAL_GPU_KEYS = {"index", "name", "temperature", "utilization", "memory", "power", "clocks",
                     "fan_speed", "health", "error", "error_message", "timestamp"}
"""The ``gpu`` object of the original ``GET /api/gpu`` (origin/)."""
ORIGINAL_AI_GPU_KEYS = {"name", "temperature", "utilization", "memory_used_mb",
                        "memory_total_mb", "memory_percent", "power_draw_w", "health", "error",
                        "error_message"}


@pytest.fixture(scope="module")
def pipe(broker: PrivateBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    p = Pipeline(broker.url, f"t{os.getpid()}_dashapi", tmp_path_factory.mktemp("dashapi"))
    p.start()
    try:
        p.start_publisher()
        dash = p.dashboard
        assert dash is not None

        def verified_and_recorded() -> bool:
            r = dash.get("/api/actions?action=reset_gpu&status=verified")
            return r.status == 200 and r.body["total"] >= 1

        try:
            wait_for(verified_and_recorded, 90, "reset_gpu verified and recorded")
        except AssertionError:
            raise AssertionError(p.logs()) from None
        yield p
    finally:
        p.stop()


@pytest.fixture
def dash(pipe: Pipeline) -> Dashboard:
    assert pipe.dashboard is not None
    return pipe.dashboard


def live(prefix: str, broker: PrivateBroker, **kw: Any) -> Dashboard:
    return start_dashboard(broker.url, prefix, **kw)


# --- the original shapes ----------------------------------------------------------------------
def test_api_gpu_answers_in_the_original_shape_with_every_gpu(dash: Dashboard) -> None:
    r = dash.get("/api/gpu")
    assert r.status == 200
    body = r.body
    assert body["available"] is True and body["broker_connected"] is True
    assert set(body["gpu"]) >= ORIGINAL_GPU_KEYS
    assert set(body["gpu"]["memory"]) == {"used_mb", "total_mb", "percent"}
    assert set(body["gpu"]["power"]) == {"draw_w", "limit_w"}
    assert set(body["gpu"]["clocks"]) == {"graphics_mhz", "memory_mhz"}
    assert body["gpu"]["timestamp"].endswith("Z")
    assert (body["gpu"]["host"], body["gpu"]["index"]) == (HOST, 0), "this host's first GPU"
    assert [(g["host"], g["index"]) for g in body["gpus"]] == [(HOST, 0), (HOST, 1)]
    for g in body["gpus"]:
        assert g["stale"] is False
        decode(State, json.dumps(g).encode())  # each is a valid State (+ stale)

    one = dash.get(f"/api/gpu/{HOST}/1")
    assert one.status == 200 and one.body["available"] is True
    assert (one.body["gpu"]["index"], one.body["gpu"]["name"]) == (1, body["gpus"][1]["name"])
    unknown = dash.get(f"/api/gpu/{HOST}/7")
    assert unknown.status == 200
    assert unknown.body["available"] is False
    assert unknown.body["error"] == "GPU stats not available"


def test_api_gpu_without_any_gpu_says_not_available(broker: PrivateBroker, prefix: str) -> None:
    d = live(prefix, broker)
    try:
        r = d.get("/api/gpu")
    finally:
        d.stop()
    assert r.status == 200
    assert r.body["error"] == "GPU stats not available" and r.body["available"] is False
    assert r.body["gpus"] == []


def test_services_ai_reports_the_llm_from_ollamas_api_ps(pipe: Pipeline,
                                                         broker: PrivateBroker) -> None:
    with FakeOllama(["llama3.1:8b"]) as ollama:
        d = live(pipe.prefix, broker, ollama_url=ollama.url)
        try:
            body = wait_for(lambda: (r := d.get("/api/services/ai").body)["gpu_available"]
                            and r, 10, "the dashboard to know the GPUs")
        finally:
            d.stop()
    assert ("GET", "/api/ps", None) in ollama.requests
    llm = body["llm"]
    assert llm["status"] == "online" and llm["models"] == ["llama3.1:8b"]
    assert set(llm["gpu"]) >= ORIGINAL_AI_GPU_KEYS
    assert llm["gpu_load"] == llm["gpu"]["utilization"]
    assert llm["gpu"]["health"] in ("healthy", "warning", "critical", "unavailable")


def test_services_ai_without_an_llm(broker: PrivateBroker, prefix: str) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    with FakeOllama([]) as wrong_place:
        for url, status in ((nobody, "unknown"), (wrong_place.url + "/nothing", "error")):
            d = live(prefix, broker, ollama_url=url)
            try:
                body = d.get("/api/services/ai").body
            finally:
                d.stop()
            assert body["gpu_available"] is False
            llm = body["llm"]
            assert (llm["status"], llm["gpu_load"], llm["gpu"]) == (status, 0.0, None)
            assert "/api/ps" in llm["error"]


# --- recorded -------------------------------------------------------------------------------
def test_events_from_the_recording_filtered_and_paginated(dash: Dashboard) -> None:
    r = dash.get(f"/api/events?host={HOST}&gpu=0&kind=gpu_hang&since=1d")
    assert r.status == 200
    items = r.body["items"]
    phases = [(e["phase"], e["severity"]) for e in items]
    assert ("raised", "critical") in phases or ("escalated", "critical") in phases, phases
    assert ("cleared", "critical") in phases, phases
    assert all(e["kind"] == "gpu_hang" and e["index"] == 0 for e in items)
    assert [e["ts"] for e in items] == sorted((e["ts"] for e in items), reverse=True)
    for e in items:
        decode(Event, json.dumps(e).encode())

    cleared = dash.get("/api/events?phase=cleared&kind=gpu_hang").body
    assert cleared["total"] >= 1 and {e["phase"] for e in cleared["items"]} == {"cleared"}

    everything = dash.get("/api/events?limit=1000").body
    total = everything["total"]
    assert total == len(everything["items"]) >= 2
    pages = [dash.get(f"/api/events?limit=1&offset={i}").body for i in range(total)]
    assert all(p["total"] == total and len(p["items"]) == 1 for p in pages)
    assert [p["items"][0] for p in pages] == everything["items"]
    assert dash.get(f"/api/events?limit=5&offset={total}").body["items"] == []


def test_actions_from_the_recording(dash: Dashboard) -> None:
    body = dash.get(f"/api/actions?host={HOST}&gpu=0&action=reset_gpu").body
    statuses = [a["status"] for a in reversed(body["items"])]  # oldest first
    assert statuses[:3] == ["started", "succeeded", "verified"], statuses
    assert len({a["action_id"] for a in body["items"]}) == 1
    for a in body["items"]:
        decode(Action, json.dumps(a).encode())
    verified = dash.get("/api/actions?status=verified&action=reset_gpu").body["items"]
    event_id = verified[0]["event_id"]
    by_event = dash.get(f"/api/events?event_id={event_id}").body["items"]
    assert by_event and {e["kind"] for e in by_event} == {"gpu_hang"}
    assert dash.get("/api/actions?gpu=1").body["total"] == 0, "GPU 1 stayed healthy"


def test_history_is_downsampled_and_shows_the_hang(dash: Dashboard) -> None:
    r = dash.get(f"/api/history/{HOST}/0?since=1h")
    assert r.status == 200
    h = r.body
    series = h["series"]
    assert set(series) == {"ts", "temperature_c", "utilization_pct", "memory_used_mb",
                           "power_draw_w"}
    n = len(series["ts"])
    assert 10 < n <= 1000 and h["points"] == n
    assert all(len(v) == n for v in series.values())
    assert series["ts"] == sorted(series["ts"])
    assert h["start_ts"] <= series["ts"][0] and series["ts"][-1] <= h["end_ts"]
    assert max(u for u in series["utilization_pct"] if u is not None) >= 99.0, "the hang"
    assert min(u for u in series["utilization_pct"] if u is not None) < 60.0, "healthy too"

    small = dash.get(f"/api/history/{HOST}/1?since=1h&points=20&metrics=temperature_c").body
    assert set(small["series"]) == {"ts", "temperature_c"}
    assert 1 <= small["points"] <= 20
    assert all(20.0 < t < 90.0 for t in small["series"]["temperature_c"] if t is not None)
    none = dash.get(f"/api/history/{HOST}/5?since=1h").body
    assert none["points"] == 0 and none["series"]["ts"] == []


@pytest.mark.parametrize(("path", "reason"), [
    ("/api/gpu/bad.host/0", "host must match"),
    (f"/api/gpu/{HOST}/-1", "index"),
    (f"/api/gpu/{HOST}/x", "index"),
    (f"/api/gpu/{HOST}/70000", "index"),
    ("/api/gpu?host=a%20b", "host must match"),
    ("/api/events?since=1x", "since must be a duration"),
    ("/api/events?since=0m", "since must be more than 0"),
    ("/api/events?since=", "since must be a duration"),
    ("/api/events?limit=0", "limit"),
    ("/api/events?limit=5000", "limit"),
    ("/api/events?limit=ten", "limit"),
    ("/api/events?offset=-1", "offset"),
    ("/api/events?kind=meltdown", "kind"),
    ("/api/events?gpu=-2", "gpu"),
    ("/api/actions?status=happy", "status"),
    (f"/api/history/{HOST}/0?since=yesterday", "since must be a duration"),
    (f"/api/history/{HOST}/0?metrics=bogus", "metrics"),
    (f"/api/history/{HOST}/0?points=1001", "points"),
    ("/api/history/x%20y/0", "host must match"),
])
def test_bad_input_is_400_with_a_reason(dash: Dashboard, path: str, reason: str) -> None:
    r = dash.get(path)
    assert r.status == 400, (path, r.status, r.body)
    assert reason in r.error, (path, r.error)


def test_bad_write_bodies_are_400(dash: Dashboard) -> None:
    for path, body in ((f"/api/healer/{HOST}/enabled", {"enabled": "no"}),
                       (f"/api/healer/{HOST}/enabled", {}),
                       (f"/api/healer/{HOST}/enabled", {"enabled": True, "x": 1}),
                       (f"/api/healer/{HOST}/ack", {"event_id": ""}),
                       (f"/api/healer/{HOST}/ack", {"event_id": "e" * 65}),
                       ("/api/healer/no%20such/enabled", {"enabled": False})):
        r = dash.post(path, body)
        assert r.status == 400, (path, body, r.body)
        assert r.error


def test_history_endpoints_say_503_without_a_database(broker: PrivateBroker, prefix: str,
                                                      tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    publish(broker.url, f"{prefix}/{HOST}/gpu/0/state", state_payload(HOST, 0), retain=True)
    for db, says in ((missing, str(missing)), (None, "--db")):
        d = live(prefix, broker, db=db)
        try:
            for path in ("/api/events", "/api/actions", f"/api/history/{HOST}/0"):
                r = d.get(path)
                assert r.status == 503 and says in r.error, (path, r.body)
            gpu = wait_for(lambda d=d: (r := d.get("/api/gpu").body)["available"] and r, 10,
                           "the live State")  # the live side does not care
            assert gpu["gpu"]["index"] == 0
        finally:
            d.stop()
    missing.write_bytes(b"this is not sqlite" * 100)
    d = live(prefix, broker, db=missing)
    try:
        r = d.get("/api/events")
        assert r.status == 503 and "cannot read" in r.error, r.body
    finally:
        d.stop()


# --- writes ---------------------------------------------------------------------------------
def test_the_switch_turns_healing_off_and_on_through_the_broker(pipe: Pipeline,
                                                                dash: Dashboard) -> None:
    topics = dash.service.topics
    with Collector(pipe.url, [topics.healer_set(HOST), topics.healer_state(HOST)]) as seen:
        r = dash.post(f"/api/healer/{HOST}/enabled", {"enabled": False})
        assert r.status == 202, r.body
        assert r.body["topic"] == topics.healer_set(HOST)
        seen.wait(lambda ms: any(m.topic.endswith("/set") and m.json() == {
            "v": 1, "enabled": False} for m in ms), 10, "the command on healer/set")
        seen.wait(lambda ms: latest_enabled(ms) is False, 15,
                  "the healer's state saying enabled false")
        wait_for(lambda: not healer_of(dash)["enabled"], 10, "the dashboard to see it")

        assert dash.post(f"/api/healer/{HOST}/enabled", {"enabled": True}).status == 202
        seen.wait(lambda ms: latest_enabled(ms) is True, 15, "enabled true again")
    with Collector(pipe.url, topics.healer_state(HOST)) as retained:
        state = retained.wait(lambda ms: [m for m in ms if m.retain], 10, "retained")[0]
        assert decode(HealerState, state.payload).enabled is True


def test_breaker_reset_and_ack_are_published(pipe: Pipeline, dash: Dashboard) -> None:
    topic = dash.service.topics.healer_set(HOST)
    with Collector(pipe.url, topic) as seen:
        assert dash.post(f"/api/healer/{HOST}/reset-breaker").status == 202
        assert dash.post(f"/api/healer/{HOST}/ack", {"event_id": "abc123"}).status == 202
        seen.wait(lambda ms: [m.json() for m in ms] == [
            {"v": 1, "reset_breaker": True}, {"v": 1, "ack": "abc123"}], 10, "both commands")


def test_a_write_the_brokers_acl_refuses_is_503(tmp_path: Path) -> None:
    port = free_port()
    init = init_broker(tmp_path / "broker", port, prefix="acl")
    secure = start_broker(init.conf_path, port, init.log_path)
    try:
        for identity, status in (("viewer", 503), ("dashboard", 202)):
            d = start_dashboard(init.urls[identity], "acl")
            try:
                r = d.post(f"/api/healer/{HOST}/enabled", {"enabled": False})
            finally:
                d.stop()
            assert r.status == status, (identity, r.body)
            if status == 503:
                assert "refused" in r.error and "healer/set" in r.error
    finally:
        secure.stop()


def test_cross_site_writes_and_foreign_host_names_are_refused(dash: Dashboard) -> None:
    path = f"/api/healer/{HOST}/reset-breaker"
    evil = dash.post(path, headers={"Origin": "http://evil.example"})
    assert evil.status == 403 and "origin" in evil.error
    assert dash.post(path, headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    rebound = dash.get("/api/gpu", headers={"Host": "evil.example:9100"})
    assert rebound.status == 403 and "loopback" in rebound.error
    same = dash.post(path, headers={"Origin": dash.url, "Sec-Fetch-Site": "same-origin"})
    assert same.status == 202


def test_public_bind_needs_a_token_for_every_write(broker: PrivateBroker, prefix: str) -> None:
    port = free_port("0.0.0.0")
    argv = [sys.executable, "-m", "gpuheal", "dashboard", "--broker", broker.url, "--prefix",
            prefix, "--host-name", HOST, "--bind", "0.0.0.0", "--port", str(port)]
    refused = subprocess.run(argv, env=gpuheal_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert "GPUHEAL_DASHBOARD_TOKEN" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    env = {**gpuheal_env(), "GPUHEAL_DASHBOARD_TOKEN": "s3cret-token"}
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(base + "/api/gpu"), 20, "the public dashboard")
        path = f"{base}/api/healer/{HOST}/enabled"
        assert http(base + "/api/gpu").status == 200, "reads need no token"
        missing = http(path, "POST", {"enabled": False})
        assert missing.status == 401 and "Bearer" in missing.error
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = http(path, "POST", {"enabled": False},
                     headers={"Authorization": "Bearer guess"})
        assert wrong.status == 401
        with Collector(broker.url, f"{prefix}/{HOST}/healer/set") as seen:
            ok = http(path, "POST", {"enabled": False},
                      headers={"Authorization": "Bearer s3cret-token"})
            assert ok.status == 202, ok.body
            seen.wait(lambda ms: len(ms) == 1, 10, "the authorized command")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Authorization: Bearer" in out, "it says at start that writes need the token"


def test_a_port_in_use_is_one_line_and_exit_1(broker: PrivateBroker, prefix: str,
                                              dash: Dashboard) -> None:
    taken = dash.service.port
    r = subprocess.run([sys.executable, "-m", "gpuheal", "dashboard", "--broker", broker.url,
                        "--prefix", prefix, "--port", str(taken)], env=gpuheal_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"gpuheal dashboard: port {taken} on 127.0.0.1 is in use: "
                                "choose another with --port")


# --- live: stale data, the stream -------------------------------------------------------------
def test_a_state_whose_analyzer_is_offline_is_stale(broker: PrivateBroker, prefix: str) -> None:
    publish(broker.url, f"{prefix}/{HOST}/gpu/0/state",
            state_payload(HOST, 0, analyzer="site-a"), retain=True)
    publish(broker.url, f"{prefix}/site-a/analyzer/status", "online", retain=True)
    d = live(prefix, broker)
    try:
        first = wait_for(lambda: (r := d.get("/api/gpu").body)["available"] and r, 10, "State")
        assert first["gpu"]["stale"] is False
        publish(broker.url, f"{prefix}/site-a/analyzer/status", "offline", retain=True)
        wait_for(lambda: d.get("/api/gpu").body["gpu"]["stale"] is True, 10,
                 "the State marked stale")
        assert d.get("/api/services/ai").body["llm"]["gpu"]["stale"] is True
    finally:
        d.stop()


def test_broker_gone_marks_everything_stale(fresh_broker: PrivateBroker, prefix: str) -> None:
    publish(fresh_broker.url, f"{prefix}/{HOST}/gpu/0/state", state_payload(HOST, 0),
            retain=True)
    d = live(prefix, fresh_broker)
    try:
        wait_for(lambda: d.get("/api/gpu").body["available"], 10, "the State")
        fresh_broker.stop()
        body = wait_for(lambda: (r := d.get("/api/gpu").body)["broker_connected"] is False
                        and r, 10, "broker_connected false")
        assert body["gpu"]["stale"] is True and body["available"] is True
        assert d.post(f"/api/healer/{HOST}/enabled", {"enabled": False}).status == 503
        families = {f.name: f for f in text_string_to_metric_families(d.get("/metrics").body)}
        assert families["gpuheal_broker_connected"].samples[0].value == 0
    finally:
        d.stop()


def test_stream_starts_with_an_overview_then_sends_live_messages(dash: Dashboard) -> None:
    conn = HTTPConnection("127.0.0.1", dash.service.port, timeout=10)
    try:
        conn.request("GET", "/api/stream")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type").startswith("text/event-stream")
        kind, data = read_event(resp)
        assert kind == "overview"
        assert [(g["host"], g["index"]) for g in data["gpus"]] == [(HOST, 0), (HOST, 1)]
        assert data["broker_connected"] is True
        assert [h["host"] for h in data["hosts"]] == [HOST]
        assert data["hosts"][0]["healer"]["host"] == HOST
        assert data["hosts"][0]["components"]["analyzer"]["value"] == "online"
        assert any(a["action"] == "reset_gpu" for a in data["recent_actions"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kind, data = read_event(resp)
            if kind == "state":
                break
        assert kind == "state" and data["host"] == HOST and "stale" in data
    finally:
        conn.close()
    wait_for(lambda: dash.service.broadcaster.clients == 0, 10, "the stream client to go")


def test_stopping_ends_open_streams(broker: PrivateBroker, prefix: str) -> None:
    d = live(prefix, broker)
    conn = HTTPConnection("127.0.0.1", d.service.port, timeout=10)
    try:
        conn.request("GET", "/api/stream")
        resp = conn.getresponse()
        assert read_event(resp)[0] == "overview"
        assert d.service.broadcaster.clients == 1
        d.stop()
        resp.read()  # the stream ends (a hanging one would time out here)
    finally:
        conn.close()
    assert not d.service._server_thread.is_alive()  # type: ignore[union-attr]


# --- /metrics, OpenAPI, the page ---------------------------------------------------------------
def test_metrics_scrape_parses_with_prometheus_client(dash: Dashboard) -> None:
    r = dash.get("/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.body)}
    temps = families["gpuheal_gpu_temperature_celsius"]
    assert temps.type == "gauge" and len(temps.samples) == 2
    for s in temps.samples:
        assert set(s.labels) == {"host", "gpu", "uuid", "name"}
        assert s.labels["host"] == HOST and s.labels["uuid"].startswith("GPU-")
        assert 20 < s.value < 100
    util = families["gpuheal_gpu_utilization_ratio"].samples
    assert all(0 <= s.value <= 1 for s in util)
    mem = {s.labels["gpu"]: s.value for s in families["gpuheal_gpu_memory_used_bytes"].samples}
    gpu0 = dash.get(f"/api/gpu/{HOST}/0").body["gpu"]
    assert mem["0"] == pytest.approx(gpu0["memory"]["used_mb"] * 1024 * 1024, rel=0.2)
    assert {s.value for s in families["gpuheal_gpu_health"].samples} <= {0, 1, 2, 3}
    assert families["gpuheal_gpu_power_limit_watts"].samples[0].value == 60.0
    events = families["gpuheal_events"]
    assert events.type == "counter"
    hang = [s for s in events.samples if s.name == "gpuheal_events_total"
            and s.labels["kind"] == "gpu_hang" and s.labels["phase"] == "cleared"]
    assert hang and hang[0].value >= 1
    verified = [s for s in families["gpuheal_actions"].samples
                if s.name == "gpuheal_actions_total" and s.labels == {
                    "host": HOST, "action": "reset_gpu", "status": "verified"}]
    assert verified and verified[0].value >= 1
    up = {s.labels["component"]: s.value for s in families["gpuheal_component_up"].samples}
    assert up["analyzer"] == 1 and up["healer"] == 1 and up["recorder"] == 1
    assert families["gpuheal_healer_enabled"].samples[0].labels == {"host": HOST}


def test_metrics_of_a_forgotten_gpu_disappear(broker: PrivateBroker, prefix: str) -> None:
    topic = f"{prefix}/gone/gpu/3/state"
    publish(broker.url, topic, state_payload("gone", 3), retain=True)
    d = live(prefix, broker)

    def gpus() -> set[str]:
        families = text_string_to_metric_families(d.get("/metrics").body)
        return {s.labels["host"] + "/" + s.labels["gpu"] for f in families
                if f.name == "gpuheal_gpu_temperature_celsius" for s in f.samples}

    try:
        wait_for(lambda: gpus() == {"gone/3"}, 10, "the GPU's metrics")
        publish(broker.url, topic, b"", retain=True)  # gpuheal status --forget does this
        wait_for(lambda: gpus() == set(), 10, "the metrics to disappear")
    finally:
        d.stop()


def test_openapi_lists_every_json_endpoint(dash: Dashboard) -> None:
    doc = dash.get("/openapi.json").body
    assert doc["info"]["title"] == "gpuheal dashboard"
    paths = doc["paths"]
    for path in ("/api/gpu", "/api/gpu/{host}/{index}", "/api/services/ai", "/api/overview",
                 "/api/events", "/api/actions", "/api/history/{host}/{index}"):
        assert "application/json" in paths[path]["get"]["responses"]["200"]["content"], path
    for path in ("/api/healer/{host}/enabled", "/api/healer/{host}/reset-breaker",
                 "/api/healer/{host}/ack"):
        assert "202" in paths[path]["post"]["responses"], path
    assert "text/event-stream" in paths["/api/stream"]["get"]["responses"]["200"]["content"]
    params = {p["name"]: p for p in paths["/api/events"]["get"]["parameters"]}
    assert {"host", "gpu", "kind", "severity", "phase", "since", "limit", "offset"} <= set(params)
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_the_page_and_its_assets_are_served_from_the_package(dash: Dashboard) -> None:
    page = dash.get("/")
    assert page.status == 200 and "<title>gpuheal</title>" in page.body
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    for asset in ("/static/app.js", "/static/app.css", "/static/vendor/uplot/uPlot.iife.min.js",
                  "/static/vendor/uplot/uPlot.min.css", "/static/vendor/uplot/LICENSE"):
        assert dash.get(asset).status == 200, asset
        assert asset in page.body or asset.endswith("LICENSE")
    assert "MIT" in dash.get("/static/vendor/uplot/LICENSE").body
    assert dash.get("/static/../service.py").status == 404


# --- helpers ----------------------------------------------------------------------------------
def latest_enabled(messages: list[Any]) -> bool | None:
    """``enabled`` of the newest healer state among ``messages`` (None: none yet)."""
    states = [m.json() for m in messages if m.topic.endswith("/healer/state") and m.payload]
    return states[-1]["enabled"] if states else None


def healer_of(dash: Dashboard) -> dict[str, Any]:
    hosts = dash.get("/api/overview").body["hosts"]
    return next(h["healer"] for h in hosts if h["host"] == HOST)


def state_payload(host: str, index: int, analyzer: str | None = None) -> bytes:
    now = time.time()
    return State(host=host, index=index, name="Test GPU", uuid=f"GPU-test-{index}",
                 temperature=50.0, utilization=10.0, health="healthy",
                 timestamp="2025-11-11T12:00:00.000Z", ts=now, analyzer=analyzer).to_json()


def read_event(resp: HTTPResponse) -> tuple[str, Any]:
    """The next server-sent event (comments and retry lines skipped)."""
    kind, data = "message", ""
    while True:
        line = resp.readline().decode()
        if not line:
            raise AssertionError("the stream ended")
        line = line.rstrip("\n")
        if line == "":
            if data:
                return kind, json.loads(data)
            continue
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data += line[6:]


def _answers(url: str) -> bool:
    try:
        return http(url, timeout_s=1).status == 200
    except OSError:
        return False
