"""The example config: every key with its default and a note, rendered from the models.

``gpuheal install`` writes it as ``/etc/gpuheal/gpuheal.toml`` when there is none;
``scripts/example_config.py`` writes it as ``gpuheal.example.toml`` (a test keeps that file
current).
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from gpuheal.config import GpuhealConfig

HEADER = """\
# gpuheal configuration: every threshold, ladder rung and guard, with its default.
# Pass it with --config FILE (or GPUHEAL_CONFIG). Unknown keys are an error, so a typo
# fails loudly. Times are seconds of *event time* (the samples' clock) unless said.
# (Generated from the models by scripts/example_config.py.)
"""

NOTES = {
    "analyzer.memory_profiles": (
        "Memory profiles: the first whose `match` (a case-insensitive regex on the GPU name)\n"
        "and `hosts` (empty: every host) fit is used. unit \"gb\": GiB used; \"percent\": of\n"
        "the total."),
    "analyzer.thermal": "Clears only below (warning_c - hysteresis_c).",
    "analyzer.hang": (
        "A hang is suspected (warning) after util >= util_pct for window_s, and confirmed\n"
        "(critical, reset_gpu) only with evidence a healthy GPU cannot give: over the whole\n"
        "window (min_flat_samples samples, none more than window_s / 3 apart) power flat AND\n"
        "at most flat_power_max_pct % of the current limit AND never within the limit margin,\n"
        "no power-cap throttle reason, memory exactly constant, SM clock flat; or a hang XID\n"
        "(8, 109, 119; never 13/31/43/45). It clears clear_after_s below util_pct."),
    "healer.ladders": (
        "Ladders: on a condition the healer takes the highest rung whose min_severity the\n"
        "event reaches; when an action is unresolved after verify_window_s it escalates."),
    "healer.guards": (
        "destructive_opt_in: \"reset_gpu\" and/or \"stop_llm_service\" run only when listed\n"
        "here (or given with --allow). The simulated GPU (--source sim) opts them in."),
    "healer.actuators": (
        "Commands are argv lists, never a shell line. Nothing from a message reaches them\n"
        "except a validated GPU index."),
}

OVERRIDE_EXAMPLE = """\
# Per host / GPU model thresholds: the first override whose `match` and `hosts` fit a GPU
# replaces the sections it gives, for that GPU. For example:
# [[analyzer.overrides]]
# match = "L40S"
# hosts = ["rack1"]
# [analyzer.overrides.thermal]
# warning_c = 88.0
# critical_c = 90.0
# emergency_c = 95.0
"""


def value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def note(path: str, out: list[str], notes: dict[str, str]) -> None:
    """Write the note of ``path`` once (a list of tables gets it before its first table)."""
    if path in notes:
        out.extend("# " + line for line in notes.pop(path).splitlines())


def table(path: str, model: BaseModel, out: list[str], notes: dict[str, str]) -> None:
    scalars: dict[str, object] = {}
    nested: list[tuple[str, object]] = []
    for name in type(model).model_fields:
        v = getattr(model, name)
        if name == "overrides":
            continue
        if isinstance(v, BaseModel | dict) or (
                isinstance(v, list) and v and isinstance(v[0], BaseModel)):
            nested.append((name, v))
        elif v is not None:
            scalars[name] = v
    if scalars:
        note(path, out, notes)
        out.append(f"[{path}]")
        out.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        out.append("")
    if path == "analyzer":
        out.append(OVERRIDE_EXAMPLE)
    for name, v in nested:
        sub = f"{path}.{name}"
        if isinstance(v, BaseModel):
            table(sub, v, out, notes)
            continue
        note(sub, out, notes)
        items = ([(f"{sub}.{k}", r) for k, rungs in v.items() for r in rungs]
                 if isinstance(v, dict) else [(sub, r) for r in v])
        for where, item in items:
            out.append(f"[[{where}]]")
            out.extend(f"{k} = {value(getattr(item, k))}" for k in type(item).model_fields)
            out.append("")


def render() -> str:
    out = [HEADER]
    notes = dict(NOTES)
    config = GpuhealConfig()
    for section in ("publisher", "analyzer", "healer", "recorder"):
        table(section, getattr(config, section), out, notes)
    return "\n".join(out).rstrip() + "\n"

