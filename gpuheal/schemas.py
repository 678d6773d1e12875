"""JSON Schemas of the wire messages, generated from :mod:`gpuheal.models`.

The committed files under ``schemas/`` are :func:`render_schemas` and :func:`render_readme`
written by ``scripts/gen_schemas.py``; ``tests/test_schemas.py`` checks that they are current.

The schemas document the *wire* contract, which differs from the models in one way: the models
forbid unknown keys when our own code builds a message, the wire tolerates them (consumers must
ignore unknown keys at every level, :func:`gpuheal.wire.decode`), so every object schema here
says ``"additionalProperties": true``. What JSON Schema cannot say is listed in the README:
integers without a fraction (``3``, not ``3.0``), the size, depth and text limits of a payload.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from gpuheal import models
from gpuheal.models import (
    Action,
    ActiveCondition,
    Clocks,
    Cooldown,
    DeadLetter,
    Event,
    HealerSet,
    HealerState,
    Memory,
    Message,
    Power,
    Process,
    Sample,
    SimCommand,
    State,
    iso_utc,
    make_action_id,
    make_event_id,
)
from gpuheal.topics import COMPONENTS, Topics
from gpuheal.wire import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    STATUS_REASON_PROPERTY,
    PayloadError,
    decode,
)

JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "https://gpuheal.invalid/schemas/"
"""Base of every schema's ``$id`` (``.invalid``: a name, never fetched)."""
README_NAME = "README.md"


@dataclass(frozen=True)
class Topic:
    """One row of DESIGN.md's topic table."""

    topic: str
    """In DESIGN.md's notation: ``P`` prefix, ``H`` host, ``I`` GPU index."""
    publisher: str
    qos: str
    retained: bool
    pattern: str
    """Subscription pattern for every host under the default prefix."""
    payload: str
    """The message name (a key of :data:`MESSAGES`), or ``status`` for plain text."""


_T = Topics()
TOPICS: tuple[Topic, ...] = (
    Topic("P/H/gpu/I/sample", "publisher", "0 (1 with `[publisher] sample_qos = 1`)", False,
          _T.gpu_pattern("sample"), "sample"),
    Topic("P/H/gpu/I/state", "analyzer", "1", True, _T.gpu_pattern("state"), "state"),
    Topic("P/H/gpu/I/event", "analyzer", "1", False, _T.gpu_pattern("event"), "event"),
    Topic("P/H/gpu/I/action", "healer", "1", False, _T.gpu_pattern("action"), "action"),
    Topic("P/H/<component>/status", "every component (Last Will)", "1", True,
          _T.status_pattern(), "status"),
    Topic("P/H/healer/state", "healer", "1", True, _T.healer_state_pattern(), "healer-state"),
    Topic("P/H/healer/set", "operator (HA switch, CLI)", "1", False, _T.healer_set_pattern(),
          "healer-set"),
    Topic("P/H/gpu/I/sim", "healer's simulated actuator", "1", False, _T.gpu_pattern("sim"),
          "sim-command"),
    Topic("P/deadletter/<component>", "any component", "0", False, _T.deadletter_pattern(),
          "dead-letter"),
)

MESSAGES: dict[str, type[Message]] = {
    "sample": Sample,
    "state": State,
    "event": Event,
    "action": Action,
    "healer-state": HealerState,
    "healer-set": HealerSet,
    "sim-command": SimCommand,
    "dead-letter": DeadLetter,
}
"""Every JSON wire message by schema name; its file is ``<name>.schema.json``."""

_PROPERTY_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    # A field validator (not visible to pydantic's schema) accepts only true or null.
    ("HealerSet", "reset_breaker"): {"anyOf": [{"const": True}, {"type": "null"}]},
}


def file_name(name: str) -> str:
    """``sample`` → ``sample.schema.json``."""
    return f"{name}.schema.json"


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of message ``name`` as the wire contract has it."""
    model = MESSAGES[name]
    doc = _wire_doc(model.model_json_schema(mode="validation"), model)
    for (model_name, field), replacement in _PROPERTY_OVERRIDES.items():
        if model_name == model.__name__ and field in doc["properties"]:
            kept = {k: v for k, v in doc["properties"][field].items() if k not in ("anyOf", "type")}
            doc["properties"][field] = {**kept, **replacement}
    rows = [t for t in TOPICS if t.payload == name]
    doc["$schema"] = JSON_SCHEMA_DRAFT
    doc["$id"] = ID_BASE + file_name(name)
    doc["title"] = model.__name__
    doc["description"] = _description(model, rows)
    doc["examples"] = [_wire_dict(examples()[name])]
    return doc


def render_schemas() -> dict[str, str]:
    """Every schema file's name and text: sorted keys, 2-space indent, trailing newline."""
    return {file_name(name): _dump(schema(name)) for name in MESSAGES}


def write_schemas(directory: Path | str) -> list[Path]:
    """Write every schema and the README into ``directory``; remove stale ``*.schema.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {**render_schemas(), README_NAME: render_readme()}
    for stale in sorted(out.glob("*.schema.json")):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# --- examples ----------------------------------------------------------------------------
EXAMPLE_HOST = "gpu-node-07"
EXAMPLE_TS = 1767268800.25
"""2026-01-01T12:00:00.250Z."""


@cache
def examples() -> dict[str, Message]:
    """One realistic message of each kind (an H100 under memory pressure), by schema name."""
    host, ts = EXAMPLE_HOST, EXAMPLE_TS
    used, total = 74312.0, 81559.0
    percent = round(used * 100.0 / total, 2)
    sample = Sample(
        host=host, index=0, uuid="GPU-5f0c3c2e-8d1a-4b7e-9a3f-2c6d1e0b9a47",
        name="NVIDIA H100 80GB HBM3", source="nvml", ts=ts, seq=86412,
        temperature_c=64.0, utilization_pct=97.0, memory_used_mb=used, memory_total_mb=total,
        power_draw_w=612.4, power_limit_w=700.0, sm_clock_mhz=1980.0, mem_clock_mhz=2619.0,
        fan_pct=None, throttle_reasons=[], xids=[], ecc_uncorrected=0,
        remapped_rows_pending=False,
        processes=[Process(pid=2381, name="ollama", used_mb=73780.0)],
        host_boot_ts=1766751632.0,
    )
    started = ts - 2.0
    oom_id = make_event_id(host, 0, "out_of_memory", started)
    message = f"memory {percent:.1f} % used (warning at 90 %, profile percent)"
    state = State(
        host=host, index=0, uuid=sample.uuid, name=sample.name, temperature=64.0,
        utilization=97.0, memory=Memory(used_mb=used, total_mb=total, percent=percent),
        power=Power(draw_w=612.4, limit_w=700.0),
        clocks=Clocks(graphics_mhz=1980.0, memory_mhz=2619.0), fan_speed=None,
        health="warning", error="out_of_memory", error_message=message,
        timestamp=iso_utc(ts), ts=ts,
        active=[ActiveCondition(event_id=oom_id, kind="out_of_memory", severity="warning",
                                started_ts=started, message=message)],
        analyzer_started_ts=1766751700.0, source="nvml",
    )
    event = Event(
        event_id=oom_id, host=host, index=0, kind="out_of_memory", severity="warning",
        phase="raised", started_ts=started, ts=started, message=message,
        evidence={"memory_used_mb": used, "memory_total_mb": total, "profile": "percent",
                  "threshold": 90.0, "unit": "%", "percent": percent},
        recommended_action="clear_llm_cache",
    )
    action_id = make_action_id(oom_id, "clear_llm_cache", 1, host, 0)
    action = Action(
        action_id=action_id, event_id=oom_id, host=host, index=0, action="clear_llm_cache",
        status="succeeded", attempt=1, ts=ts + 1.5, duration_s=1.42,
        detail={"url": "http://127.0.0.1:11434", "unloaded": ["llama3.1:70b"]},
    )
    healer_state = HealerState(
        host=host, enabled=True, dry_run=False, breaker_open=False, unresolved_count=0,
        budget_left=5, budget_per_hour=6,
        cooldowns=[Cooldown(index=0, action="clear_llm_cache", until_ts=ts + 301.5)],
        throttled=[], ts=ts + 1.5,
    )
    throttle_id = make_action_id(make_event_id(host, 0, "thermal_throttling", started),
                                 "throttle_gpu", 1, host, 0)
    sim = SimCommand(command="set_power_limit", action_id=throttle_id, power_limit_w=560.0)
    bad_topic = _T.sample(host, 0)
    bad_payload = json.dumps({"v": 1, "host": host, "index": 0, "source": "nvml", "ts": ts,
                              "seq": 86413, "available": "no"}, separators=(",", ":"))
    dead = DeadLetter(component="analyzer", topic=bad_topic, reason=_rejection(bad_payload),
                      payload=bad_payload, ts=ts + 1.0)
    return {
        "sample": sample, "state": state, "event": event, "action": action,
        "healer-state": healer_state, "healer-set": HealerSet(enabled=False),
        "sim-command": sim, "dead-letter": dead,
    }


def _rejection(payload: str) -> str:
    """The reason :func:`gpuheal.wire.decode` gives for a bad Sample (a true dead letter)."""
    try:
        decode(Sample, payload.encode())
    except PayloadError as exc:
        return exc.reason
    raise AssertionError("the dead-letter example payload is valid")


EXAMPLE_NOTES: dict[str, str] = {
    "sample": "An H100 under memory pressure: 91 % of its memory held by Ollama.",
    "state": "The analyzer's retained view of the same GPU, with its open condition.",
    "event": "The condition as it was raised; `cleared_by` is set on `cleared` only.",
    "action": "The healer unloaded the models; a `verified` with the same `action_id` follows "
              "once the State is healthy again.",
    "healer-set": "What `gpuheal` sends; an operator may send only the keys it sets, e.g. "
                  '`{"v": 1, "reset_breaker": true}` or `{"v": 1, "ack": "<event_id>"}`.',
    "sim-command": "The simulated actuator's `throttle_gpu`: 80 % of the 700 W limit.",
    "dead-letter": "A Sample the analyzer refused, with the reason its decoder gave.",
}
"""One line above each example in the README."""


# --- README --------------------------------------------------------------------------------
README_TEMPLATE = """\
# gpuheal wire schemas

<!-- Generated by scripts/gen_schemas.py from gpuheal/models.py (template in
gpuheal/schemas.py): do not edit by hand; tests/test_schemas.py checks it is current. -->

JSON Schemas ([draft 2020-12](https://json-schema.org/draft/2020-12/schema)) of every message
gpuheal publishes over MQTT; the contract itself is in [DESIGN.md](../DESIGN.md). Every JSON
message is UTF-8, carries `"v": 1`, and has `null` for a reading that is missing.

## Topics

`P` is the prefix (default `gpuheal`), `H` the host name (`[A-Za-z0-9_-]+`), `I` the GPU
index. The `mosquitto_sub` lines subscribe to every host under the default prefix (replace
`+` with a host name for one; with gpuheal's private broker, add the viewer credentials as
the [README](../README.md#watching-it) shows).

{topic_table}

## What the schemas do not say

- **Unknown keys are allowed** at every level (`"additionalProperties": true`): a newer
  producer never breaks an older consumer, so consumers must ignore keys they do not know.
  (gpuheal's own code refuses unknown keys when it *builds* a message.)
- **Integers** (`index`, `seq`, `attempt`, counts, `pid`) are written without a fraction:
  `3`, not `3.0`. JSON Schema treats `3.0` as an integer; gpuheal rejects it. Booleans are
  `true`/`false`, never `1`/`0` or strings.
- Numbers are finite: `NaN` and `Infinity` are not JSON and are rejected.
- A payload is at most {max_bytes} bytes ({max_kib} KiB), nests at most {max_depth} levels
  and has no lone UTF-16 surrogate escape (`"\\ud800"`).
- The host and GPU index in a payload equal the ones in its topic, and a dead letter's
  `component` the one in its topic.
- Timestamps (`ts`, `*_ts`) are UNIX seconds of the source clock, 0 to the end of year 9999;
  `State.timestamp` is the same instant as ISO 8601 UTC.

A payload that breaks a rule goes to `P/deadletter/<component>` with the reason.

## Status (`P/H/<component>/status`)

Not JSON: the plain text `online` or `offline`, retained, QoS 1 (what Home Assistant's
availability reads). A component publishes `online` when it connects; `offline` is its Last
Will, or its clean goodbye. Over MQTT v5 an `offline` carries the user property
`{reason_property}`: `stopped` for a clean goodbye, `lost` for the Last Will (the component
died or lost its connection).

`<component>`: {components}.

## Examples

One realistic message of each kind, rendered from the models (`gpuheal.schemas.examples()`),
pretty-printed here; on the wire each is one compact line.

{examples}
"""


def render_readme() -> str:
    """``schemas/README.md``: topic table, the limits the schemas cannot say, examples."""
    head = ("| topic | from | QoS | retained | payload | watch it |\n"
            "|---|---|---|---|---|---|")
    rows = []
    for t in TOPICS:
        payload = ("`online` / `offline` (text)" if t.payload == "status"
                   else f"[{MESSAGES[t.payload].__name__}]({file_name(t.payload)})")
        watch = f"`mosquitto_sub -v -t '{t.pattern}'`"
        rows.append(f"| `{t.topic}` | {t.publisher} | {t.qos} | {'yes' if t.retained else 'no'}"
                    f" | {payload} | {watch} |")
    sections = []
    for name, message in examples().items():
        topic = next(t.topic for t in TOPICS if t.payload == name)
        body = json.dumps(_wire_dict(message), indent=2, ensure_ascii=False)
        note = f"{EXAMPLE_NOTES[name]}\n\n" if name in EXAMPLE_NOTES else ""
        sections.append(f"### {type(message).__name__} (`{topic}`)\n\n{note}"
                        f"```json\n{body}\n```")
    text = README_TEMPLATE.format(
        topic_table="\n".join([head, *rows]),
        max_bytes=MAX_PAYLOAD_BYTES, max_kib=MAX_PAYLOAD_BYTES // 1024,
        max_depth=MAX_JSON_DEPTH, reason_property=STATUS_REASON_PROPERTY,
        components=", ".join(f"`{c}`" for c in COMPONENTS),
        examples="\n\n".join(sections),
    )
    return text.rstrip() + "\n"


# --- post-processing -------------------------------------------------------------------------
def _wire_dict(message: Message) -> dict[str, Any]:
    """What goes on the wire, as a dict (key order of the model)."""
    return json.loads(message.to_json())


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _description(model: type[Message], rows: list[Topic]) -> str:
    first = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    where = "; ".join(
        f"`{t.topic}` (from: {t.publisher}; QoS {t.qos}; "
        f"{'retained' if t.retained else 'not retained'})" for t in rows)
    return (f"{_md(first)}\n\nTopic: {where}. `P` is the prefix, `H` the host, `I` the GPU "
            "index. Consumers must ignore unknown keys.")


def _md(text: str) -> str:
    """A docstring in JSON terms: Markdown literals (```x```), ``null``/``true``/``false``."""
    text = re.sub(r"(?<!\n)\n(?!\n)", " ", text.replace("``", "`"))
    return re.sub(r"`?\b(None|True|False)\b`?", lambda m: f"`{_JSON_WORDS[m.group(1)]}`", text)


_JSON_WORDS = {"None": "null", "True": "true", "False": "false"}


def _wire_doc(doc: dict[str, Any], model: type[Message]) -> dict[str, Any]:
    """Unknown keys allowed at every object level, field docstrings as descriptions."""
    _annotate(doc, model)
    for name, sub in doc.get("$defs", {}).items():
        cls = getattr(models, name, None)
        if isinstance(cls, type):
            _annotate(sub, cls)
    _walk(doc)
    return doc


def _annotate(obj: dict[str, Any], cls: type) -> None:
    docs = _field_docs(cls)
    for field, sub in obj.get("properties", {}).items():
        if field in docs and "description" not in sub:
            sub["description"] = docs[field]


def _walk(node: Any) -> None:
    """Allow unknown keys in every object schema; Markdown literals in every description."""
    if not isinstance(node, dict):
        return
    if (("properties" in node or node.get("type") == "object")
            and node.get("additionalProperties", False) is False):
        node["additionalProperties"] = True
    if isinstance(node.get("description"), str):
        node["description"] = _md(node["description"])
    for key in ("properties", "$defs", "patternProperties"):
        for sub in node.get(key, {}).values():
            _walk(sub)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in node.get(key, []):
            _walk(sub)
    for key in ("items", "additionalProperties", "not", "contains"):
        _walk(node.get(key))


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string right after ``field: type``) of a model and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ == models.__name__:
            docs.update(_class_field_docs(klass))
    return docs


@cache
def _class_field_docs(klass: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(klass))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for stmt, after in pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs
