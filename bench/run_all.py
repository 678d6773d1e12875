"""Run every benchmark under bench/ and rewrite BENCHMARKS.md from the results.

Run: ``.venv/bin/python bench/run_all.py [--quick] [--only analyzer,fleet] [--output FILE]
[--no-write]``.

Each ``bench/bench_*.py`` prints its tables (markdown) and, as its last line, one JSON object
with its figures; every throughput figure comes with the limit it is measured against in the
same run (a bare paho subscriber on the same stream, raw ``sqlite3`` inserts on the same disk),
so the tables are copied as they are. This script runs them one after the other (``--quick``
passes ``--quick`` to each), then writes BENCHMARKS.md: the machine (cores, CPU model,
memory, Python, Mosquitto, SQLite, paho-mqtt), the date, the commit, the load before and
after each benchmark, the headline figures, and each benchmark's own section between
``<!-- bench:NAME -->`` markers. With ``--only`` the other benchmarks' sections of the existing
file are kept as they are; a section of the old file that no benchmark writes (e.g. "Test
suite") is carried over. A benchmark that fails is reported in its section with the end of
its output, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

ORDER = ("publisher", "analyzer", "recorder", "latency", "fleet")
"""Known benchmarks first, in this order (the long fleet run last); others after them."""
INTROS: dict[str, str] = {
    "publisher": "What one host's publisher costs: a sample through each GPU source and a "
                 "sampling round through the Bus.",
    "analyzer": "A stream of samples of 1,000 GPUs published as fast as a raw socket can, QoS 0; "
                "the analyzer service (a real `gpuheal analyzer` process) and a bare paho "
                "subscriber (a process that only counts) consume the same stream at the same "
                "time. Ratio = analyzer rate / bare subscriber rate (goal >= 0.8).",
    "recorder": "Sample rows through the recorder (WAL, `synchronous=FULL`, every message "
                "acknowledged only after its row is committed) against a bare paho subscriber "
                "on the same stream, and raw `executemany` inserts on the same disk (SQLite's "
                "limit). Ratio = recorder rate / bare subscriber rate (goal >= 0.8).",
    "latency": "From publishing the sample that crosses a threshold to receiving its Event "
               "(goal p99 <= 50 ms) and from the Event to the healer's first Action (goal p99 "
               "<= 100 ms).",
    "fleet": "250 simulated hosts x 8 GPUs at 1 Hz (`bench/fleet_sim.py`, one process, one MQTT "
             "connection per host) through one Mosquitto, in three topologies: central (one "
             "analyzer, one recorder), sharded (`--shard K/N` analyzers, one recorder), edge (an "
             "analyzer per host, a central recorder and a dashboard). A few hosts get incidents "
             "(a GPU heats up) and run a real healer, whose throttle the simulator obeys. CPU is "
             "user+sys from `/proc/<pid>/stat` over the stream, as % of one core; \"GPUs one "
             "core serves\" = 2,000 / that fraction. Lost = published (the simulator's count per "
             "GPU) vs processed (the analyzers' own count), stored (the recorder's SQLite) and "
             "seen by a bare paho subscriber.",
}
PRESERVED = ("Test suite",)
"""Sections of the old BENCHMARKS.md that no benchmark writes: carried over as they are."""
TIMEOUT_S = {"fleet": 4 * 3600}
DEFAULT_TIMEOUT_S = 3600


@dataclass
class Outcome:
    name: str
    argv: list[str]
    code: int = 0
    wall_s: float = 0.0
    tables: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


def discover() -> list[str]:
    names = [p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py")]
    known = [n for n in ORDER if n in names]
    return known + sorted(n for n in names if n not in ORDER)


def run_one(name: str, quick: bool, logdir: Path) -> Outcome:
    argv = [sys.executable, str(BENCH / f"bench_{name}.py")] + (["--quick"] if quick else [])
    out = Outcome(name, argv, load_before=os.getloadavg())
    log = logdir / f"bench_{name}.log"
    t0 = time.monotonic()
    print(f"run_all: {name}: {' '.join(argv[1:])} (stderr: {log})", file=sys.stderr, flush=True)
    try:
        with log.open("wb") as err:
            done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                  timeout=TIMEOUT_S.get(name, DEFAULT_TIMEOUT_S),
                                  env=os.environ | {"PYTHONPATH": str(REPO)})
        out.code = done.returncode
        stdout = done.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as exc:
        out.code = 124
        stdout = (exc.stdout or b"").decode(errors="replace")
    out.wall_s = time.monotonic() - t0
    out.load_after = os.getloadavg()
    lines = stdout.rstrip().splitlines()
    if lines:
        try:
            figures = json.loads(lines[-1])
            if isinstance(figures, dict):
                out.figures = figures
                lines = lines[:-1]
        except ValueError:
            pass
    out.tables = "\n".join(lines).strip()
    if out.code != 0 or not out.figures:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        out.error = (f"exit code {out.code}" + ("" if out.figures else ", no JSON line")
                     + (f"\n\n```\n{tail.strip()}\n```" if tail.strip() else ""))
    print(f"run_all: {name}: exit {out.code} in {out.wall_s:.0f} s", file=sys.stderr,
          flush=True)
    return out


# --- the machine -------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    mosquitto = "not found"
    try:
        from gpuheal.broker import find_mosquitto

        text = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True,
                              timeout=10).stdout
        m = re.search(r"version (\S+)", text)
        mosquitto = m.group(1) if m else text.splitlines()[0] if text else "unknown"
    except Exception as exc:  # a missing broker is worth a line, not a crash
        mosquitto = f"not found ({exc})"
    try:
        paho_version = metadata.version("paho-mqtt")
    except metadata.PackageNotFoundError:
        paho_version = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "cpu": model or platform.processor() or "unknown",
            "memory_gib": round(mem_gib, 1), "python": platform.python_version(),
            "mosquitto": mosquitto, "sqlite": sqlite3.sqlite_version, "paho": paho_version,
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d"),
            "commit": commit + (" with local changes" if dirty else ""),
            "gpu": shutil.which("nvidia-smi") is not None}


# --- headline figures ------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "n/a" if value is None else str(value)


def headlines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per headline figure that the benchmarks' JSON lines hold."""
    rows: list[str] = []
    p = results.get("publisher", {})
    if "cpu_share_1hz_pct" in p:
        rows.append(f"| publisher, 8 simulated GPUs at 1 Hz: CPU | "
                    f"{_fmt(p['cpu_share_1hz_pct'], 3)} % of one core | |")
    a = results.get("analyzer", {})
    for key, label in (("default", "defaults"), ("every_state", "a State for every sample")):
        if isinstance(a.get(key), dict):
            rows.append(f"| analyzer / bare paho subscriber, {label} | "
                        f"**{_fmt(a[key].get('ratio'))}** | >= 0.8 |")
    r = results.get("recorder", {})
    for key, value in r.items():
        if isinstance(value, dict) and "ratio" in value:
            rows.append(f"| recorder / bare paho subscriber, {key.replace('_', ' ')} | "
                        f"**{_fmt(value['ratio'])}** | >= 0.8 |")
    lat = results.get("latency", {})
    for key, value in lat.items():
        if isinstance(value, dict) and "p99_ms" in value:
            goal = "<= 100 ms" if "action" in key else "<= 50 ms"
            rows.append(f"| latency {key.replace('_', ' ')}: p50 / p99 | "
                        f"{_fmt(value.get('p50_ms'), 1)} / **{_fmt(value.get('p99_ms'), 1)} ms**"
                        f" | p99 {goal} |")
    f = results.get("fleet", {})
    for t in f.get("results", []):
        lost = [t.get("samples_lost_analyzers"), t.get("samples_lost_recorder"),
                t.get("samples_lost_observer"), t.get("events_lost_recorder"),
                t.get("actions_lost_recorder")]
        lost_total = sum(x for x in lost if isinstance(x, int))
        analyzers = t.get("components", {}).get("analyzer", {})
        rows.append(f"| fleet, {t['topology']}: {t['gpus']:,} GPUs, pipeline CPU "
                    f"(% of one core) / GPUs one core serves / lost | "
                    f"{t.get('pipeline_cpu_pct')} % / **{_fmt(t.get('pipeline_gpus_per_core'))}** "
                    f"(analysis alone {_fmt(analyzers.get('gpus_per_core'))}) / "
                    f"**{lost_total}** | lost 0 |")
        for key, goal in (("sample_to_event", "<= 50 ms"), ("event_to_action", "<= 100 ms")):
            d = t.get(key) or {}
            if d.get("n"):
                rows.append(f"| fleet, {t['topology']}: {key.replace('_', ' ')} p50 / p99 "
                            f"(n={d['n']}) | {d['p50_ms']} / **{d['p99_ms']} ms** | p99 {goal} |")
    return rows


# --- BENCHMARKS.md --------------------------------------------------------------------------
SECTION = re.compile(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->", re.S)


def old_sections(text: str) -> tuple[dict[str, str], list[str]]:
    """The benchmark sections (between markers) and the preserved ``## `` sections of the old
    file."""
    marked = {m.group(1): m.group(0) for m in SECTION.finditer(text)}
    unmarked = SECTION.sub("", text)
    kept = []
    names = set(discover())
    for part in re.split(r"(?m)^(?=## )", unmarked):
        title = part.splitlines()[0][3:].strip() if part.startswith("## ") else ""
        first = title.split()[0].lower() if title else ""
        if title in PRESERVED:
            kept.append(part.rstrip() + "\n")
        elif first in names and first not in marked:  # a section written before the markers
            marked[first] = part.rstrip() + "\n"
    return marked, kept


def section(o: Outcome, quick: bool) -> str:
    title = o.name.capitalize()
    cmd = " ".join(["bench/" + Path(o.argv[1]).name, *o.argv[2:]])
    lines = [f"<!-- bench:{o.name} -->", f"## {title} — `{cmd}`", ""]
    if o.name in INTROS:
        lines += [INTROS[o.name], ""]
    lines.append(f"{o.wall_s:.0f} s wall; load average (1/5/15 min) before "
                 f"{'/'.join(f'{x:.2f}' for x in o.load_before)}, after "
                 f"{'/'.join(f'{x:.2f}' for x in o.load_after)}"
                 + ("; **quick run**" if quick else "") + ".")
    lines.append("")
    if o.error:
        lines += [f"**This benchmark failed**: {o.error}", ""]
    if o.tables:
        lines += [o.tables, ""]
    lines.append(f"<!-- /bench:{o.name} -->")
    return "\n".join(lines) + "\n"


def render(info: dict[str, Any], outcomes: list[Outcome], quick: bool, old: str) -> str:
    marked, kept = old_sections(old)
    ran = {o.name for o in outcomes}
    order = discover()
    results: dict[str, dict[str, Any]] = {o.name: o.figures for o in outcomes}
    for name, text in marked.items():  # figures of the sections we keep, for the headlines
        m = re.search(r"<!-- figures: (.*?) -->", text)
        if name not in ran and m:
            with contextlib.suppress(ValueError):
                results[name] = json.loads(m.group(1))
    gpu_note = ("" if info["gpu"] else
                "No NVIDIA GPU on this machine (`nvidia-smi` is not on the PATH): the NVML and "
                "nvidia-smi figures use stand-ins, and real-hardware checks are not measured "
                "here.\n\n")
    head = [
        "# Benchmarks", "",
        f"Written by `bench/run_all.py{' --quick' if quick else ''}` on {info['date']} "
        f"(commit {info['commit']}): {info['cores']} cores ({info['cpu']}), "
        f"{info['memory_gib']} GiB, Linux {info['kernel']}, Python {info['python']}, "
        f"Mosquitto {info['mosquitto']}, SQLite {info['sqlite']}, paho-mqtt {info['paho']}. "
        "Every throughput figure is a ratio to a limit measured **in the same run** (a bare "
        "paho subscriber on the same stream, raw `sqlite3` inserts on the same disk). The "
        "broker, the load generators and the components share the machine's cores, so "
        "absolute rates vary from run to run (other work on the machine shows in the load "
        "averages given with each benchmark); the ratios are steadier. Re-run everything with "
        "`.venv/bin/python bench/run_all.py` (about 45 minutes; `--quick`: a few minutes), "
        "or one benchmark with the command in its title.", "",
        gpu_note.rstrip(), "" if gpu_note else None,
        "## Headline figures", "",
        "| figure | value | goal |", "|---|---|---|", *headlines(results), "",
    ]
    body = [h for h in head if h is not None]
    for name in order:
        o = next((x for x in outcomes if x.name == name), None)
        if o is not None:
            text = section(o, quick)
            if o.figures:
                text = text.replace(f"<!-- /bench:{name} -->",
                                    f"<!-- figures: {json.dumps(o.figures)} -->\n"
                                    f"<!-- /bench:{name} -->")
            body.append(text)
        elif name in marked:
            body.append(marked[name] + "\n")
    body += kept
    return "\n".join(body).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", help="comma-separated benchmark names (default: all of them)")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print the result, write nothing")
    ap.add_argument("--logs", type=Path, help="where each benchmark's stderr goes")
    args = ap.parse_args()
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"run_all: no such benchmark: {', '.join(unknown)} (have: {', '.join(names)})",
                  file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    logdir = args.logs or Path(os.environ.get("TMPDIR", "/tmp")) / "gpuheal-bench-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    outcomes = [run_one(name, args.quick, logdir) for name in names]
    old = args.output.read_text() if args.output.exists() else ""
    text = render(info, outcomes, args.quick, old)
    if args.no_write:
        print(text)
    else:
        args.output.write_text(text)
        print(f"run_all: wrote {args.output}", file=sys.stderr)
    summary = {"bench": "all", "quick": args.quick, "machine": info,
               "results": {o.name: {"code": o.code, "wall_s": round(o.wall_s, 1)}
                           for o in outcomes}}
    print(json.dumps(summary))
    return 0 if all(o.code == 0 and o.figures for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
