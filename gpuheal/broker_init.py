"""`gpuheal broker init DIR`: a locked-down Mosquitto config with one identity per role.

Writes into DIR, from the templates in ``gpuheal/data/mosquitto/``:

* ``mosquitto.conf`` (``secure.conf.tmpl``): a listener on ``host:port`` (127.0.0.1 by
  default), no anonymous access, the password file, the ACL, persistence under ``DIR/data/``,
  a packet size limit, log to stderr, and optionally a TLS listener;
* ``passwd``: random passwords (:mod:`secrets`) hashed by ``mosquitto_passwd -U`` (the plain
  passwords never appear on a command line);
* ``acl`` (``acl.tmpl``): least privilege per identity, topics built from the prefix;
* ``<identity>.env`` per identity (``publisher``, ``analyzer``, ``healer``, ``recorder``,
  ``dashboard``, ``viewer``, ``operator``, ``admin``, plus ``publisher-<host>``/
  ``healer-<host>`` for ``per_host``):
  ``GPUHEAL_BROKER=mqtt://<user>:<password>@host:port`` and the prefixes, mode 0600.

Then ``mosquitto -c DIR/mosquitto.conf`` runs it, or
``gpuheal.broker.start_broker(result.conf_path, result.port, result.log_path)``.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from urllib.parse import quote

from gpuheal.broker import BrokerError, mosquitto_program, read_template
from gpuheal.mqtt import BrokerURL, BrokerURLError
from gpuheal.procs import run_command
from gpuheal.topics import Topics, valid_host
from gpuheal.wire import MAX_PAYLOAD_BYTES

IDENTITIES = ("publisher", "analyzer", "healer", "recorder", "dashboard", "viewer",
              "operator", "admin")
"""The broker users every ``broker init`` writes, one env file each."""
PER_HOST_ROLES = ("publisher", "healer")
"""The roles that get a ``<role>-<host>`` identity per host with ``per_host``."""

PACKET_OVERHEAD_BYTES = 8 * 1024
"""Room above the largest payload for the topic, the fixed header and MQTT v5 properties."""
MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES
PASSWORD_BYTES = 24
"""Entropy of each generated password (bytes; 32 URL-safe characters)."""

CONF_NAME = "mosquitto.conf"
PASSWD_NAME = "passwd"
ACL_NAME = "acl"
DATA_NAME = "data"
LOG_NAME = "mosquitto.log"
MARKER = "written by `gpuheal broker init"
"""Text every generated ``mosquitto.conf`` holds, so a reuse never touches a foreign config."""

_SECTION_RE = re.compile(r"^#@@ (\w+) @@\n", re.MULTILINE)
_TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
_BIND_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BrokerInitError(RuntimeError):
    """The broker directory cannot be written (exists already, bad input, no mosquitto)."""


@dataclass(frozen=True)
class TlsPaths:
    """A TLS listener: PEM files (read by Mosquitto where they are) and where it listens."""

    ca: Path
    """The CA certificate clients verify the server with (``?ca=`` in their URLs)."""
    cert: Path
    """The server certificate (its names must include ``public_host``)."""
    key: Path
    """The server's private key."""
    port: int = 8883
    bind: str = "0.0.0.0"
    """Address the TLS listener binds: all interfaces, since it is the one for other hosts."""
    public_host: str | None = None
    """Host name in the ``mqtts://`` URLs (must match the certificate); default: ``host``."""


@dataclass(frozen=True)
class BrokerInit:
    """What ``init_broker`` wrote, and the URL each identity connects with."""

    dir: Path
    conf_path: Path
    passwd_path: Path
    acl_path: Path
    data_dir: Path
    log_path: Path
    """Where ``gpuheal up`` sends the broker's stderr (``start_broker(..., log_path)``)."""
    port: int
    prefix: str
    discovery_prefix: str
    env_files: dict[str, Path]
    urls: dict[str, str]
    """``mqtt://<identity>:<password>@host:port`` per identity."""
    tls_urls: dict[str, str] = field(default_factory=dict)
    """``mqtts://<identity>:<password>@public_host:tls_port?ca=...`` per identity (with TLS)."""
    run_as: str | None = None
    """The ``user`` line of the config (the account Mosquitto drops to when started as root)."""

    def url(self, identity: str) -> str:
        """The broker URL (with credentials) of ``identity``."""
        try:
            return self.urls[identity]
        except KeyError:
            raise BrokerInitError(
                f"no broker identity {identity!r}; known: {', '.join(self.urls)}"
            ) from None


@dataclass(frozen=True)
class _Settings:
    dir: Path
    port: int
    prefix: str
    discovery_prefix: str
    host: str
    tls: TlsPaths | None
    per_host: tuple[str, ...]
    run_as: str | None

    @property
    def identities(self) -> tuple[str, ...]:
        extra = tuple(f"{role}-{h}" for h in self.per_host for role in PER_HOST_ROLES)
        return IDENTITIES + extra


# --- public API ------------------------------------------------------------------------------
def init_broker(
    dir: Path,
    port: int,
    prefix: str = "gpuheal",
    discovery_prefix: str = "homeassistant",
    host: str = "127.0.0.1",
    tls: TlsPaths | None = None,
    force: bool = False,
    per_host: Sequence[str] = (),
    run_as: str | None = None,
) -> BrokerInit:
    """Write a fresh, locked-down broker config with new random passwords into ``dir``.

    ``port``/``host``: the plain listener (TCP port, bind address). ``tls``: add a TLS
    listener. ``per_host``: also write ``publisher-<h>``/``healer-<h>`` identities that may
    only speak for ``<prefix>/<h>/...``. ``run_as``: the ``user`` line (default: the
    ``mosquitto`` account when run as root and it can reach ``dir``, else ``root``; nothing
    when not root). Refuses to overwrite an existing config unless ``force``.
    """
    settings = _settings(dir, port, prefix, discovery_prefix, host, tls, per_host, run_as)
    existing = _existing_files(settings)
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise BrokerInitError(
            f"{settings.dir} already holds a broker config ({names}); refusing to overwrite it. "
            "Pass --force (force=True) to replace it with new passwords, or use another DIR."
        )
    passwords = {ident: new_password() for ident in settings.identities}
    return _write(settings, passwords, rewrite_passwd=True)


def ensure_broker_dir(
    dir: Path,
    port: int,
    prefix: str = "gpuheal",
    discovery_prefix: str = "homeassistant",
    host: str = "127.0.0.1",
    tls: TlsPaths | None = None,
    per_host: Sequence[str] = (),
    run_as: str | None = None,
) -> BrokerInit:
    """Init ``dir`` once; on later runs reuse it with the same passwords.

    When the port (or prefix, host, TLS...) differs from what ``dir`` holds, only the files
    that depend on it (config, ACL, env files) are rewritten; the passwords stay. An
    identity without an env file gets a new password (and the password file is rewritten).
    """
    settings = _settings(dir, port, prefix, discovery_prefix, host, tls, per_host, run_as)
    conf = settings.dir / CONF_NAME
    if not conf.exists():
        if _existing_files(settings):
            raise BrokerInitError(
                f"{settings.dir} holds broker files but no {CONF_NAME}; "
                "remove them or run `gpuheal broker init --force`"
            )
        return init_broker(
            dir, port, prefix, discovery_prefix, host, tls, per_host=per_host, run_as=run_as
        )
    if MARKER not in conf.read_text(errors="replace"):
        raise BrokerInitError(
            f"{conf} was not written by `gpuheal broker init`; refusing to change it"
        )
    known = {i: _password_from_env(settings.dir / f"{i}.env", i) for i in settings.identities}
    passwords = {i: pw if pw is not None else new_password() for i, pw in known.items()}
    rewrite = None in known.values() or not (settings.dir / PASSWD_NAME).exists()
    return _write(settings, passwords, rewrite_passwd=rewrite)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (``#`` comments, blank lines, ``export``, quotes).

    Raises ``ValueError`` naming the line for anything else.
    """
    result: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY_RE.match(key):
            raise ValueError(f"{path}:{number}: not a KEY=VALUE line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        result[key] = value
    return result


def new_password() -> str:
    """A random URL-safe password (no ``:``/``@``, so it fits a broker URL unquoted)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def render_acl(prefix: str, discovery_prefix: str = "homeassistant",
               per_host: Iterable[str] = ()) -> str:
    """The ACL file text (``gpuheal/data/mosquitto/acl.tmpl``) for this prefix and these hosts."""
    main, sections = _load_template("acl.tmpl")
    block = sections.get("per_host")
    if block is None:
        raise BrokerInitError("acl.tmpl has no `#@@ per_host @@` section")
    hosts = "".join(
        "\n" + Template(block).substitute(prefix=prefix, host=h) for h in per_host
    )
    return Template(main).substitute(prefix=prefix, discovery=discovery_prefix, per_host=hosts)


def render_config(settings_dir: Path, port: int, host: str = "127.0.0.1",
                  tls: TlsPaths | None = None, run_as: str | None = None) -> str:
    """The ``mosquitto.conf`` text (``secure.conf.tmpl``) for a broker dir."""
    main, sections = _load_template("secure.conf.tmpl")
    tls_text = ""
    if tls is not None:
        block = sections.get("tls_listener")
        if block is None:
            raise BrokerInitError("secure.conf.tmpl has no `#@@ tls_listener @@` section")
        tls_text = "\n" + Template(block).substitute(
            tls_port=tls.port,
            tls_bind=tls.bind,
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
        )
    run_as_line = (
        f"user {run_as}" if run_as
        else "# user: not set (Mosquitto keeps the account of whoever starts it)"
    )
    return Template(main).substitute(
        conf_path=settings_dir / CONF_NAME,
        port=port,
        bind=host,
        passwd_path=settings_dir / PASSWD_NAME,
        acl_path=settings_dir / ACL_NAME,
        run_as_line=run_as_line,
        data_dir=settings_dir / DATA_NAME,
        max_payload=MAX_PAYLOAD_BYTES,
        max_packet_size=MAX_PACKET_BYTES,
        tls_listener=tls_text,
    )


# --- validation ------------------------------------------------------------------------------
def _settings(
    dir: Path,
    port: int,
    prefix: str,
    discovery_prefix: str,
    host: str,
    tls: TlsPaths | None,
    per_host: Sequence[str],
    run_as: str | None,
) -> _Settings:
    directory = Path(dir).expanduser().resolve()
    _check_port(port, "port")
    for name, value in (("prefix", prefix), ("discovery prefix", discovery_prefix)):
        if not _TOPIC_PREFIX_RE.match(value or ""):
            raise BrokerInitError(
                f"invalid {name} {value!r}: topic levels of [A-Za-z0-9_-] separated by '/'"
            )
    Topics(prefix, discovery_prefix)  # the contract's own check as well
    if not _BIND_RE.match(host or ""):
        raise BrokerInitError(f"invalid listener address {host!r}")
    hosts = tuple(dict.fromkeys(per_host))
    for h in hosts:
        if not valid_host(h):
            raise BrokerInitError(f"invalid host name {h!r}: must match [A-Za-z0-9_-]+")
    if run_as is not None and not re.match(r"^[a-z_][a-z0-9_-]*\$?$", run_as):
        raise BrokerInitError(f"invalid account name for `user`: {run_as!r}")
    _check_path(directory, "broker directory")
    if tls is not None:
        tls = _checked_tls(tls)
    account = _choose_run_as(directory, run_as)
    owner = _owner_ids(account)
    if tls is not None and owner is not None:
        # Mosquitto 2.0 loads the certificates after dropping to `account`.
        for path in (tls.ca, tls.cert, tls.key):
            if not _readable(path, *owner):
                raise BrokerInitError(
                    f"{path} is not readable by the account {account!r} Mosquitto runs as; "
                    f"e.g. `chgrp {account} {path} && chmod g+r {path}`"
                )
    return _Settings(directory, port, prefix, discovery_prefix, host, tls, hosts, account)


def _check_port(port: int, what: str) -> None:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise BrokerInitError(f"invalid {what} {port!r}: 1..65535")


def _check_path(path: Path, what: str) -> None:
    if any(c.isspace() for c in str(path)):
        raise BrokerInitError(
            f"{what} {str(path)!r} contains whitespace, which a Mosquitto config cannot hold"
        )


def _checked_tls(tls: TlsPaths) -> TlsPaths:
    _check_port(tls.port, "TLS port")
    if not _BIND_RE.match(tls.bind or ""):
        raise BrokerInitError(f"invalid TLS listener address {tls.bind!r}")
    if tls.public_host is not None and not _BIND_RE.match(tls.public_host):
        raise BrokerInitError(f"invalid TLS public host {tls.public_host!r}")
    files = {}
    for name in ("ca", "cert", "key"):
        path = Path(getattr(tls, name)).expanduser().resolve()
        _check_path(path, f"TLS {name}")
        if not path.is_file():
            raise BrokerInitError(f"TLS {name} not found: {path}")
        files[name] = path
    return TlsPaths(port=tls.port, bind=tls.bind, public_host=tls.public_host, **files)


def _choose_run_as(directory: Path, run_as: str | None) -> str | None:
    """The account Mosquitto should drop to; see ``init_broker``."""
    if run_as is not None:
        return run_as
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        return "root"
    if _reachable(directory, account.pw_uid, account.pw_gid):
        return "mosquitto"
    return "root"


def _readable(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` can read the file ``path`` (permission bits only)."""
    st = path.stat()
    allowed = (
        st.st_mode & stat.S_IROTH
        or (st.st_uid == uid and st.st_mode & stat.S_IRUSR)
        or (st.st_gid == gid and st.st_mode & stat.S_IRGRP)
    )
    return bool(allowed) and _reachable(path.parent, uid, gid)


def _reachable(directory: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` can traverse every existing directory above ``directory``."""
    for parent in [directory, *directory.parents]:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid == uid and st.st_mode & stat.S_IXUSR:
            continue
        if st.st_gid == gid and st.st_mode & stat.S_IXGRP:
            continue
        return False
    return True


# --- writing ---------------------------------------------------------------------------------
def _existing_files(settings: _Settings) -> list[Path]:
    names = [CONF_NAME, PASSWD_NAME, ACL_NAME, *(f"{i}.env" for i in settings.identities)]
    return [settings.dir / n for n in names if (settings.dir / n).exists()]


def _client_host(bind: str) -> str:
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "*") else bind
    return f"[{host}]" if ":" in host else host


def _write(settings: _Settings, passwords: dict[str, str], rewrite_passwd: bool) -> BrokerInit:
    d = settings.dir
    d.mkdir(parents=True, exist_ok=True)
    data = d / DATA_NAME
    data.mkdir(exist_ok=True)
    data.chmod(0o700)
    owner = _owner_ids(settings.run_as)

    host = _client_host(settings.host)
    urls = {
        i: f"mqtt://{i}:{quote(pw, safe='')}@{host}:{settings.port}"
        for i, pw in passwords.items()
    }
    tls_urls: dict[str, str] = {}
    if settings.tls is not None:
        tls_host = settings.tls.public_host or host
        ca = quote(str(settings.tls.ca), safe="/")
        tls_urls = {
            i: f"mqtts://{i}:{quote(pw, safe='')}@{tls_host}:{settings.tls.port}?ca={ca}"
            for i, pw in passwords.items()
        }

    _write_if_changed(
        d / CONF_NAME,
        render_config(d, settings.port, settings.host, settings.tls, settings.run_as),
        0o644,
    )
    _write_if_changed(
        d / ACL_NAME,
        render_acl(settings.prefix, settings.discovery_prefix, settings.per_host),
        0o600,
        owner,
    )
    if rewrite_passwd:
        _write_passwd(d / PASSWD_NAME, passwords, owner)
    env_files: dict[str, Path] = {}
    for ident in settings.identities:
        env_files[ident] = d / f"{ident}.env"
        _write_if_changed(env_files[ident], _render_env(ident, urls[ident], tls_urls.get(ident),
                                                        settings), 0o600)
    if owner is not None:
        _chown_tree(data, owner)
    return BrokerInit(
        dir=d,
        conf_path=d / CONF_NAME,
        passwd_path=d / PASSWD_NAME,
        acl_path=d / ACL_NAME,
        data_dir=data,
        log_path=d / LOG_NAME,
        port=settings.port,
        prefix=settings.prefix,
        discovery_prefix=settings.discovery_prefix,
        env_files=env_files,
        urls=urls,
        tls_urls=tls_urls,
        run_as=settings.run_as,
    )


def _render_env(ident: str, url: str, tls_url: str | None, settings: _Settings) -> str:
    """``KEY=VALUE`` lines only (no comment), so that each of ``env $(cat FILE) gpuheal ...``,
    ``gpuheal ... --env-file FILE``, systemd's ``EnvironmentFile=`` and ``set -a; . FILE``
    reads it. ``GPUHEAL_BROKER_TLS`` is the same identity over TLS, for other machines."""
    lines = [
        f"GPUHEAL_BROKER={url}",
        f"GPUHEAL_PREFIX={settings.prefix}",
        f"GPUHEAL_DISCOVERY_PREFIX={settings.discovery_prefix}",
    ]
    if tls_url is not None:
        lines.append(f"GPUHEAL_BROKER_TLS={tls_url}")
    return "\n".join(lines) + "\n"


def _password_from_env(path: Path, ident: str) -> str | None:
    """The password ``ident`` has in its env file, or None when there is no usable one."""
    if not path.is_file():
        return None
    try:
        url = BrokerURL.parse(read_env_file(path).get("GPUHEAL_BROKER", ""))
    except (ValueError, BrokerURLError):
        return None
    if url.username != ident or not url.password:
        return None
    return url.password


def _write_passwd(path: Path, passwords: dict[str, str], owner: tuple[int, int] | None) -> None:
    """Hash the passwords with ``mosquitto_passwd -U`` on a 0600 plain file, then move it."""
    try:
        exe = mosquitto_program("mosquitto_passwd")
    except BrokerError as exc:
        raise BrokerInitError(str(exc)) from None
    plain = path.with_name(f".{path.name}.plain")
    plain.unlink(missing_ok=True)
    try:
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{user}:{pw}\n" for user, pw in passwords.items())
        done = run_command([exe, "-U", str(plain)], timeout_s=60)
        if not done.ok:
            raise BrokerInitError(f"mosquitto_passwd -U failed: {done.summary()}")
        if owner is not None:
            os.chown(plain, *owner)
        os.replace(plain, path)
    finally:
        plain.unlink(missing_ok=True)


def _write_if_changed(path: Path, text: str, mode: int,
                      owner: tuple[int, int] | None = None) -> None:
    """Write ``text`` atomically with ``mode`` (and owner) unless the file already holds it."""
    if path.is_file() and path.read_text() == text:
        path.chmod(mode)
        if owner is not None:
            os.chown(path, *owner)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _owner_ids(run_as: str | None) -> tuple[int, int] | None:
    """uid/gid the broker-side files must belong to: the ``user`` Mosquitto drops to."""
    if run_as is None or run_as == "root" or os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(run_as)
    except KeyError:
        raise BrokerInitError(f"account {run_as!r} (the `user` of the config) does not exist")\
            from None
    return account.pw_uid, account.pw_gid


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    os.chown(root, *owner)
    for sub in root.rglob("*"):
        os.chown(sub, *owner, follow_symlinks=False)


def _load_template(name: str) -> tuple[str, dict[str, str]]:
    """A template's main text and its ``#@@ name @@`` sections (each to the next marker)."""
    try:
        text = read_template(name)
    except BrokerError as exc:
        raise BrokerInitError(str(exc)) from None
    pieces = _SECTION_RE.split(text)
    return pieces[0], dict(zip(pieces[1::2], pieces[2::2], strict=True))
