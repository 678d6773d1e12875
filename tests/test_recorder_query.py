"""Reading a recording from the file alone: history, export, replay's sample reader,
``--since`` durations and the terminal-only progress bar."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from gpuheal.models import Sample
from gpuheal.timespec import parse_duration
from recorder.dbfile import RecordingError
from recorder.export import run_export
from recorder.history import run_history
from recorder.progress import Progress, track
from recorder.replay import count_samples, read_samples
from recorder.rows import record_for
from recorder.schema import COLUMNS
from recorder.store import Store
from tests.factories import (
    NOW,
    T,
    make_action,
    make_event,
    make_healer_state,
    make_sample,
    make_state,
)


def record(store: Store, topic: str, payload: bytes) -> None:
    r = record_for(T, topic, payload, NOW)
    assert r is not None
    store.write([r])


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    """An incident: OOM on h1/0 healed, thermal on h2/1 unresolved, plus noise."""
    path = tmp_path / "incident.db"
    s = Store(path)
    oom = make_event(0, ts=NOW)
    record(s, T.event("h1", 0), oom.to_json())
    for i, status in enumerate(("started", "succeeded", "verified")):
        record(s, T.action("h1", 0), make_action(oom, status, ts=NOW + 1 + i,
                                                 duration_s=0.4).to_json())
    cleared = oom.model_copy(update={"phase": "cleared", "ts": NOW + 5, "message": "ok again"})
    record(s, T.event("h1", 0), cleared.to_json())
    hot = make_event(1, host="h2", index=1, kind="thermal_throttling", ts=NOW + 2)
    record(s, T.event("h2", 1), hot.to_json())
    record(s, T.action("h2", 1), make_action(hot, "unresolved", action="throttle_gpu",
                                             ts=NOW + 3, reason="still hot\nafter 30 s")
           .to_json())
    hotter = hot.model_copy(update={"phase": "escalated", "severity": "critical",
                                    "ts": NOW + 4, "message": "hotter"})
    record(s, T.event("h2", 1), hotter.to_json())
    record(s, T.action("h2", 1), make_action(hot, "started", action="restart_llm_service",
                                             ts=NOW + 4.5).to_json())
    orphan = make_action(make_event(9), "skipped", ts=NOW + 6, reason="budget exhausted")
    record(s, T.action("h1", 0), orphan.to_json())
    # samples out of ts order, two hosts
    for seq, ts, host in ((2, NOW + 2, "h1"), (1, NOW + 1, "h1"), (1, NOW + 1.5, "h2"),
                          (3, NOW + 3, "h1")):
        record(s, T.sample(host, 0), make_sample(seq=seq, ts=ts, host=host,
                                                 xids=[13]).to_json())
    record(s, T.state("h1", 0), make_state().to_json())
    record(s, T.healer_state("h1"), make_healer_state().to_json())
    record(s, T.status("h1", "healer"), b"online")
    record(s, T.event("h1", 0), b"{broken")
    s.close()
    return path


def history(path: Path, **kw: object) -> tuple[int, str, str]:
    """``gpuheal history --events``: every event with its actions."""
    out, err = io.StringIO(), io.StringIO()
    rc = run_history(path, out=out, err=err, incidents=False, **kw)  # type: ignore[arg-type]
    return rc, out.getvalue(), err.getvalue()


def test_history_tells_one_line_per_incident(recording: Path) -> None:
    out = io.StringIO()
    assert run_history(recording, out=out, err=io.StringIO()) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["STARTED", "(UTC)", "HOST/GPU", "KIND", "PEAK", "DURATION",
                                "ACTIONS"]
    assert len(lines) == 3, lines
    oom, hot = (" ".join(line.split()) for line in lines[1:])
    assert "h1/0 out_of_memory warning 5s clear_llm_cache verified" in oom
    assert "PERSON" not in oom
    assert "h2/1 thermal_throttling critical open" in hot  # escalated, never cleared
    assert "throttle_gpu unresolved (still hot after 30 s), restart_llm_service running" in hot


def test_history_says_when_a_person_is_still_needed(tmp_path: Path) -> None:
    path = tmp_path / "person.db"
    s = Store(path)
    x79 = make_event(3, kind="xid_error", severity="emergency")
    record(s, T.event("h1", 0), x79.to_json())
    record(s, T.action("h1", 0), make_action(x79, "skipped", action="notify",
                                             reason="needs_human").to_json())
    other = make_event(4, kind="xid_error", severity="emergency", index=1)
    record(s, T.event("h1", 1), other.to_json())
    record(s, T.action("h1", 1), make_action(other, "skipped", action="notify",
                                             reason="needs_human").to_json())
    record(s, T.action("h1", 1), make_action(other, "acknowledged", action="notify",
                                             reason="operator", attempt=2).to_json())
    s.close()
    out = io.StringIO()
    assert run_history(path, out=out, err=io.StringIO()) == 0
    first, second = out.getvalue().splitlines()[1:]
    assert first.rstrip().endswith("PERSON NEEDED") and "notify skipped (needs_human)" in first
    assert second.rstrip().endswith("taken over by a person")


def test_history_shows_events_with_their_actions_in_order(recording: Path) -> None:
    rc, text, _ = history(recording)
    assert rc == 0
    lines = text.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "HOST", "GPU", "KIND", "SEVERITY", "PHASE",
                                "MESSAGE"]
    # columns are aligned: every event row starts its HOST column at the same offset
    col = lines[0].index("HOST")
    event_rows = [ln for ln in lines[1:] if ln[:1].isdigit()]
    assert len(event_rows) == 4
    assert all(ln[col:col + 2] in ("h1", "h2") for ln in event_rows)
    flat = [" ".join(ln.split()) for ln in lines]
    raised = next(i for i, ln in enumerate(flat) if "out_of_memory warning raised" in ln)
    assert "clear_llm_cache started" in flat[raised + 1]
    assert "clear_llm_cache succeeded attempt 1 0.4 s" in flat[raised + 2]
    # the h2 event rows interleave, yet each action sits under its own event
    verified = next(i for i, ln in enumerate(flat) if "clear_llm_cache verified" in ln)
    assert "h1 0 out_of_memory" in flat[max(i for i in range(verified)
                                           if flat[i][:1].isdigit() and " h1 " in flat[i])]
    unresolved = next(i for i, ln in enumerate(flat) if "throttle_gpu unresolved" in ln)
    assert "thermal_throttling warning raised" in flat[unresolved - 1]
    assert "still hot after 30 s" in flat[unresolved]  # one line, even with a newline in it
    escalated = next(i for i, ln in enumerate(flat) if "critical escalated" in ln)
    assert "restart_llm_service started" in flat[escalated + 1]
    assert "actions without a recorded event" in text
    assert "skipped" in flat[-1] and "budget exhausted" in flat[-1]


def test_history_filters(recording: Path) -> None:
    _, text, _ = history(recording, host="h2")
    assert " h1 " not in text
    assert "thermal_throttling" in text and "out_of_memory" not in text
    _, text, _ = history(recording, gpu=0, kind="out_of_memory")
    assert "thermal" not in text and "clear_llm_cache" in text
    assert "without a recorded event" not in text  # --kind: orphans have no kind
    _, text, _ = history(recording, since="1s", now=NOW + 3.5)  # only rows from NOW+2.5 on
    assert "escalated" in text and "cleared" in text and " raised " not in text
    assert "clear_llm_cache verified" in " ".join(text.split())
    assert "clear_llm_cache started" not in " ".join(text.split())
    rc, text, _ = history(recording, since="30s", now=NOW + 3600)
    assert rc == 0 and text.startswith("no events recorded")


@pytest.mark.parametrize("bad", ["missing.db", "notadb.txt"])
def test_history_and_export_fail_clearly_without_a_recording(tmp_path: Path, bad: str) -> None:
    path = tmp_path / bad
    if bad.endswith(".txt"):
        path.write_text("hello, not sqlite " * 100)
    rc, out, err = history(path)
    assert rc == 2 and out == "" and str(path) in err
    e = io.StringIO()
    assert run_export(path, "events", "csv", out=io.StringIO(), err=e) == 2
    assert str(path) in e.getvalue()
    assert not (tmp_path / "missing.db").exists()  # reading never creates a file
    with pytest.raises(RecordingError):
        read_samples(path)


def test_history_rejects_a_bad_duration(recording: Path) -> None:
    rc, _, err = history(recording, since="yesterday")
    assert rc == 2 and "invalid duration" in err


@pytest.mark.parametrize("table", list(COLUMNS))
def test_export_every_table_parses_back(recording: Path, table: str) -> None:
    out_csv, out_jsonl = io.StringIO(), io.StringIO()
    assert run_export(recording, table, "csv", out=out_csv, err=io.StringIO()) == 0
    assert run_export(recording, table, "jsonl", out=out_jsonl, err=io.StringIO()) == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.getvalue())))
    objs = [json.loads(ln) for ln in out_jsonl.getvalue().splitlines()]
    assert len(rows) == len(objs)
    for r, o in zip(rows, objs, strict=True):
        assert set(r) == set(o) >= set(COLUMNS[table])
    if table == "samples":
        assert len(objs) == 4
        assert objs[0]["xids"] == [13] and rows[0]["xids"] == "[13]"
        assert objs[0]["available"] is True
        assert [o["ts"] for o in objs] == sorted(o["ts"] for o in objs)
    if table == "deadletter":
        assert objs[0]["reason"].startswith("not JSON")
    if table == "events":
        assert objs[0]["evidence"] == {"memory_used_mb": 37000.0}


def test_export_since_and_errors(recording: Path) -> None:
    out = io.StringIO()
    # sample ts are NOW+1..NOW+3 but "since" is relative to now: old recordings give nothing
    assert run_export(recording, "samples", "jsonl", out=out, since="1h") == 0
    assert out.getvalue() == ""
    err = io.StringIO()
    assert run_export(recording, "samples", "xml", out=io.StringIO(), err=err) == 2
    assert "unknown format" in err.getvalue()
    err = io.StringIO()
    assert run_export(recording, "users; DROP TABLE x", "csv", out=io.StringIO(), err=err) == 2
    assert "unknown table" in err.getvalue()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(recording: Path) -> None:
    tty, pipe = FakeTTY(), io.StringIO()
    assert run_export(recording, "samples", "csv", out=io.StringIO(), err=tty) == 0
    assert run_export(recording, "samples", "csv", out=io.StringIO(), err=pipe) == 0
    assert "100% 4/4" in tty.getvalue() and tty.getvalue().endswith("\n")
    assert pipe.getvalue() == ""
    forced = io.StringIO()
    assert run_export(recording, "samples", "csv", out=io.StringIO(), err=forced,
                      progress=True) == 0
    assert "[" in forced.getvalue()
    bar = Progress(10, "x", stream=io.StringIO(), enabled=True, width=10)
    bar.done = 5
    assert bar.render() == "x [#####-----]  50% 5/10"


def test_track_wraps_replay_with_a_bar_on_a_terminal_only(recording: Path) -> None:
    tty, pipe = FakeTTY(), io.StringIO()
    seqs = [s.seq for s in track(read_samples(recording), count_samples(recording), "replay",
                                 stream=tty, every=1)]
    assert seqs == [1, 1, 2, 3]
    assert "replay [" in tty.getvalue() and "100% 4/4" in tty.getvalue()
    assert len(list(track(read_samples(recording), 4, "replay", stream=pipe))) == 4
    assert pipe.getvalue() == ""


def test_read_samples_in_ts_order_with_filters(recording: Path) -> None:
    got = list(read_samples(recording))
    assert all(isinstance(s, Sample) for s in got)
    assert [(s.host, s.seq, s.ts) for s in got] == [
        ("h1", 1, NOW + 1), ("h2", 1, NOW + 1.5), ("h1", 2, NOW + 2), ("h1", 3, NOW + 3)]
    assert got[0].xids == [13] and got[0].available is True and got[0].fan_pct is None
    assert got[0] == make_sample(seq=1, ts=NOW + 1, xids=[13])  # exactly what was sent
    assert [s.seq for s in read_samples(recording, host="h1", since_ts=NOW + 1.5)] == [2, 3]
    assert list(read_samples(recording, gpu=1)) == []
    assert [s.seq for s in read_samples(recording, until_ts=NOW + 2)] == [1, 1]
    assert count_samples(recording) == 4
    assert count_samples(recording, host="h2") == 1


@pytest.mark.parametrize(("spec", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600),
                                               ("2d", 172800), ("1.5h", 5400), ("1w", 604800)])
def test_durations(spec: str, seconds: float) -> None:
    assert parse_duration(spec) == seconds


@pytest.mark.parametrize("spec", ["", "1", "h", "-1h", "1y", "1h30m"])
def test_bad_durations(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(spec)
