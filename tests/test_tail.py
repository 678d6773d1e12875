"""``gpuheal tail`` as a person runs it: a real subprocess reading a real broker."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

from gpuheal.models import Action, Event, Memory, Power, State, iso_utc
from gpuheal.tail import format_action, format_event
from gpuheal.topics import Topics
from tests.support import publish, wait_for

TS = time.mktime((2026, 11, 30, 12, 4, 31, 0, 0, -1))


def _lines(proc: subprocess.Popen[str], n: int) -> list[str]:
    assert proc.stdout is not None
    return [proc.stdout.readline().rstrip("\n") for _ in range(n)]


def test_tail_tells_an_incident_as_it_happens(broker, prefix: str, gpuheal_cmd) -> None:
    t = Topics(prefix)
    state = State(host="n1", index=0, name="NVIDIA A100-SXM4-40GB", health="healthy",
                  temperature=61.0, utilization=93.0, memory=Memory(used_mb=30000.0,
                                                                     total_mb=40960.0),
                  power=Power(draw_w=312.5, limit_w=400.0), timestamp=iso_utc(TS), ts=TS)
    publish(broker.url, t.state("n1", 0), state.to_json(), retain=True)
    other = state.model_copy(update={"host": "n2"})
    publish(broker.url, t.state("n2", 0), other.to_json(), retain=True)
    proc = subprocess.Popen([*gpuheal_cmd, "tail", "--broker", broker.url, "--prefix", prefix,
                             "--host", "n1"], stdout=subprocess.PIPE, text=True)
    try:
        [summary] = _lines(proc, 1)
        assert summary == ("n1/0 NVIDIA A100-SXM4-40GB: healthy, 61 °C, 93 %, 30000/40960 MiB, "
                           "312 W")
        hot = Event(event_id="e1", host="n1", index=0, kind="thermal_throttling",
                    severity="warning", phase="raised", started_ts=TS, ts=TS,
                    message="temperature 84.2 °C (warning at 83 °C)")
        publish(broker.url, t.event("n2", 0), hot.model_copy(update={"host": "n2"}).to_json())
        publish(broker.url, t.event("n1", 0), hot.to_json())
        for status in ("started", "succeeded", "verified"):
            publish(broker.url, t.action("n1", 0), Action(
                action_id="a1", event_id="e1", host="n1", index=0, action="throttle_gpu",
                status=status, ts=TS + 2, detail={"kind": "thermal_throttling"}).to_json())
        lines = _lines(proc, 4)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    assert lines[0] == ("12:04:31 n1/0 thermal_throttling warning — temperature 84.2 °C "
                        "(warning at 83 °C)")  # the n2 event is filtered out
    assert lines[1:] == ["    12:04:33 throttle_gpu started", "    12:04:33 throttle_gpu succeeded",
                         "    12:04:33 throttle_gpu verified"]


def test_tail_json_lines(broker, prefix: str, gpuheal_cmd) -> None:
    t = Topics(prefix)
    proc = subprocess.Popen([*gpuheal_cmd, "tail", "--broker", broker.url, "--prefix", prefix,
                             "--json", "--kind", "gpu_hang"], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    hang = Event(event_id="h", host="n1", index=3, kind="gpu_hang", severity="critical",
                 phase="raised", started_ts=TS, ts=TS, message="hang confirmed")
    oom = hang.model_copy(update={"kind": "out_of_memory", "event_id": "o"})
    try:
        def published_and_seen() -> bool:  # tail subscribes in the background
            publish(broker.url, t.event("n1", 3), oom.to_json())
            publish(broker.url, t.event("n1", 3), hang.to_json())
            return bool(lines)

        wait_for(published_and_seen, 10, "a JSON line")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        reader.join(5)
    assert {json.loads(line)["event_id"] for line in lines} == {"h"}


def test_colours_follow_severity_and_outcome() -> None:
    e = Event(event_id="e", host="h", index=1, kind="gpu_hang", severity="critical",
              phase="escalated", started_ts=TS, ts=TS, message="m")
    assert "\x1b[31mcritical (escalated)\x1b[0m" in format_event(e, color=True)
    a = Action(action_id="a", host="h", index=1, action="reset_gpu", status="skipped",
               reason="workload_answers", ts=TS, detail={"message": "the workload answers"})
    assert format_action(a) == ("    12:04:31 reset_gpu skipped (workload_answers): the "
                                "workload answers")
