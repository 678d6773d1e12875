"""``gpuheal install --systemd``: systemd units for every component, and their removal.

The units are rendered from the templates in ``gpuheal/data/systemd/*.in`` (package data, so an
installed wheel has them):

* ``@name@`` is replaced by a value (paths, the gpuheal command, the healer's capabilities);
* a line starting ``@since N@`` is kept only for systemd N or newer, else left as a comment;
* a line starting ``@if FLAG@`` / ``@unless FLAG@`` is kept only when FLAG is true / false
  (``broker``: the broker unit is installed; ``jetson``; ``video``: the group exists;
  ``notify``: the broker unit is ``Type=notify``).

Every unit written starts with :data:`MARKER`; :func:`uninstall_systemd` removes only files
that carry it. The config ``ETC/gpuheal.toml`` is written from the packaged example only when
absent, and never removed. Library only: the CLI parses options and calls
:func:`install_systemd` / :func:`uninstall_systemd`, which print what they do and return an
exit status.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from gpuheal import __version__
from gpuheal.config import ConfigError, GpuhealConfig, load_config
from gpuheal.config.healing import DESTRUCTIVE_ACTIONS, XID_ACTIONS

UNIT_DIR = Path("/etc/systemd/system")
ETC_DIR = Path("/etc/gpuheal")
STATE_DIR = Path("/var/lib/gpuheal")
STATE_ROOT = Path("/var/lib")
"""systemd's ``StateDirectory=`` lives below this; ``state_dir`` must be under it."""

SERVICES: tuple[str, ...] = ("broker", "publisher", "analyzer", "healer", "recorder",
                               "dashboard")
TARGET = "gpuheal.target"
MARKER = "# Written by `gpuheal install --systemd`"
CONFIG_NAME = "gpuheal.toml"
MIN_SYSTEMD = 245
"""The oldest systemd the units are written for (Ubuntu 20.04, JetPack 5); newer options are
gated with ``@since N@``. Used when the version cannot be found out."""

DB_NAME = "gpuheal.db"
HEALER_STATE_NAME = "state.json"
JETSON_MARKER = Path("/etc/nv_tegra_release")
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
"""What ``ProtectHome=yes`` hides from every unit."""

PUBLISHER_SOURCES = ("nvml", "nvidia-smi", "jetson")
"""A real GPU source: the units never run ``auto``, which falls back to the simulator."""



ACTION_CAPABILITIES: dict[str, tuple[str, str]] = {
    "throttle_gpu": ("CAP_SYS_ADMIN", "the GPU power limit"),
    "restore_power_limit": ("CAP_SYS_ADMIN", "the GPU power limit"),
    "reset_gpu": ("CAP_SYS_ADMIN", "nvidia-smi --gpu-reset"),
}
"""The one capability an action needs beyond root's file ownership, and for what. The NVIDIA
driver takes administrative requests (power limit through NVML or ``nvidia-smi -pl``, GPU
reset) only from ``capable(CAP_SYS_ADMIN)``. The other actions need none: ``systemctl`` is
authorised by uid 0 on systemd's private socket, Ollama is HTTP."""

JETSON_ACTION_CAPABILITIES: dict[str, tuple[str, str]] = {
    "reset_gpu": ACTION_CAPABILITIES["reset_gpu"],
}
"""On a Jetson the power actions run ``jetson_clocks``, which writes root-owned files under
/sys: uid 0 is enough."""

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./+:@-]+$")
"""What a path or word may hold to go into a unit as it is (no quoting, no ``%``/``$``)."""
_PLACEHOLDER = re.compile(r"@([a-z_]+)@")
_GATE = re.compile(r"^@(since|if|unless) ([A-Za-z0-9_]+)@")


class InstallError(Exception):
    """Something that stops the install; the message is one line for a person."""


# --- what to write ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where things go and what the units run; every path absolute."""

    unit_dir: Path = UNIT_DIR
    etc_dir: Path = ETC_DIR
    state_dir: Path = STATE_DIR
    broker_dir: Path | None = None
    """Where ``gpuheal broker init`` wrote the broker config and env files (default
    ``etc_dir/broker``)."""
    executable: tuple[str, ...] = ()
    """argv that runs gpuheal: ``(/opt/gpuheal/bin/gpuheal,)`` or ``(python, -m, gpuheal)``."""
    components: tuple[str, ...] = SERVICES
    allow: tuple[str, ...] = ()
    """Destructive actions the healer is started with (``--allow``)."""
    publisher_source: str = "nvml"
    dashboard_port: int = 9100
    dashboard_bind: str = "127.0.0.1"
    mosquitto: str = "/usr/sbin/mosquitto"
    broker_notify: bool = True
    """``Type=notify`` for the broker (mosquitto built with systemd support)."""
    systemd_version: int = MIN_SYSTEMD
    jetson: bool = False
    video_group: bool = True
    healer_capabilities: tuple[str, ...] = ()
    capability_reasons: tuple[str, ...] = ()

    @property
    def broker(self) -> Path:
        return self.broker_dir or self.etc_dir / "broker"

    @property
    def config(self) -> Path:
        return self.etc_dir / CONFIG_NAME

    @property
    def db(self) -> Path:
        return self.state_dir / "recorder" / DB_NAME

    @property
    def healer_state_file(self) -> Path:
        return self.state_dir / "healer" / HEALER_STATE_NAME

    def unit_names(self) -> list[str]:
        return [unit_name(c) for c in self.components] + [TARGET]


def unit_name(component: str) -> str:
    return f"gpuheal-{component}.service"


@dataclass
class Plan:
    """The files an install writes: path -> text, plus notes for the person."""

    units: dict[Path, str] = field(default_factory=dict)
    config_text: str = ""
    notes: list[str] = field(default_factory=list)


# --- the healer's capabilities ----------------------------------------------------------------
def healer_actions(config: GpuhealConfig, allow: Iterable[str]) -> set[str]:
    """Every action the healer may take with this config and these opt-ins.

    The ladders' rungs, what an XID may ask for, ``restore_power_limit`` after a throttle;
    destructive actions only when opted in (``--allow`` or ``guards.destructive_opt_in``);
    never ``notify`` (a person's job).
    """
    actions = {rung.action for rungs in config.healer.ladders.values() for rung in rungs}
    actions |= XID_ACTIONS
    if "throttle_gpu" in actions:
        actions.add("restore_power_limit")
    opted_in = set(allow) | set(config.healer.guards.destructive_opt_in)
    return {a for a in actions
            if a != "notify" and (a not in DESTRUCTIVE_ACTIONS or a in opted_in)}


def healer_capabilities(actions: Iterable[str], jetson: bool = False
                        ) -> tuple[list[str], list[str]]:
    """The capabilities ``actions`` need (sorted) and one line per capability saying why."""
    table = JETSON_ACTION_CAPABILITIES if jetson else ACTION_CAPABILITIES
    needed: dict[str, list[str]] = {}
    for action in sorted(actions):
        if action in table:
            needed.setdefault(table[action][0], []).append(action)
    caps = sorted(needed)
    reasons = []
    for cap in caps:
        uses: dict[str, list[str]] = {}
        for action in needed[cap]:
            uses.setdefault(table[action][1], []).append(action)
        reasons.append(f"{cap}: " + "; ".join(f"{', '.join(acts)} ({why})"
                                             for why, acts in uses.items()))
    if not reasons:
        reasons = ["none: no action here needs more than uid 0"]
    return caps, reasons


# --- rendering ----------------------------------------------------------------------------
def template_text(name: str) -> str:
    """A packaged template (``gpuheal/data/systemd/NAME.in``)."""
    path = resources.files("gpuheal").joinpath("data", "systemd", f"{name}.in")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InstallError(f"unit template {name}.in is missing from the gpuheal package "
                           "(gpuheal/data/systemd/)") from None


def example_config_text() -> str:
    """The example config, rendered from the models (the same as gpuheal.example.toml)."""
    from gpuheal.config.example import render

    return render()


def render(template: str, values: dict[str, str], flags: dict[str, bool],
           systemd_version: int) -> str:
    """Fill ``@name@`` placeholders and resolve ``@since/@if/@unless`` lines (module doc)."""
    out: list[str] = []
    for line in template.splitlines():
        gate = _GATE.match(line)
        if gate:
            kind, arg = gate.groups()
            line = line[gate.end():]
            if kind == "since":
                if systemd_version < int(arg):
                    out.append(f"# (needs systemd {arg}; this one is {systemd_version}) "
                               f"{_fill(line, values)}")
                    continue
            elif flags[arg] != (kind == "if"):
                continue
        out.append(_fill(line, values))
    return "\n".join(out) + "\n"


def _fill(line: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        if "\n" not in value:
            return value
        # Continuation lines keep what came before the placeholder (a comment's "#   ").
        prefix = line[:match.start()]
        indent = re.match(r"^[#\s]*", prefix).group(0)  # type: ignore[union-attr]
        return value.replace("\n", "\n" + indent)

    return _PLACEHOLDER.sub(one, line)


def render_units(layout: Layout) -> dict[str, str]:
    """Unit name -> unit text for every component of ``layout`` and the target."""
    allow_args = "".join(f" --allow {a}" for a in layout.allow)
    values = {
        "header": f"{MARKER} (gpuheal {__version__}); replaced by the next install.\n"
                  "# Local changes belong in a drop-in: `systemctl edit UNIT`.",
        "gpuheal": " ".join(layout.executable),
        "config": str(layout.config),
        "broker_dir": str(layout.broker),
        "state_dir": str(layout.state_dir),
        "state_name": str(layout.state_dir.relative_to(STATE_ROOT)),
        "db": str(layout.db),
        "allow_args": allow_args,
        "capabilities": " ".join(layout.healer_capabilities),
        "cap_reasons": "\n".join(layout.capability_reasons),
        "source": layout.publisher_source,
        "dashboard_port": str(layout.dashboard_port),
        "dashboard_bind": layout.dashboard_bind,
        "mosquitto": layout.mosquitto,
        "broker_type": "notify" if layout.broker_notify else "simple",
        "units": " ".join(unit_name(c) for c in layout.components),
    }
    flags = {
        "broker": "broker" in layout.components,
        "jetson": layout.jetson,
        "video": layout.video_group,
        "notify": layout.broker_notify,
    }
    units = {}
    for name in layout.unit_names():
        units[name] = render(template_text(name), values, flags, layout.systemd_version)
    return units


# --- finding things out about this machine ----------------------------------------------------
def systemd_version() -> int | None:
    """This machine's systemd version (``systemctl --version``), None when unknown."""
    for tool in ("systemctl", "systemd-analyze"):
        exe = shutil.which(tool)
        if exe is None:
            continue
        try:
            done = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.match(r"systemd (\d+)", done.stdout)
        if match:
            return int(match.group(1))
    return None


def default_executable() -> list[str]:
    """The gpuheal command of this installation: the console script next to this Python (a
    venv's ``bin/gpuheal``), else the one on PATH, else ``python -m gpuheal``."""
    script = Path(sys.prefix) / "bin" / "gpuheal"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("gpuheal")
    if found:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "gpuheal"]


def detect_publisher_source(jetson: bool) -> tuple[str, str | None]:
    """A real GPU source for the publisher unit, and a note when none answers now."""
    if jetson:
        return "jetson", None
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return "nvml", None
    except Exception:  # ImportError, NVMLError (no driver, no GPU): try the next source
        pass
    if shutil.which("nvidia-smi"):
        return "nvidia-smi", None
    return "nvml", ("no NVIDIA GPU answers here now; the publisher unit uses --source nvml "
                    "(pass another source if this machine has none)")


def broker_supports_notify(mosquitto: str) -> bool:
    """Whether this mosquitto calls ``sd_notify`` (built with systemd support)."""
    try:
        return b"sd_notify" in Path(mosquitto).read_bytes()
    except OSError:
        return False


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)
    return str(Path(found).absolute()) if found else None


# --- checks -------------------------------------------------------------------------------
def _check_value(value: str, what: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise InstallError(f"{what} {value!r} cannot go into a unit as it is: use only "
                           "letters, digits and _ . / + : @ -")
    return value


def _check_absolute(path: Path, what: str) -> Path:
    if not path.is_absolute():
        raise InstallError(f"{what} must be an absolute path: {path}")
    _check_value(str(path), what)
    return path


def _under(path: Path, roots: Iterable[Path]) -> Path | None:
    for root in roots:
        if path == root or root in path.parents:
            return root
    return None


def _interpreter(script: Path) -> Path | None:
    """The ``#!`` interpreter of a script, None for a binary or no shebang."""
    try:
        with script.open("rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    return Path(words[0]) if words else None


def executable_problems(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) about running ``argv`` from the units.

    Errors: missing, not executable, under a home directory (``ProtectHome=yes`` hides it), or
    not reachable by the units' throw-away accounts. Warnings: writable by someone other than
    root (the healer runs it as root).
    """
    errors: list[str] = []
    warnings: list[str] = []
    exe = Path(argv[0])
    if not exe.is_file() or not os.access(exe, os.X_OK):
        return [f"the gpuheal command {exe} is not an executable file"], []
    files = [exe]
    interpreter = _interpreter(exe)
    if interpreter is not None:
        files.append(interpreter)
    seen: set[Path] = set()
    for f in files:
        for path in dict.fromkeys([f, f.resolve()]):
            if path in seen:
                continue
            seen.add(path)
            home = _under(path, HOME_DIRS)
            if home is not None:
                errors.append(f"{path} is under {home}, which the units hide "
                              "(ProtectHome=yes)")
                continue
            if not path.exists():
                errors.append(f"{path} (needed to run {exe}) does not exist")
                continue
            _reach(path, errors, warnings)
    return errors, warnings


def _reach(path: Path, errors: list[str], warnings: list[str]) -> None:
    """Whether everyone may run ``path``, and only root may change it."""
    st = path.stat()
    if not st.st_mode & stat.S_IXOTH:
        errors.append(f"{path} is not executable by the units' accounts "
                      f"(mode {stat.S_IMODE(st.st_mode):04o})")
    _writable_by_others(path, st, warnings)
    for parent in path.parents:
        pst = parent.stat()
        if not pst.st_mode & stat.S_IXOTH:
            errors.append(f"{parent} (above {path}) cannot be entered by the units' accounts "
                          f"(mode {stat.S_IMODE(pst.st_mode):04o})")
        _writable_by_others(parent, pst, warnings)


def _writable_by_others(path: Path, st: os.stat_result, warnings: list[str]) -> None:
    sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    who = None
    if st.st_uid != 0:
        who = f"its owner (uid {st.st_uid})"
    elif st.st_mode & stat.S_IWOTH and not sticky:
        who = "everyone"
    elif st.st_mode & stat.S_IWGRP and st.st_gid != 0 and not sticky:
        who = f"group {st.st_gid}"
    if who is not None:
        warnings.append(f"{path} can be changed by {who}, and the healer runs gpuheal as root")


def _dir_problem(path: Path, create: bool) -> str | None:
    """Why files cannot be written into ``path`` (one line), None when they can."""
    probe = path
    while not probe.exists():
        if not create or probe.parent == probe:
            return f"{path} does not exist"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        return f"{probe} is on a read-only file system"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write to {probe} (permission denied): run it as root, e.g. with sudo"
    return None


# --- install / uninstall ------------------------------------------------------------------
def plan_install(layout: Layout) -> tuple[Layout, Plan]:
    """The layout completed with the healer's capabilities, and every file to write."""
    for path, what in ((layout.unit_dir, "unit directory"), (layout.etc_dir, "config directory"),
                       (layout.state_dir, "state directory"), (layout.broker, "broker directory")):
        _check_absolute(path, what)
    if STATE_ROOT not in layout.state_dir.parents:
        raise InstallError(f"the state directory must be below {STATE_ROOT} (systemd's "
                           f"StateDirectory=): {layout.state_dir}")
    unknown = [c for c in layout.components if c not in SERVICES]
    if unknown or not layout.components:
        raise InstallError(f"unknown component(s) {', '.join(unknown) or '(none given)'}; "
                           f"known: {', '.join(SERVICES)}")
    wrong = sorted(set(layout.allow) - DESTRUCTIVE_ACTIONS)
    if wrong:
        raise InstallError(f"--allow takes {' or '.join(sorted(DESTRUCTIVE_ACTIONS))}, "
                           f"not {', '.join(wrong)}")
    if not layout.executable:
        raise InstallError("no gpuheal command given")
    _check_absolute(Path(layout.executable[0]), "the gpuheal command")
    for word in layout.executable[1:]:
        _check_value(word, "the gpuheal command")
    if layout.publisher_source not in PUBLISHER_SOURCES:
        raise InstallError(f"the publisher's source must be one of "
                           f"{', '.join(PUBLISHER_SOURCES)}, not {layout.publisher_source!r}")
    if not 1024 <= layout.dashboard_port <= 65535:
        raise InstallError(f"dashboard port {layout.dashboard_port}: use 1024..65535 (a lower "
                           "port needs a capability: put a reverse proxy in front)")
    _check_value(layout.dashboard_bind, "dashboard address")
    _check_absolute(Path(layout.mosquitto), "mosquitto")

    plan = Plan(config_text=example_config_text())
    config = _install_config(layout, plan)
    actions = healer_actions(config, layout.allow)
    caps, reasons = healer_capabilities(actions, layout.jetson)
    layout = replace(layout, allow=tuple(sorted(set(layout.allow))),
                      healer_capabilities=tuple(caps), capability_reasons=tuple(reasons))
    for name, text in render_units(layout).items():
        plan.units[layout.unit_dir / name] = text
    if "healer" in layout.components:
        plan.notes.append(
            f"healer: actions {', '.join(sorted(actions)) or 'none'}; capabilities "
            f"{' '.join(caps) or 'none (root without capabilities)'}")
    return layout, plan


def _install_config(layout: Layout, plan: Plan) -> GpuhealConfig:
    """The config the healer will run with: the existing file, else the example."""
    if layout.config.is_file():
        return load_config(layout.config)
    try:
        return GpuhealConfig.model_validate(tomllib.loads(plan.config_text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise InstallError(f"the example config is invalid: {exc}") from None


def install_systemd(
    unit_dir: Path = UNIT_DIR,
    etc_dir: Path = ETC_DIR,
    executable: Sequence[str] | str | None = None,
    allow: Iterable[str] = (),
    dry_run: bool = False,
    out: TextIO | None = None,
    *,
    err: TextIO | None = None,
    state_dir: Path = STATE_DIR,
    broker_dir: Path | None = None,
    components: Iterable[str] = SERVICES,
    publisher_source: str | None = None,
    dashboard_port: int = 9100,
    dashboard_bind: str = "127.0.0.1",
    mosquitto: str | None = None,
    systemd: int | None = None,
    jetson: bool | None = None,
    check_paths: bool = True,
) -> int:
    """Write the units (and ``etc_dir/gpuheal.toml`` when absent); print each path and the
    ``systemctl`` line to run. Returns 0, or 2 with a one-line reason on ``err``.

    ``executable``: the gpuheal command as argv, or one path (default
    :func:`default_executable`).
    ``allow``: destructive actions the healer may take (``--allow``); the healer's capability
    bounding set follows from them and the config's ladders. ``dry_run`` prints what would be
    written and writes nothing. ``systemd``/``jetson``/``publisher_source``/``mosquitto``:
    found out on this machine unless given (for units rendered for another one).
    ``check_paths`` checks that the units can run the gpuheal command (off: rendering for
    another machine).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        layout, plan = _prepare(unit_dir, etc_dir, executable, allow, state_dir, broker_dir,
                                components, publisher_source, dashboard_port, dashboard_bind,
                                mosquitto, systemd, jetson, check_paths)
        _write_install(layout, plan, dry_run, out)
    except (InstallError, ConfigError) as exc:
        print(f"gpuheal install: {exc}".replace("\n", " "), file=err)
        return 2
    return 0


def _prepare(unit_dir: Path, etc_dir: Path, executable: Sequence[str] | str | None,
             allow: Iterable[str], state_dir: Path, broker_dir: Path | None,
             components: Iterable[str], publisher_source: str | None, dashboard_port: int,
             dashboard_bind: str, mosquitto: str | None, systemd: int | None,
             jetson: bool | None, check_paths: bool) -> tuple[Layout, Plan]:
    argv = [executable] if isinstance(executable, str) else list(executable or
                                                                 default_executable())
    components = tuple(dict.fromkeys(components))
    jetson = JETSON_MARKER.exists() if jetson is None else jetson
    notes: list[str] = []
    if publisher_source is None:
        publisher_source, note = detect_publisher_source(jetson)
        if note:
            notes.append(note)
    if systemd is None:
        systemd = systemd_version()
        if systemd is None:
            notes.append(f"cannot tell the systemd version; writing units for {MIN_SYSTEMD}")
            systemd = MIN_SYSTEMD
    if mosquitto is None:
        found = find_mosquitto()
        if found is None and "broker" in components:
            raise InstallError("mosquitto is not installed (sudo apt-get install mosquitto), "
                               "or leave the broker out and use one elsewhere")
        mosquitto = found or "/usr/sbin/mosquitto"
    try:
        grp.getgrnam("video")
        video = True
    except KeyError:
        video = False
        notes.append("no group `video` here: the publisher runs without it")
    layout = Layout(
        unit_dir=Path(unit_dir), etc_dir=Path(etc_dir), state_dir=Path(state_dir),
        broker_dir=Path(broker_dir) if broker_dir is not None else None,
        executable=tuple(argv), components=components, allow=tuple(allow),
        publisher_source=publisher_source, dashboard_port=dashboard_port,
        dashboard_bind=dashboard_bind, mosquitto=mosquitto,
        broker_notify=broker_supports_notify(mosquitto), systemd_version=systemd,
        jetson=jetson, video_group=video,
    )
    if check_paths:
        errors, warnings = executable_problems(argv)
        if errors:
            raise InstallError(
                f"the units could not run {argv[0]}: {errors[0]}; install gpuheal where every "
                "account can run it, e.g. `sudo python3 -m venv /opt/gpuheal && "
                "sudo /opt/gpuheal/bin/pip install gpuheal`, then "
                "`sudo /opt/gpuheal/bin/gpuheal install --systemd`")
        notes.extend(f"warning: {w}" for w in dict.fromkeys(warnings))
    layout, plan = plan_install(layout)
    plan.notes[:0] = notes
    return layout, plan


def _write_install(layout: Layout, plan: Plan, dry_run: bool, out: TextIO) -> None:
    problem = _dir_problem(layout.unit_dir, create=False)
    if problem is None and not layout.config.exists():
        problem = _dir_problem(layout.etc_dir, create=True)
    if problem is not None:
        if dry_run:
            print(f"note: {problem}", file=out)
        else:
            raise InstallError(problem)
    verb = "would write" if dry_run else "wrote"
    for path in plan.units:
        if path.exists() and not _ours(path):
            raise InstallError(f"{path} exists and was not written by gpuheal install: "
                               "move it away first")
    for path, text in plan.units.items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            print(f"unchanged {path}", file=out)
            continue
        if not dry_run:
            _write_file(path, text, 0o644)
        print(f"{verb} {path}", file=out)
    if layout.config.exists():
        same = layout.config.read_text(encoding="utf-8") == plan.config_text
        print(f"{'unchanged' if same else 'kept (yours)'} {layout.config}", file=out)
    else:
        if not dry_run:
            layout.etc_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            _write_file(layout.config, plan.config_text, 0o644)
        print(f"{verb} {layout.config} (the example config)", file=out)
    for note in plan.notes:
        print(note, file=out)
    missing = [layout.broker / f"{c}.env" for c in ("publisher", "analyzer", "healer",
                                                    "recorder") if c in layout.components]
    if "broker" in layout.components:
        missing.insert(0, layout.broker / "mosquitto.conf")
    missing = [p for p in missing if not p.exists()]
    if missing:
        print(f"first: gpuheal broker init {layout.broker} --port 1883   "
              f"({', '.join(p.name for p in missing)} missing)", file=out)
    if dry_run:
        print("dry run: nothing written", file=out)
    print("then:  systemctl daemon-reload && systemctl enable --now gpuheal.target", file=out)


def _ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def _write_file(path: Path, text: str, mode: int) -> None:
    """Write atomically (temp file + rename) with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot write {path}: {exc.strerror}") from None


def _links_to(link: Path, unit_dir: Path) -> bool:
    """Whether ``link`` is what ``systemctl enable`` made for ``unit_dir/NAME``: a symlink to
    that file (absolute, possibly as seen from ``systemctl --root``, or relative)."""
    if not link.is_symlink():
        return False
    target = Path(os.readlink(link))
    if target.name != link.name:
        return False
    if not target.is_absolute():
        return (link.parent / target).resolve() == (unit_dir / link.name).resolve()
    return target == unit_dir / link.name or str(unit_dir).endswith(str(target.parent))


def installed_units(unit_dir: Path) -> list[Path]:
    """The unit files in ``unit_dir`` that gpuheal install wrote (they carry the marker)."""
    names = [unit_name(c) for c in SERVICES] + [TARGET]
    return [unit_dir / n for n in names if (unit_dir / n).is_file() and _ours(unit_dir / n)]


def uninstall_systemd(
    unit_dir: Path = UNIT_DIR,
    etc_dir: Path = ETC_DIR,
    dry_run: bool = False,
    out: TextIO | None = None,
    *,
    err: TextIO | None = None,
    state_dir: Path = STATE_DIR,
) -> int:
    """Remove the units gpuheal install wrote (and the ``*.wants/`` links ``systemctl enable``
    made to them); keep the config, the broker's credentials and the recorded data. Prints
    each path and the ``systemctl`` line to run. Returns 0, or 2 with a reason on ``err``."""
    out = out or sys.stdout
    err = err or sys.stderr
    unit_dir = Path(unit_dir)
    units = installed_units(unit_dir)
    names = {u.name for u in units}
    links = sorted(link for link in unit_dir.glob("*.wants/*")
                   if link.name in names and _links_to(link, unit_dir)) if unit_dir.is_dir() else []
    wants = unit_dir / f"{TARGET}.wants"  # only ever holds links to the target's units
    drop_wants = wants.is_dir() and all(p in links for p in wants.iterdir())
    verb = "would remove" if dry_run else "removed"
    if units and not dry_run:
        problem = _dir_problem(unit_dir, create=False)
        if problem is not None:
            print(f"gpuheal uninstall: {problem}", file=err)
            return 2
    for path in [*links, *units]:
        if not dry_run:
            try:
                path.unlink()
            except OSError as exc:
                print(f"gpuheal uninstall: cannot remove {path}: {exc.strerror}", file=err)
                return 2
        print(f"{verb} {path}", file=out)
    if drop_wants:
        if not dry_run:
            wants.rmdir()
        print(f"{verb} {wants}", file=out)
    others = [unit_dir / n for n in [unit_name(c) for c in SERVICES] + [TARGET]
              if (unit_dir / n).exists() and unit_dir / n not in units]
    for path in others:
        print(f"left {path} (not written by gpuheal install)", file=out)
    if not units:
        print(f"no gpuheal units in {unit_dir}", file=out)
    kept = [f"{d} ({what})" for d, what in ((Path(etc_dir), "config, broker credentials"),
                                             (Path(state_dir), "database, healer state"))
            if d.exists()]
    if kept:
        print(f"kept {' and '.join(kept)}: remove by hand when no longer wanted", file=out)
    if dry_run:
        print("dry run: nothing removed", file=out)
    if units:
        print("then:  systemctl stop gpuheal.target && systemctl daemon-reload", file=out)
    return 0
