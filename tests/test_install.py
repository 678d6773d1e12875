"""``gpuheal install --systemd``: the units systemd itself accepts, the command lines gpuheal's own
parser accepts, least privilege for the healer, and an install/uninstall that touch exactly their
own files.

systemd does not run on this machine (no PID 1 to start units), so the units are checked with
systemd's own offline tools: ``systemd-analyze verify`` and ``security --offline``, and
``systemctl --root`` for the ``enable`` links. The units point at this checkout's venv
``gpuheal`` script; its interpreter lives under /root (pyenv), which the units would hide
(ProtectHome=yes), so these renders pass ``check_paths=False`` and the path checks have tests
of their own on files laid out for them.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import pytest

from gpuheal import install
from gpuheal.cli import build_parser
from gpuheal.config import load_config
from tests.support import REPO

GPUHEAL = Path(sys.prefix) / "bin" / "gpuheal"
ANALYZE = shutil.which("systemd-analyze")
SYSTEMD = install.systemd_version()
SERVICES = [install.unit_name(c) for c in install.SERVICES]
ALL_UNITS = [*SERVICES, install.TARGET]
GPU_COMPONENTS = ("publisher", "healer")
PYTHON_ONLY = ("analyzer", "recorder", "dashboard")

needs_analyze = pytest.mark.skipif(ANALYZE is None or SYSTEMD is None,
                                   reason="systemd-analyze is not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value assigned, in order (comments and blanks dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def service(text: str) -> dict[str, list[str]]:
    return parse_unit(text)["Service"]


def one(text: str, key: str, section: str = "Service") -> str:
    values = parse_unit(text)[section][key]
    assert len(values) == 1, f"{key} set {len(values)} times"
    return values[0]


def do_install(tmp: Path, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = {"unit_dir": tmp / "units", "etc_dir": tmp / "etc", "executable": [str(GPUHEAL)],
            "publisher_source": "nvml", "systemd": SYSTEMD or install.MIN_SYSTEMD,
            "jetson": False, "check_paths": False, "out": out, "err": err, **kwargs}
    (tmp / "units").mkdir(exist_ok=True)
    rc = install.install_systemd(**args)
    return rc, out.getvalue(), err.getvalue()


def units_in(unit_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(unit_dir.iterdir()) if p.is_file()}


@pytest.fixture
def rendered(tmp_path: Path) -> dict[str, str]:
    rc, _, err = do_install(tmp_path, allow=["reset_gpu"])
    assert rc == 0, err
    return units_in(tmp_path / "units")


def tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every path under ``root`` with its mode and content (or link target)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            found[str(path)] = (st.st_mode, os.readlink(path))
        elif path.is_file():
            found[str(path)] = (st.st_mode, path.read_bytes())
        else:
            found[str(path)] = (st.st_mode, "")
    return found


# --- systemd accepts them -------------------------------------------------------------------
def verify(unit_dir: Path, name: str) -> list[str]:
    """What ``systemd-analyze verify`` says about one unit (empty: nothing to complain about).

    No warning is accepted: on this machine (systemd 252, not running) verify says nothing about
    the machine itself for these units, so any line is about the unit."""
    done = subprocess.run([ANALYZE, "verify", "--man=no", str(unit_dir / name)],
                          capture_output=True, text=True, timeout=60, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0 and not lines:
        lines = [f"exit status {done.returncode}"]
    return lines


@needs_analyze
@pytest.mark.parametrize("version", ["this machine", "oldest supported"])
def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path, version: str) -> None:
    systemd = SYSTEMD if version == "this machine" else install.MIN_SYSTEMD
    rc, _, err = do_install(tmp_path, systemd=systemd,
                            allow=["reset_gpu", "stop_llm_service"])
    assert rc == 0, err
    unit_dir = tmp_path / "units"
    assert sorted(units_in(unit_dir)) == sorted(ALL_UNITS)
    for name in ALL_UNITS:
        assert verify(unit_dir, name) == [], name
    if version == "oldest supported":  # options newer than that are left as comments
        text = (unit_dir / "gpuheal-analyzer.service").read_text()
        assert "ProtectProc" not in service(text)
        assert "# (needs systemd 247; this one is 245) ProtectProc=invisible" in text


@needs_analyze
def test_verify_catches_what_systemd_would_refuse(tmp_path: Path) -> None:
    """The check above can fail: an unknown option and a missing executable are reported."""
    rc, _, err = do_install(tmp_path, executable=[str(tmp_path / "no-such-gpuheal")])
    assert rc == 0, err
    unit_dir = tmp_path / "units"
    assert any("is not executable" in line
               for line in verify(unit_dir, "gpuheal-analyzer.service"))
    path = unit_dir / "gpuheal.target"
    path.write_text(path.read_text().replace("[Install]", "[Install]\nWantedByy=x.target"))
    assert any("WantedByy" in line for line in verify(unit_dir, "gpuheal.target"))


@needs_analyze
def test_units_are_hardened_by_systemd_analyze_security(rendered: dict[str, str],
                                                        tmp_path: Path) -> None:
    """systemd's own exposure score (0 safest .. 10): the throw-away-account units stay near
    the floor; broker (starts as root to drop to mosquitto), publisher (devices) and healer
    (root) a little above it."""
    limits = {"analyzer": 2.0, "recorder": 2.0, "dashboard": 2.0, "broker": 3.0,
              "publisher": 3.0, "healer": 3.5}
    for component, limit in limits.items():
        done = subprocess.run(
            [ANALYZE, "security", "--offline=true", "--no-pager", f"--threshold={limit * 10:.0f}",
             str(tmp_path / "units" / install.unit_name(component))],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{component}: {done.stdout[-400:]}{done.stderr}"


def test_every_service_has_the_common_sandbox(rendered: dict[str, str]) -> None:
    for name in SERVICES:
        s = service(rendered[name])
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                           ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                           ("PrivateMounts", "yes"), ("LockPersonality", "yes"),
                           ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
                           ("RestrictNamespaces", "yes"), ("RestrictSUIDSGID", "yes"),
                           ("SystemCallArchitectures", "native"),
                           ("Restart", "on-failure"), ("AmbientCapabilities", "")):
            assert s.get(key) == [value], f"{name}: {key}={s.get(key)}"
        assert "@system-service" in s["SystemCallFilter"], name
        assert s["RestartSec"] == ["5s"], name
        assert parse_unit(rendered[name])["Unit"]["PartOf"] == ["gpuheal.target"], name
        assert parse_unit(rendered[name])["Install"]["WantedBy"] == ["gpuheal.target"], name


def test_least_privilege_per_component(rendered: dict[str, str]) -> None:
    for component in ("publisher", *PYTHON_ONLY):
        s = service(rendered[install.unit_name(component)])
        assert s["DynamicUser"] == ["yes"] and s["CapabilityBoundingSet"] == [""], component
    assert service(rendered["gpuheal-publisher.service"])["SupplementaryGroups"] == ["video"]
    for component in PYTHON_ONLY:  # pure Python: W^X memory, no devices, no other users
        s = service(rendered[install.unit_name(component)])
        for key in ("MemoryDenyWriteExecute", "PrivateDevices", "PrivateUsers", "ProtectClock"):
            assert s[key] == ["yes"], (component, key)
        assert "~@privileged @resources" in s["SystemCallFilter"], component
    # The dashboard reads the recorder's SQLite file in WAL mode: same account, same directory.
    recorder = service(rendered["gpuheal-recorder.service"])
    dashboard = service(rendered["gpuheal-dashboard.service"])
    assert recorder["User"] == dashboard["User"] == ["gpuheal-recorder"]
    assert recorder["StateDirectory"] == dashboard["StateDirectory"] == ["gpuheal/recorder"]
    healer = service(rendered["gpuheal-healer.service"])
    assert healer["User"] == ["root"] and "DynamicUser" not in healer
    assert healer["StateDirectory"] == ["gpuheal/healer"]
    assert healer["Environment"][-1] == "HOME=/var/lib/gpuheal/healer"
    broker = service(rendered["gpuheal-broker.service"])
    assert broker["CapabilityBoundingSet"] == ["CAP_SETUID CAP_SETGID"]
    assert broker["ReadWritePaths"] == [str(Path(rendered_etc(rendered)) / "broker" / "data")]


def rendered_etc(units: dict[str, str]) -> str:
    config = next(v for v in service(units["gpuheal-analyzer.service"])["Environment"]
                  if v.startswith("GPUHEAL_CONFIG="))
    return str(Path(config.partition("=")[2]).parent)


def test_gpu_units_keep_the_gpu_visible(rendered: dict[str, str]) -> None:
    """Options that would hide /dev/nvidia* or the processes on the GPU are not set.

    ProtectClock= adds a DeviceAllow= rule, which makes the device cgroup an allow-list;
    ProtectProc=/ProcSubset= would hide other users' processes from the reset's safety check
    and /proc/driver/nvidia from NVML."""
    for component in GPU_COMPONENTS:
        s = service(rendered[install.unit_name(component)])
        for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock",
                    "ProtectProc", "ProcSubset", "PrivateUsers", "MemoryDenyWriteExecute"):
            assert key not in s, (component, key)


def test_units_follow_the_broker_and_the_network(rendered: dict[str, str]) -> None:
    for component in ("publisher", "analyzer", "healer", "recorder", "dashboard"):
        unit = parse_unit(rendered[install.unit_name(component)])["Unit"]
        assert "gpuheal-broker.service" in unit["After"][0].split()
        assert "network-online.target" in unit["After"][0].split()
        assert {"network-online.target", "gpuheal-broker.service"} <= set(unit["Wants"])
        env = service(rendered[install.unit_name(component)])
        assert "GPUHEAL_LOG_FORMAT=journal" in env["Environment"]
    target = parse_unit(rendered["gpuheal.target"])["Install"]
    assert target["WantedBy"] == ["multi-user.target"]
    assert sorted(target["Also"][0].split()) == sorted(SERVICES)


def test_without_the_broker_unit_components_do_not_want_it(tmp_path: Path) -> None:
    rc, _, err = do_install(tmp_path, components=["publisher", "healer"])
    assert rc == 0, err
    units = units_in(tmp_path / "units")
    assert sorted(units) == ["gpuheal-healer.service", "gpuheal-publisher.service",
                             "gpuheal.target"]
    assert parse_unit(units["gpuheal-healer.service"])["Unit"]["Wants"] == [
        "network-online.target"]
    assert parse_unit(units["gpuheal.target"])["Install"]["Also"] == [
        "gpuheal-publisher.service gpuheal-healer.service"]


# --- the command lines --------------------------------------------------------------------
def exec_argv(text: str) -> list[str]:
    """ExecStart= as argv (the units hold only plain words: install refuses anything else)."""
    return one(text, "ExecStart").split()


@pytest.mark.parametrize("component", ["publisher", "analyzer", "healer", "recorder",
                                       "dashboard"])
@pytest.mark.parametrize("command", ["script", "python -m"])
def test_exec_start_parses_with_gpuheal_own_parser(tmp_path: Path, component: str,
                                                   command: str) -> None:
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if component not in subcommands:
        pytest.skip(f"`gpuheal {component}` is not a subcommand yet")
    prefix = [str(GPUHEAL)] if command == "script" else [sys.executable, "-m", "gpuheal"]
    rc, _, err = do_install(tmp_path, executable=prefix, allow=["stop_llm_service"],
                            state_dir=Path("/var/lib/gpuheal-test"))
    assert rc == 0, err
    argv = exec_argv((tmp_path / "units" / install.unit_name(component)).read_text())
    assert argv[:len(prefix)] == prefix
    args = parser.parse_args(argv[len(prefix):])
    assert args.command == component
    if component == "publisher":
        assert args.source == "nvml"
    if component == "healer":
        assert args.allow == ["stop_llm_service"]
        assert args.state_file == Path("/var/lib/gpuheal-test/healer/state.json")
    if component in ("recorder", "dashboard"):
        assert args.db == Path("/var/lib/gpuheal-test/recorder/gpuheal.db")
    if component == "dashboard":
        assert (args.port, args.bind) == (9100, "127.0.0.1")


def test_broker_exec_start_runs_the_config_broker_init_writes(rendered: dict[str, str]) -> None:
    argv = exec_argv(rendered["gpuheal-broker.service"])
    etc = Path(rendered_etc(rendered))
    assert argv == [install.find_mosquitto(), "-c", str(etc / "broker" / "mosquitto.conf")]
    assert one(rendered["gpuheal-broker.service"], "Type") == (
        "notify" if install.broker_supports_notify(argv[0]) else "simple")


# --- the healer's capabilities ------------------------------------------------------------
def healer_unit(tmp_path: Path, config: str | None = None, **kwargs) -> str:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    if config is not None:
        (etc / "gpuheal.toml").write_text(config)
    rc, _, err = do_install(tmp_path, components=["healer"], **kwargs)
    assert rc == 0, err
    return (tmp_path / "units" / "gpuheal-healer.service").read_text()


NO_THROTTLE = """
[healer.ladders]
thermal_throttling = [{action = "restart_llm_service", min_severity = "warning"}]
out_of_memory = [{action = "clear_llm_cache", min_severity = "warning"},
                 {action = "stop_llm_service", min_severity = "emergency"}]
gpu_hang = [{action = "reset_gpu", min_severity = "critical"}]
"""


def test_default_ladders_need_cap_sys_admin_for_the_power_limit(tmp_path: Path) -> None:
    text = healer_unit(tmp_path)
    assert one(text, "CapabilityBoundingSet") == "CAP_SYS_ADMIN"
    assert "--allow" not in one(text, "ExecStart")
    assert "throttle_gpu (the GPU power limit)" in text


@pytest.mark.parametrize("allow", [[], ["stop_llm_service"], ["reset_gpu"],
                                   ["reset_gpu", "stop_llm_service", "reset_gpu"]])
def test_healer_capabilities_follow_allow(tmp_path: Path, allow: list[str]) -> None:
    """Without a throttle rung, only an opted-in GPU reset needs a capability."""
    text = healer_unit(tmp_path, NO_THROTTLE, allow=allow)
    expected = "CAP_SYS_ADMIN" if "reset_gpu" in allow else ""
    assert one(text, "CapabilityBoundingSet") == expected
    argv = exec_argv(text)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--allow"] == sorted(set(allow))
    actions = install.healer_actions(load_config(tmp_path / "etc" / "gpuheal.toml"), allow)
    assert ("reset_gpu" in actions) == ("reset_gpu" in allow)
    assert ("stop_llm_service" in actions) == ("stop_llm_service" in allow)
    assert "throttle_gpu" not in actions and "notify" not in actions
    if ANALYZE and SYSTEMD:  # the empty bounding set is valid systemd too
        assert verify(tmp_path / "units", "gpuheal-healer.service") == []


def test_config_opt_in_counts_like_allow(tmp_path: Path) -> None:
    text = healer_unit(tmp_path, NO_THROTTLE + """
[healer.guards]
destructive_opt_in = ["reset_gpu"]
""")
    assert one(text, "CapabilityBoundingSet") == "CAP_SYS_ADMIN"
    assert "reset_gpu (nvidia-smi --gpu-reset)" in text


def test_on_a_jetson_the_throttle_needs_no_capability_but_writable_sys(tmp_path: Path) -> None:
    jetson = healer_unit(tmp_path, jetson=True)
    assert one(jetson, "CapabilityBoundingSet") == ""
    assert "ProtectKernelTunables" not in service(jetson)
    x86 = healer_unit(tmp_path, jetson=False)
    assert one(x86, "ProtectKernelTunables") == "yes"


def test_unknown_allow_is_refused(tmp_path: Path) -> None:
    rc, _, err = do_install(tmp_path, allow=["reboot"])
    assert rc == 2
    assert err.strip() == ("gpuheal install: --allow takes reset_gpu or stop_llm_service, "
                           "not reboot")
    assert list((tmp_path / "units").iterdir()) == []


def test_an_invalid_config_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "gpuheal.toml").write_text("[healer.guards]\ncooldown_s = -1\n")
    rc, _, err = do_install(tmp_path)
    assert rc == 2
    assert len(err.splitlines()) == 1 and "cooldown_s" in err
    assert list((tmp_path / "units").iterdir()) == []


# --- install, dry run, uninstall --------------------------------------------------------
def test_install_prints_every_path_and_the_enable_line(tmp_path: Path) -> None:
    rc, out, err = do_install(tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    for name in ALL_UNITS:
        assert f"wrote {tmp_path / 'units' / name}" in lines
    assert f"wrote {tmp_path / 'etc' / 'gpuheal.toml'} (the example config)" in lines
    assert lines[-1] == "then:  systemctl daemon-reload && systemctl enable --now gpuheal.target"
    assert any(line.startswith(f"first: gpuheal broker init {tmp_path / 'etc' / 'broker'}")
               for line in lines)
    assert (tmp_path / "etc" / "gpuheal.toml").read_text() == install.example_config_text()
    assert stat.S_IMODE((tmp_path / "etc" / "gpuheal.toml").stat().st_mode) == 0o644
    again = do_install(tmp_path)[1].splitlines()
    assert f"unchanged {tmp_path / 'units' / 'gpuheal-healer.service'}" in again
    assert f"unchanged {tmp_path / 'etc' / 'gpuheal.toml'}" in again


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "units").mkdir()
    before = tree(tmp_path)
    rc, out, err = do_install(tmp_path, dry_run=True, allow=["reset_gpu"])
    assert rc == 0, err
    assert tree(tmp_path) == before
    lines = out.splitlines()
    for name in ALL_UNITS:
        assert f"would write {tmp_path / 'units' / name}" in lines
    assert f"would write {tmp_path / 'etc' / 'gpuheal.toml'} (the example config)" in lines
    assert "dry run: nothing written" in lines
    assert lines[-1] == "then:  systemctl daemon-reload && systemctl enable --now gpuheal.target"


def test_an_edited_config_is_kept(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    edited = install.example_config_text().replace("cooldown_s = 300.0", "cooldown_s = 600.0")
    assert edited != install.example_config_text()
    (etc / "gpuheal.toml").write_text(edited)
    rc, out, err = do_install(tmp_path)
    assert rc == 0, err
    assert (etc / "gpuheal.toml").read_text() == edited
    assert f"kept (yours) {etc / 'gpuheal.toml'}" in out.splitlines()


def test_a_unit_not_written_by_install_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "units").mkdir()
    mine = "[Service]\nExecStart=/bin/true\n"
    (tmp_path / "units" / "gpuheal-healer.service").write_text(mine)
    rc, _, err = do_install(tmp_path)
    assert rc == 2
    assert "gpuheal-healer.service exists and was not written by gpuheal install" in err
    assert (tmp_path / "units" / "gpuheal-healer.service").read_text() == mine


def test_uninstall_removes_what_install_wrote_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "other.service").write_text("[Service]\nExecStart=/bin/true\n[Install]\n"
                                            "WantedBy=multi-user.target\n")
    rc, _, err = do_install(tmp_path, unit_dir=unit_dir)
    assert rc == 0, err
    dropin = unit_dir / "gpuheal-healer.service.d" / "override.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nEnvironment=GPUHEAL_HOST=rig1\n")
    systemctl = shutil.which("systemctl")
    if systemctl:  # the links `systemctl enable` makes, made by systemctl itself
        for unit in ("gpuheal.target", "other.service"):
            done = subprocess.run([systemctl, f"--root={root}", "enable", unit],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
    else:
        (unit_dir / "multi-user.target.wants").mkdir()
        for unit in ("gpuheal.target", "other.service"):
            (unit_dir / "multi-user.target.wants" / unit).symlink_to(unit_dir / unit)
    links = sorted(p.name for p in unit_dir.glob("*.wants/*"))
    assert "gpuheal-healer.service" in links or not systemctl
    (tmp_path / "etc" / "gpuheal.toml").write_text(
        (tmp_path / "etc" / "gpuheal.toml").read_text() + "\n# mine\n")
    before = tree(tmp_path)

    out = io.StringIO()
    assert install.uninstall_systemd(unit_dir, tmp_path / "etc", out=out) == 0
    after = tree(tmp_path)
    removed = sorted(set(before) - set(after))
    assert sorted(set(after) - set(before)) == []
    assert all(after[p] == before[p] for p in after)  # what is left is untouched
    ours = {str(unit_dir / n) for n in ALL_UNITS}
    assert ours <= set(removed)
    leftover = [Path(p) for p in removed if p not in ours]
    # the links `systemctl enable` made to them, and the target's own .wants directory
    assert all((p.parent.name.endswith(".wants") and p.name in ALL_UNITS)
               or p == unit_dir / "gpuheal.target.wants" for p in leftover), leftover
    assert (unit_dir / "multi-user.target.wants" / "other.service").is_symlink()
    assert dropin.is_file() and (unit_dir / "other.service").is_file()
    assert (tmp_path / "etc" / "gpuheal.toml").read_text().endswith("# mine\n")
    lines = out.getvalue().splitlines()
    assert sorted(ln.removeprefix("removed ") for ln in lines
                  if ln.startswith("removed ")) == removed
    assert lines[-1] == "then:  systemctl stop gpuheal.target && systemctl daemon-reload"


def test_uninstall_dry_run_and_a_foreign_unit(tmp_path: Path) -> None:
    rc, _, err = do_install(tmp_path, components=["analyzer"])
    assert rc == 0, err
    unit_dir = tmp_path / "units"
    (unit_dir / "gpuheal-healer.service").write_text("[Service]\nExecStart=/bin/true\n")
    before = tree(tmp_path)
    out = io.StringIO()
    assert install.uninstall_systemd(unit_dir, tmp_path / "etc", dry_run=True, out=out) == 0
    assert tree(tmp_path) == before
    lines = out.getvalue().splitlines()
    assert f"would remove {unit_dir / 'gpuheal-analyzer.service'}" in lines
    assert f"left {unit_dir / 'gpuheal-healer.service'} (not written by gpuheal install)" in lines
    assert install.uninstall_systemd(unit_dir, tmp_path / "etc", out=io.StringIO()) == 0
    assert sorted(p.name for p in unit_dir.iterdir()) == ["gpuheal-healer.service"]


# --- clear errors for directories that cannot be written ----------------------------------
def test_a_missing_unit_directory_is_one_line(tmp_path: Path) -> None:
    err = io.StringIO()
    rc = install.install_systemd(tmp_path / "nope", tmp_path / "etc", [str(GPUHEAL)],
                                 out=io.StringIO(), err=err, check_paths=False,
                                 publisher_source="nvml", systemd=252, jetson=False)
    assert rc == 2
    assert err.getvalue() == f"gpuheal install: {tmp_path / 'nope'} does not exist\n"


def _install_in_subprocess(prefix: list[str], unit_dir: Path, etc_dir: Path,
                           before: list[list[str]] = ()) -> subprocess.CompletedProcess[str]:
    """install_systemd in a real process started through ``prefix`` (setpriv, unshare)."""
    code = (
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        "from gpuheal.install import install_systemd\n"
        f"for argv in {[list(map(str, b)) for b in before]!r}:\n"
        "    subprocess.run(argv, check=True)\n"
        f"sys.exit(install_systemd(Path({str(unit_dir)!r}), Path({str(etc_dir)!r}), "
        f"[{str(GPUHEAL)!r}], check_paths=False, publisher_source='nvml', systemd=252, "
        "jetson=False))\n")
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the capabilities that bypass modes")
def test_a_directory_without_write_permission_says_use_sudo(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    os.chown(unit_dir, 65534, 65534)
    unit_dir.chmod(0o755)
    done = _install_in_subprocess(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all"], unit_dir, tmp_path / "etc")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"gpuheal install: cannot write to {unit_dir} (permission denied): "
                           "run it as root, e.g. with sudo\n")
    assert list(unit_dir.iterdir()) == []


def _can_mount_read_only() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as d:
        done = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "ro", "tmpfs", d],
                              capture_output=True, timeout=30, check=False)
        return done.returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(), reason="cannot mount a read-only tmpfs here")
def test_a_read_only_file_system_is_named_as_such(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    done = _install_in_subprocess(
        ["unshare", "-m"], unit_dir, tmp_path / "etc",
        before=[["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(unit_dir)]])
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"gpuheal install: {unit_dir} is on a read-only file system\n"


# --- can the units run the gpuheal command? ----------------------------------------------
@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp (pytest's own tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="gpuheal-install-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def script(path: Path, interpreter: Path) -> Path:
    path.write_text(f"#!{interpreter}\nimport sys\nsys.exit(0)\n")
    path.chmod(0o755)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="lays out root-owned files")
def test_path_checks(open_dir: Path) -> None:
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("no /usr/bin/python3 to point a script at")
    good = script(open_dir / "gpuheal", python)
    assert install.executable_problems([str(good)]) == ([], [])

    private = open_dir / "private"
    private.mkdir(mode=0o700)
    (private / "python").symlink_to(python)
    hidden = script(open_dir / "gpuheal-hidden", private / "python")
    errors, _ = install.executable_problems([str(hidden)])
    assert errors == [f"{private} (above {private / 'python'}) cannot be entered by the units' "
                      "accounts (mode 0700)"]

    theirs = script(open_dir / "gpuheal-theirs", python)
    os.chown(theirs, 1000, 1000)
    errors, warnings = install.executable_problems([str(theirs)])
    assert errors == []
    assert warnings == [f"{theirs} can be changed by its owner (uid 1000), and the healer runs "
                        "gpuheal as root"]

    errors, _ = install.executable_problems([str(open_dir / "missing")])
    assert errors == [f"the gpuheal command {open_dir / 'missing'} is not an executable file"]


def test_an_unusable_command_stops_the_install_with_a_hint(tmp_path: Path,
                                                           open_dir: Path) -> None:
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    exe = script(private / "gpuheal", Path(sys.executable))
    rc, _, err = do_install(tmp_path, executable=[str(exe)], check_paths=True)
    assert rc == 2
    assert err.startswith(f"gpuheal install: the units could not run {exe}: ")
    assert "/opt/gpuheal/bin/pip install gpuheal" in err and len(err.splitlines()) == 1
    assert list((tmp_path / "units").iterdir()) == []


def test_values_that_cannot_go_into_a_unit_are_refused(tmp_path: Path) -> None:
    rc, _, err = do_install(tmp_path, state_dir=Path("/srv/gpuheal"))
    assert rc == 2 and "must be below /var/lib" in err
    rc, _, err = do_install(tmp_path, etc_dir=tmp_path / "my etc")
    assert rc == 2 and "cannot go into a unit as it is" in err
    rc, _, err = do_install(tmp_path, dashboard_port=80)
    assert rc == 2 and "reverse proxy" in err
    rc, _, err = do_install(tmp_path, publisher_source="sim")
    assert rc == 2 and "nvml, nvidia-smi, jetson" in err


# --- shipped with the package -----------------------------------------------------------
def test_installed_example_config_is_the_repository_example() -> None:
    """gpuheal.example.toml (repo root, from scripts/example_config.py) is what install
    writes, and it is valid."""
    assert install.example_config_text() == (REPO / "gpuheal.example.toml").read_text()
    load_config(REPO / "gpuheal.example.toml")  # valid: raises if not


def test_templates_are_package_data() -> None:
    """Every file under gpuheal/data/ matches a package-data glob of pyproject.toml, so a wheel
    carries the templates (setuptools' ``data/*`` does not reach into ``data/systemd/``)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["gpuheal"]
    package = REPO / "gpuheal"
    shipped = {Path(p) for pattern in patterns
               for p in glob(pattern, root_dir=package, recursive=True)
               if (package / p).is_file()}
    needed = {p.relative_to(package) for p in (package / "data" / "systemd").iterdir()}
    assert sorted(map(str, needed - shipped)) == []


# --- the units' command lines run under (most of) their sandbox ----------------------------
PRELUDE = """
import ctypes, os, sys
if sys.argv[1] == "mdwe" and ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def _kernel_mdwe() -> bool:
    """Whether this kernel refuses W+X memory on request (PR_SET_MDWE, Linux 6.3)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(66, 0, 0, 0, 0) >= 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run as the unit would")
@pytest.mark.parametrize("component", ["analyzer", "recorder", "healer", "dashboard"])
def test_exec_start_runs_with_the_units_privileges(tmp_path: Path, broker, prefix: str,
                                                   component: str) -> None:
    """The rendered ExecStart, with the unit's Environment=, runs and reaches the broker with
    no new privileges, only the unit's capability bounding set and, where the unit sets
    MemoryDenyWriteExecute=yes, the kernel refusing writable+executable memory (PR_SET_MDWE:
    the same rule systemd's seccomp filter enforces, minus its ban on mprotect(PROT_EXEC)).
    What needs systemd itself (DynamicUser, namespaces, the syscall filter) is not run here."""
    import importlib.util
    import signal

    from gpuheal.topics import Topics
    from tests.support import Collector, wait_for

    if component == "dashboard" and importlib.util.find_spec("dashboard") is None:
        pytest.skip("the dashboard component is not there yet")
    state_dir = Path("/var/lib/gpuheal-unit-test")
    rc, _, err = do_install(tmp_path, state_dir=state_dir, allow=["reset_gpu"])
    assert rc == 0, err
    text = (tmp_path / "units" / install.unit_name(component)).read_text()
    s = service(text)
    local_state = tmp_path / "state"
    (local_state / "recorder").mkdir(parents=True)
    (local_state / "healer").mkdir()
    argv = [a.replace(str(state_dir), str(local_state)) for a in exec_argv(text)]
    port = _free_port()
    if component == "dashboard":
        argv[argv.index("--port") + 1] = str(port)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for item in s["Environment"]:
        key, _, value = item.partition("=")
        env[key] = value.replace(str(state_dir), str(local_state))
    env.update(GPUHEAL_BROKER=broker.url, GPUHEAL_PREFIX=prefix, GPUHEAL_HOST="unit-test")
    caps = s["CapabilityBoundingSet"][0].split()
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    mdwe = s.get("MemoryDenyWriteExecute") == ["yes"]
    if mdwe and not _kernel_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    cmd = ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all",
           sys.executable, "-c", PRELUDE, "mdwe" if mdwe else "-", *argv]
    status = Topics(prefix).status("unit-test", component)
    with Collector(broker.url, status) as seen:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            if component == "dashboard":
                import socket

                def serving() -> bool:
                    with socket.socket() as c:
                        return c.connect_ex(("127.0.0.1", port)) == 0

                wait_for(lambda: serving() or proc.poll() is not None, 30, "the dashboard")
            else:
                seen.wait(lambda msgs: proc.poll() is not None
                          or any(m.text == "online" for m in msgs), 30, f"{component} online")
            assert proc.poll() is None, proc.communicate()[0][-2000:]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output[-2000:]
    if component == "recorder":
        assert (local_state / "recorder" / "gpuheal.db").is_file()
