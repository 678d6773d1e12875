"""nvidia-smi source: one ``nvidia-smi --query-gpu=<fields> --format=csv`` call per interval.

``--query-gpu`` costs a fraction of ``-q -x``. The CSV header is read *by name* (the
`` [unit]`` suffix stripped), so any driver's field list and column order works. Every
placeholder (``[N/A]``, ``N/A``, ``[Not Supported]``, ``[Function Not Found]``,
``[Requested functionality has been deprecated]``, ``[Unknown Error]``...) becomes None, and
units in values (``631.95 W``, ``80 %``, ``143771 MiB``) are stripped. A field this driver does
not know (``Field "x" is not a valid field to query.``, non-zero exit) is dropped and the query
retried without it; the working field list is kept for the next calls. A hung nvidia-smi is
killed (its whole process group) after ``timeout_s`` and the GPUs it knew are reported
unavailable for that round.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpuheal.procs import CommandOutcome, find_executable, run_command
from publisher.sources.base import (
    SourceError,
    SourceUnavailable,
    reason_names,
    unavailable_reading,
)

log = logging.getLogger(__name__)

QUERY_FIELDS: tuple[str, ...] = (
    "index", "uuid", "name", "temperature.gpu", "utilization.gpu", "memory.used",
    "memory.total", "power.draw", "power.draw.instant", "enforced.power.limit", "power.limit",
    "clocks.current.sm", "clocks.current.memory", "fan.speed", "clocks_event_reasons.active",
    "clocks_throttle_reasons.active", "ecc.errors.uncorrected.volatile.total",
    "remapped_rows.pending",
)
"""What the source asks for. Old drivers lack some (dropped on first use); new drivers may
still accept the old ``clocks_throttle_reasons.*`` names, which then read the same bits."""

_REASON_PREFIXES = ("clocks_event_reasons.", "clocks_throttle_reasons.")
_REASON_NOT_NAMES = {"active", "supported"}
_INVALID_FIELD_RE = re.compile(r'Field "([^"]+)" is not a valid field to query')
_NUMBER_RE = re.compile(r"^([-+]?\d+(?:\.\d+)?)(?:\s*[A-Za-z%/]+)?$")
_HEADER_UNIT_RE = re.compile(r"\s*\[[^\]]*\]\s*$")
_PLACEHOLDERS = {
    "", "n/a", "na", "not supported", "unknown error", "not found", "not available",
    "function not found", "requested functionality has been deprecated", "insufficient permissions",
    "gpu is lost", "gpu requires reset", "unknown",
}
_LOST_VALUES = {"[gpu is lost]": "GPU is lost", "[gpu requires reset]": "GPU requires reset"}
"""Values that say the whole GPU cannot be read: the reading becomes unavailable."""


# --- parsing (pure) --------------------------------------------------------------------------
def field_name(header: str) -> str:
    """``memory.used [MiB]`` → ``memory.used``."""
    return _HEADER_UNIT_RE.sub("", header.strip())


def clean(value: str | None) -> str | None:
    """The value without surrounding space, or None for every nvidia-smi placeholder."""
    if value is None:
        return None
    text = value.strip()
    bare = text[1:-1].strip() if text.startswith("[") and text.endswith("]") else text
    if bare.lower() in _PLACEHOLDERS or (text.startswith("[") and text.endswith("]")):
        return None
    return text


def number(value: str | None) -> float | None:
    """``631.95 W`` → 631.95, ``80 %`` → 80.0, ``143771 MiB`` → 143771.0; placeholders → None."""
    text = clean(value)
    if text is None:
        return None
    match = _NUMBER_RE.match(text)
    return float(match.group(1)) if match else None


def integer(value: str | None) -> int | None:
    """A count (``0``, ``12``) or a hex mask (``0x0000000000000001``); else None."""
    text = clean(value)
    if text is None:
        return None
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(float(text))
    except ValueError:
        return None


def yes_no(value: str | None) -> bool | None:
    text = clean(value)
    if text is None:
        return None
    return {"yes": True, "no": False, "active": True, "not active": False}.get(text.lower())


def parse_csv(text: str) -> list[dict[str, str]]:
    """nvidia-smi ``--format=csv`` output → one ``{field name: raw value}`` per GPU row."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    rows = list(csv.reader(lines, skipinitialspace=True))
    header = [field_name(h) for h in rows[0]]
    out = []
    for row in rows[1:]:
        if len(row) != len(header):
            raise SourceError(
                f"nvidia-smi row has {len(row)} values for {len(header)} columns: {row[:4]}..."
            )
        out.append(dict(zip(header, row, strict=True)))
    return out


def _first(row: Mapping[str, str], *names: str) -> float | None:
    for name in names:
        value = number(row.get(name))
        if value is not None:
            return value
    return None


def throttle_reasons(row: Mapping[str, str]) -> list[str] | None:
    """Active clocks-event reasons, from the ``.active`` mask and/or the per-reason columns
    (both ``clocks_event_reasons.*`` and the old ``clocks_throttle_reasons.*``); None when the
    row has neither."""
    seen = False
    active: set[str] = set()
    for prefix in _REASON_PREFIXES:
        mask = integer(row.get(prefix + "active"))
        if mask is not None:
            seen = True
            active.update(reason_names(mask))
        for key, raw in row.items():
            if not key.startswith(prefix):
                continue
            reason = key[len(prefix):]
            if reason in _REASON_NOT_NAMES or "." in reason:
                continue
            state = yes_no(raw)
            if state is not None:
                seen = True
                if state:
                    active.add(reason)
    return sorted(active) if seen else None


def row_to_reading(row: Mapping[str, str], position: int) -> dict[str, Any]:
    """One CSV row → Sample fields. Fields the row lacks are None."""
    index = integer(row.get("index"))
    lost = next((_LOST_VALUES[v.strip().lower()] for v in row.values()
                 if v.strip().lower() in _LOST_VALUES), None)
    identity = {"uuid": clean(row.get("uuid")), "name": clean(row.get("name"))}
    if lost is not None:
        return unavailable_reading(position if index is None else index, lost, **identity)
    ecc = integer(row.get("ecc.errors.uncorrected.volatile.total"))
    return {
        "index": position if index is None else index,
        **identity,
        "temperature_c": number(row.get("temperature.gpu")),
        "utilization_pct": number(row.get("utilization.gpu")),
        "memory_used_mb": number(row.get("memory.used")),
        "memory_total_mb": number(row.get("memory.total")),
        "power_draw_w": _first(row, "power.draw", "power.draw.instant", "power.draw.average"),
        "power_limit_w": _first(row, "enforced.power.limit", "power.limit"),
        "sm_clock_mhz": _first(row, "clocks.current.sm", "clocks.sm"),
        "mem_clock_mhz": _first(row, "clocks.current.memory", "clocks.mem"),
        "fan_pct": number(row.get("fan.speed")),
        "throttle_reasons": throttle_reasons(row),
        "ecc_uncorrected": ecc if ecc is None or ecc >= 0 else None,
        "remapped_rows_pending": yes_no(row.get("remapped_rows.pending")),
    }


def parse_output(text: str) -> list[dict[str, Any]]:
    """Whole ``--query-gpu`` CSV output → readings, one per GPU."""
    return [row_to_reading(row, i) for i, row in enumerate(parse_csv(text))]


def invalid_field(output: str) -> str | None:
    """The field nvidia-smi rejected (``Field "x" is not a valid field to query.``), if any."""
    match = _INVALID_FIELD_RE.search(output)
    return match.group(1) if match else None


# --- running nvidia-smi -------------------------------------------------------------------------
def resolve_executable(path: str, option: str = "--nvidia-smi") -> str:
    """An executable from PATH, or an explicit path; raise SourceUnavailable when missing
    (the message names the ``option`` that chooses another one)."""
    found = find_executable(path)
    if found:
        return found
    if os.sep in path and Path(path).is_file():
        raise SourceUnavailable(f"{path} is not executable")
    raise SourceUnavailable(f"{path!r} not found (use {option} PATH)")


def run_with_timeout(argv: list[str], timeout_s: float) -> CommandOutcome:
    """Run ``argv`` (no shell); on timeout (its whole process group killed) raise SourceError."""
    outcome = run_command(argv, timeout_s)
    if outcome.error == "timeout":
        raise SourceError(
            f"{Path(argv[0]).name} did not answer within {timeout_s:g} s and was killed")
    if outcome.error is not None:
        raise SourceError(outcome.summary())
    return outcome


class SmiSource:
    """GPUs through ``nvidia-smi --query-gpu``."""

    name = "nvidia-smi"

    def __init__(self, executable: str = "nvidia-smi", timeout_s: float = 5.0,
                 fields: Iterable[str] = QUERY_FIELDS) -> None:
        self.executable = resolve_executable(executable)
        self.timeout_s = timeout_s
        self.fields = list(fields)
        self.dropped: list[str] = []
        self.calls = 0
        self._known: dict[int, dict[str, Any]] = {}
        """Identity (uuid, name) of every GPU seen, for unavailable readings."""

    def open(self) -> SmiSource:
        """Check that nvidia-smi answers with at least one GPU; raise SourceUnavailable."""
        try:
            readings = self.query()
        except SourceError as exc:
            raise SourceUnavailable(str(exc)) from None
        if not readings:
            raise SourceUnavailable("nvidia-smi lists no GPU")
        return self

    def query(self) -> list[dict[str, Any]]:
        """One nvidia-smi call (plus one retry per field this driver rejects)."""
        while True:
            if not self.fields:
                raise SourceError("nvidia-smi rejected every field of the query")
            argv = [self.executable, f"--query-gpu={','.join(self.fields)}", "--format=csv"]
            self.calls += 1
            result = run_with_timeout(argv, self.timeout_s)
            if result.returncode == 0:
                return parse_output(result.stdout)
            output = f"{result.stdout}\n{result.stderr}"
            bad = invalid_field(output)
            if bad is None or bad not in self.fields:
                message = " ".join(output.split())[:300] or "no output"
                raise SourceError(f"nvidia-smi exited with {result.returncode}: {message}")
            log.info("nvidia-smi does not know field %r; querying without it", bad)
            self.fields.remove(bad)
            self.dropped.append(bad)

    def read(self, ts: float) -> list[dict[str, Any]]:
        try:
            readings = self.query()
        except SourceError as exc:
            if not self._known:
                raise
            log.error("nvidia-smi: %s", exc)
            return [unavailable_reading(i, str(exc), **ident) for i, ident in self._known.items()]
        for reading in readings:
            self._known[reading["index"]] = {"uuid": reading.get("uuid"),
                                             "name": reading.get("name")}
        return readings

    def close(self) -> None:
        """Nothing stays open between calls."""
