"""The locked-down broker of ``gpuheal broker init``, tested against a real Mosquitto.

One broker (started from ``init_broker`` output) serves the module; each test uses its own
host name, so tests never see each other's messages. "Sees nothing" is proven with a
sentinel: the forbidden publish and then an allowed one go out on the SAME connection, the
allowed one is acknowledged (QoS 1), so the broker has handled the forbidden one first; once
the observer has the sentinel, the forbidden message can no longer arrive.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gpuheal.broker import PrivateBroker, free_port, port_answers, start_broker
from gpuheal.broker_init import (
    IDENTITIES,
    MAX_PACKET_BYTES,
    BrokerInit,
    BrokerInitError,
    TlsPaths,
    ensure_broker_dir,
    init_broker,
    read_env_file,
)
from gpuheal.mqtt import BrokerURL, Bus
from gpuheal.topics import Topics
from gpuheal.wire import MAX_PAYLOAD_BYTES
from tests.support import Collector, Received, Speaker, wait_for

PREFIX = "sec"
T = Topics(PREFIX)
HA = "homeassistant"
PER_HOST = "rack1"


# --- fixtures and helpers ------------------------------------------------------------------
@dataclass
class Secure:
    init: BrokerInit
    broker: PrivateBroker

    def url(self, identity: str) -> str:
        return self.init.urls[identity]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    """A real Mosquitto started from ``init_broker`` output (never port 1883)."""
    port = free_port()
    init = init_broker(tmp_path_factory.mktemp("secure") / "broker", port, prefix=PREFIX,
                       per_host=[PER_HOST])
    broker = start_broker(init.conf_path, port, init.log_path)
    assert broker.port != 1883
    yield Secure(init, broker)
    broker.stop()


@pytest.fixture
def host() -> str:
    """A host name of the test's own, so tests on the shared broker never see each other."""
    return f"h{uuid.uuid4().hex[:10]}"


def connect_reason(url: str, protocol: int = paho.MQTTv5, timeout_s: float = 5.0) -> Any:
    """The CONNACK reason code a plain paho client gets for ``url``'s credentials."""
    broker = BrokerURL.parse(url)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=protocol)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    got: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(_c, _u, _f, reason_code, _p) -> None:
        got["rc"] = reason_code
        done.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert done.wait(timeout_s), "no CONNACK"
        return got["rc"]
    finally:
        client.disconnect()
        client.loop_stop()


def token() -> str:
    return uuid.uuid4().hex


def has(payload: str) -> Any:
    return lambda msgs: any(m.text == payload for m in msgs)


def texts(msgs: list[Received]) -> set[str]:
    return {m.text for m in msgs}


# --- who may log in ------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311], ids=["v5", "v311"])
def test_anonymous_clients_are_refused(secure: Secure, protocol: int) -> None:
    rc = connect_reason(f"mqtt://127.0.0.1:{secure.init.port}", protocol)
    assert rc.is_failure
    assert rc.getName() in ("Not authorized", "Bad user name or password")


@pytest.mark.parametrize("who", ["wrong password", "other identity's password", "no password",
                                 "unknown user"])
def test_wrong_credentials_are_refused(secure: Secure, who: str) -> None:
    port = secure.init.port
    healer_pw = BrokerURL.parse(secure.url("healer")).password
    url = {
        "wrong password": f"mqtt://healer:not-the-password@127.0.0.1:{port}",
        "other identity's password":
            f"mqtt://healer:{BrokerURL.parse(secure.url('viewer')).password}@127.0.0.1:{port}",
        "no password": f"mqtt://healer@127.0.0.1:{port}",
        "unknown user": f"mqtt://root:{healer_pw}@127.0.0.1:{port}",
    }[who]
    assert connect_reason(url).is_failure


@pytest.mark.parametrize("identity", IDENTITIES)
def test_every_identity_logs_in_with_its_env_file(secure: Secure, identity: str) -> None:
    env = read_env_file(secure.init.env_files[identity])
    assert env["GPUHEAL_BROKER"] == secure.url(identity)
    assert env["GPUHEAL_PREFIX"] == PREFIX
    assert env["GPUHEAL_DISCOVERY_PREFIX"] == HA
    url = BrokerURL.parse(env["GPUHEAL_BROKER"])
    assert (url.username, url.host, url.port) == (identity, "127.0.0.1", secure.init.port)
    assert not connect_reason(env["GPUHEAL_BROKER"]).is_failure


def test_secrets_are_private_and_hashed(secure: Secure) -> None:
    init = secure.init
    for path in [init.passwd_path, init.acl_path, *init.env_files.values()]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    hashed = init.passwd_path.read_text()
    for identity in IDENTITIES:
        password = BrokerURL.parse(secure.url(identity)).password
        assert password and len(password) >= 32
        assert password not in hashed
        assert f"{identity}:$7$" in hashed  # PBKDF2-SHA512 by mosquitto_passwd
    conf = init.conf_path.read_text()
    assert "allow_anonymous false" in conf
    assert f"listener {init.port} 127.0.0.1" in conf
    assert f"max_packet_size {MAX_PACKET_BYTES}" in conf
    assert MAX_PACKET_BYTES > MAX_PAYLOAD_BYTES


# --- each identity can do its job (the ACL is not "deny all") --------------------------------
def test_components_announce_status_and_dead_letters_with_their_identity(
    secure: Secure, host: str
) -> None:
    with Collector(secure.url("recorder"), T.everything()) as seen:
        for component in ("publisher", "analyzer", "healer", "recorder"):
            bus = Bus(secure.url(component), component, host, T)
            try:
                assert bus.start(wait_s=5), bus.last_connect_error
                seen.wait(lambda m, c=component: any(
                    x.topic == T.status(host, c) and x.text == "online" for x in m),
                    5, f"{component} online")
                bus.deadletter(T.sample(host, 0), b"{not json", f"invalid: {host}")
                seen.wait(lambda m, c=component: any(
                    x.topic == T.deadletter(c) and host in x.text for x in m),
                    5, f"{component} dead letter")
            finally:
                bus.stop()
            seen.wait(lambda m, c=component: any(
                x.topic == T.status(host, c) and x.text == "offline" for x in m),
                5, f"{component} offline")


# (writer, topic builder, reader, topic filter of the reader)
ALLOWED = [
    ("publisher", lambda h: T.sample(h, 0), "analyzer", lambda h: T.gpu_pattern("sample")),
    ("publisher", lambda h: T.sample(h, 0), "recorder", lambda h: T.everything()),
    ("healer", lambda h: T.sim(h, 0), "publisher", lambda h: T.gpu_pattern("sim")),
    ("analyzer", lambda h: T.state(h, 0), "healer", lambda h: T.gpu_pattern("state")),
    ("analyzer", lambda h: T.event(h, 0), "healer", lambda h: T.gpu_pattern("event")),
    ("analyzer", lambda h: T.state(h, 0), "viewer", lambda h: T.everything()),
    ("analyzer", lambda h: T.ha_config("sensor", f"{h}_gpu0_temp"), "viewer",
     lambda h: f"{HA}/#"),
    ("viewer", lambda h: T.ha_status(), "analyzer", lambda h: T.ha_status()),
    ("operator", lambda h: T.ha_status(), "analyzer", lambda h: T.ha_status()),
    ("analyzer", lambda h: T.ha_config("switch", f"{h}_healer"), "operator",
     lambda h: f"{HA}/#"),
    ("healer", lambda h: T.action(h, 0), "recorder", lambda h: T.everything()),
    ("healer", lambda h: T.action(h, 0), "operator", lambda h: T.everything()),
    ("healer", lambda h: T.healer_state(h), "healer", lambda h: T.healer_state_pattern()),
    ("operator", lambda h: T.healer_set(h), "healer", lambda h: T.healer_set_pattern()),
    ("recorder", lambda h: T.status(h, "recorder"), "viewer", lambda h: T.everything()),
    ("analyzer", lambda h: T.state(h, 0), "dashboard",
     lambda h: T.everything()),
    ("healer", lambda h: T.action(h, 0), "analyzer", lambda h: T.gpu_pattern("action")),
    ("publisher", lambda h: T.status(h, "publisher"), "analyzer",
     lambda h: T.status_pattern(None, "publisher")),
    ("dashboard", lambda h: T.healer_set(h), "healer", lambda h: T.healer_set_pattern()),
    ("admin", lambda h: T.state(h, 0), "viewer", lambda h: T.everything()),
    (f"publisher-{PER_HOST}", lambda h: T.sample(PER_HOST, 7), "analyzer",
     lambda h: T.gpu_pattern("sample")),
    (f"healer-{PER_HOST}", lambda h: T.action(PER_HOST, 7), "recorder",
     lambda h: T.everything()),
]


@pytest.mark.parametrize(
    ("writer", "topic_of", "reader", "filter_of"), ALLOWED,
    ids=[f"{w}->{r}-{i}" for i, (w, _t, r, _f) in enumerate(ALLOWED)],
)
def test_each_identity_reaches_who_it_serves(secure: Secure, host: str, writer: str,
                                             topic_of: Any, reader: str, filter_of: Any) -> None:
    topic = topic_of(host)
    mark = f"allowed-{token()}"
    with Collector(secure.url(reader), filter_of(host)) as seen:
        speaker = Speaker(secure.url(writer))
        try:
            rc = speaker.send(topic, mark)
        finally:
            speaker.close()
        assert not rc.is_failure, f"{writer} may not publish {topic}: {rc}"
        seen.wait(has(mark), 5, f"{reader} receiving {writer}'s {topic}")


@pytest.mark.parametrize("writer", ["operator", "dashboard", "viewer"])
def test_only_the_analyzer_and_admin_write_states(secure: Secure, host: str,
                                                   writer: str) -> None:
    """``status --forget`` needs the admin identity: the operator and the dashboard may
    command the healer, not rewrite (or delete) what a GPU's health says."""
    speaker = Speaker(secure.url(writer))
    try:
        rc = speaker.send(T.state(host, 0), b"", retain=True)
    finally:
        speaker.close()
    assert rc.getName() == "Not authorized", rc


def test_healer_reads_back_its_own_retained_state(secure: Secure, host: str) -> None:
    mark = f'{{"enabled": true, "mark": "{token()}"}}'
    speaker = Speaker(secure.url("healer"))
    try:
        assert not speaker.send(T.healer_state(host), mark, retain=True).is_failure
    finally:
        speaker.close()
    with Collector(secure.url("healer"), T.healer_state(host)) as seen:
        got = seen.wait(lambda m: [x for x in m if x.text == mark], 5, "retained healer state")
        assert got[0].retain


# --- what each identity may NOT do -----------------------------------------------------------
def test_publisher_cannot_deliver_an_event_or_an_action(secure: Secure, host: str) -> None:
    """The core attack: a (compromised) publisher forging work for the healer."""
    observers = [Collector(secure.url("recorder"), T.everything()).start(),
                 Collector(secure.url("healer"), [T.gpu_pattern("event"),
                                                  T.healer_set_pattern()]).start()]
    try:
        speaker = Speaker(secure.url("publisher"))
        try:
            marks = []
            for topic in (T.event(host, 0), T.action(host, 0), T.healer_set(host)):
                for qos in (0, 1):
                    marks.append(f"forged-{token()}")
                    rc = speaker.send(topic, marks[-1], qos=qos)
                    if qos == 1:
                        assert rc.getName() == "Not authorized"
            sample = f"sample-{token()}"
            assert not speaker.send(T.sample(host, 0), sample).is_failure
        finally:
            speaker.close()
        recorder, healer = observers
        recorder.wait(has(sample), 5, "the publisher's sample at the recorder")
        # The healer does not subscribe to samples: its sentinel is an allowed event.
        sentinel = f"event-{token()}"
        analyzer = Speaker(secure.url("analyzer"))
        try:
            assert not analyzer.send(T.event(host, 0), sentinel).is_failure
        finally:
            analyzer.close()
        healer.wait(has(sentinel), 5, "the analyzer's event at the healer")
        for seen in observers:
            assert not texts(seen.snapshot()) & set(marks)
    finally:
        for seen in observers:
            seen.stop()


def test_viewer_cannot_write_healer_set_but_operator_can(secure: Secure, host: str) -> None:
    with Collector(secure.url("healer"), T.healer_set_pattern()) as healer:
        viewer = Speaker(secure.url("viewer"))
        try:
            forged = [f"viewer-{token()}", f"viewer-{token()}"]
            viewer.send(T.healer_set(host), forged[0], qos=0)
            assert viewer.send(T.healer_set(host), forged[1], qos=1).is_failure
        finally:
            viewer.close()
        # Published after the viewer's attempts were acknowledged: the operator's command.
        command = f'{{"enabled": false, "mark": "{token()}"}}'
        operator = Speaker(secure.url("operator"))
        try:
            assert not operator.send(T.healer_set(host), command).is_failure
        finally:
            operator.close()
        healer.wait(has(command), 5, "the operator's healer/set at the healer")
        assert not texts(healer.snapshot()) & set(forged)


# writer -> [(forbidden topic, retained)], the writer's own allowed sentinel topic
FORBIDDEN: dict[str, tuple[list[Any], Any]] = {
    "publisher": (
        [lambda h: (T.event(h, 0), False), lambda h: (T.action(h, 0), False),
         lambda h: (T.state(h, 0), True), lambda h: (T.sim(h, 0), False),
         lambda h: (T.healer_set(h), False), lambda h: (T.healer_state(h), True),
         lambda h: (T.status(h, "healer"), True), lambda h: (T.deadletter("healer"), False),
         lambda h: (T.ha_config("switch", f"{h}_healer"), True)],
        lambda h: T.sample(h, 0)),
    "analyzer": (
        [lambda h: (T.action(h, 0), False), lambda h: (T.sim(h, 0), False),
         lambda h: (T.sample(h, 0), False), lambda h: (T.healer_set(h), False),
         lambda h: (T.healer_state(h), True), lambda h: (T.status(h, "recorder"), True)],
        lambda h: T.event(h, 0)),
    "healer": (
        [lambda h: (T.event(h, 0), False), lambda h: (T.state(h, 0), True),
         lambda h: (T.sample(h, 0), False), lambda h: (T.healer_set(h), False),
         lambda h: (T.ha_config("switch", f"{h}_healer"), True)],
        lambda h: T.action(h, 0)),
    "recorder": (
        [lambda h: (T.sample(h, 0), False), lambda h: (T.event(h, 0), False),
         lambda h: (T.action(h, 0), False), lambda h: (T.healer_set(h), False),
         lambda h: (T.state(h, 0), True)],
        lambda h: T.status(h, "recorder")),
    "viewer": (
        [lambda h: (T.healer_set(h), False), lambda h: (T.sample(h, 0), False),
         lambda h: (T.event(h, 0), False), lambda h: (T.action(h, 0), False),
         lambda h: (T.state(h, 0), True), lambda h: (T.healer_state(h), True),
         lambda h: (T.ha_config("sensor", f"{h}_x"), True)],
        lambda h: T.ha_status()),
    "operator": (
        [lambda h: (T.event(h, 0), False), lambda h: (T.action(h, 0), False),
         lambda h: (T.sample(h, 0), False), lambda h: (T.healer_state(h), True),
         lambda h: (T.sim(h, 0), False), lambda h: (T.state(h, 0), True),
         lambda h: (T.ha_config("switch", f"{h}_healer"), True)],
        lambda h: T.healer_set(h)),
    # per-host identities may only speak for their own host
    f"publisher-{PER_HOST}": (
        [lambda h: (T.sample(h, 0), False), lambda h: (T.status(h, "publisher"), True),
         lambda h: (T.event(PER_HOST, 0), False)],
        lambda h: T.sample(PER_HOST, 0)),
    f"healer-{PER_HOST}": (
        [lambda h: (T.action(h, 0), False), lambda h: (T.sim(h, 0), False),
         lambda h: (T.healer_state(h), True)],
        lambda h: T.action(PER_HOST, 0)),
}


@pytest.mark.parametrize("writer", list(FORBIDDEN))
def test_identity_cannot_publish_outside_its_role(secure: Secure, host: str,
                                                  writer: str) -> None:
    forbidden, sentinel = FORBIDDEN[writer]
    observer_host = PER_HOST if writer.endswith(PER_HOST) else host
    # The per-host sentinel lands under PER_HOST; watch both hosts with a recorder-like
    # viewer subscription so neither the forbidden nor the sentinel can be missed.
    with Collector(secure.url("viewer"),
                   [f"{PREFIX}/{host}/#", f"{PREFIX}/{observer_host}/#",
                    T.deadletter_pattern(), f"{HA}/#"]) as seen:
        speaker = Speaker(secure.url(writer))
        marks = []
        try:
            for make in forbidden:
                topic, retain = make(host)
                for qos in (0, 1):
                    marks.append(f"forbidden-{token()}")
                    rc = speaker.send(topic, marks[-1], qos=qos, retain=retain)
                    if qos == 1:
                        assert rc.is_failure, f"{writer} was allowed to publish {topic}"
            mark = f"sentinel-{token()}"
            assert not speaker.send(sentinel(host), mark).is_failure
        finally:
            speaker.close()
        seen.wait(has(mark), 5, f"{writer}'s sentinel")
        assert not texts(seen.snapshot()) & set(marks)
    # Nothing forbidden was kept as a retained message either.
    with Collector(secure.url("viewer"), [f"{PREFIX}/{host}/#", f"{HA}/#"]) as late:
        probe = f"retained-{token()}"
        speaker = Speaker(secure.url("recorder"))
        try:
            speaker.send(T.status(host, "recorder"), probe, retain=True)
        finally:
            speaker.close()
        late.wait(has(probe), 5, "the retained probe")
        assert not texts(late.snapshot()) & set(marks)


def test_publisher_cannot_read_events_or_operator_commands(secure: Secure, host: str) -> None:
    with Collector(secure.url("publisher"), [T.everything(), T.gpu_pattern("sim")]) as pub:
        analyzer, operator, healer = (Speaker(secure.url(i))
                                      for i in ("analyzer", "operator", "healer"))
        try:
            secret = [f"hidden-{token()}", f"hidden-{token()}"]
            analyzer.send(T.event(host, 0), secret[0])
            operator.send(T.healer_set(host), secret[1])
            command = f"sim-{token()}"
            healer.send(T.sim(host, 0), command)
        finally:
            for s in (analyzer, operator, healer):
                s.close()
        pub.wait(has(command), 5, "the sim command at the publisher")
        assert not texts(pub.snapshot()) & set(secret)


def test_oversized_packet_never_reaches_anyone(secure: Secure, host: str) -> None:
    with Collector(secure.url("recorder"), T.gpu_pattern("sample", host)) as seen:
        big = Speaker(secure.url("publisher"))
        try:
            big.client.publish(T.sample(host, 0), b"x" * (MAX_PACKET_BYTES + 1), qos=0)
            assert big.dropped.wait(5), "the broker kept a sender of an oversized packet"
        finally:
            big.close()
        fits = Speaker(secure.url("publisher"))
        try:
            largest = b"y" * MAX_PAYLOAD_BYTES
            assert not fits.send(T.sample(host, 1), largest).is_failure
        finally:
            fits.close()
        got = seen.wait(lambda m: [x for x in m if x.topic == T.sample(host, 1)], 5,
                        "the largest allowed payload")
        assert len(got[0].payload) == MAX_PAYLOAD_BYTES
        assert not seen.on("/gpu/0/sample")


# --- init, refuse, reuse ---------------------------------------------------------------------
def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = init_broker(tmp_path / "b", free_port())
    with pytest.raises(BrokerInitError, match="--force"):
        init_broker(tmp_path / "b", free_port())
    assert read_env_file(first.env_files["healer"])["GPUHEAL_BROKER"] == first.url("healer")
    second = init_broker(tmp_path / "b", first.port, force=True)
    for identity in IDENTITIES:
        assert second.url(identity) != first.url(identity)
        assert read_env_file(second.env_files[identity])["GPUHEAL_BROKER"] == \
            second.url(identity)


def test_ensure_reuses_passwords_and_follows_the_port(tmp_path: Path) -> None:
    d = tmp_path / "b"
    first = ensure_broker_dir(d, free_port())
    hashed = first.passwd_path.read_text()
    again = ensure_broker_dir(d, first.port)
    assert again.urls == first.urls
    assert again.passwd_path.read_text() == hashed
    port = free_port()
    moved = ensure_broker_dir(d, port)
    assert moved.passwd_path.read_text() == hashed
    assert f"listener {port} 127.0.0.1" in moved.conf_path.read_text()
    for identity in IDENTITIES:
        old, new = BrokerURL.parse(first.url(identity)), BrokerURL.parse(moved.url(identity))
        assert (new.username, new.password, new.port) == (old.username, old.password, port)
    broker = start_broker(moved.conf_path, port, moved.log_path)
    try:
        assert not connect_reason(read_env_file(moved.env_files["healer"])["GPUHEAL_BROKER"]
                                  ).is_failure
        assert connect_reason(f"mqtt://127.0.0.1:{port}").is_failure
    finally:
        broker.stop()
    grown = ensure_broker_dir(d, port, per_host=["n1"])
    assert {i: grown.urls[i] for i in IDENTITIES} == moved.urls
    assert {"publisher-n1", "healer-n1"} <= set(grown.env_files)
    assert "publisher-n1:$7$" in grown.passwd_path.read_text()
    assert "user healer-n1" in grown.acl_path.read_text()


def test_ensure_refuses_a_foreign_config(tmp_path: Path) -> None:
    (tmp_path / "mosquitto.conf").write_text("listener 1883\nallow_anonymous true\n")
    with pytest.raises(BrokerInitError, match="not written by"):
        ensure_broker_dir(tmp_path, free_port())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"prefix": "a/#"}, "invalid prefix"),
    ({"prefix": "gpuheal\nuser x"}, "invalid prefix"),
    ({"discovery_prefix": "ha\ntopic readwrite #"}, "invalid discovery prefix"),
    ({"per_host": ["bad host"]}, "invalid host name"),
    ({"port": 0}, "invalid port"),
    ({"host": "127.0.0.1\nallow_anonymous true"}, "invalid listener address"),
])
def test_init_rejects_input_that_could_inject_config(tmp_path: Path, kwargs: dict[str, Any],
                                                     match: str) -> None:
    args: dict[str, Any] = {"dir": tmp_path / "b", "port": 18999, **kwargs}
    with pytest.raises(BrokerInitError, match=match):
        init_broker(**args)
    assert not (tmp_path / "b").exists()


def test_read_env_file_formats_and_errors(tmp_path: Path) -> None:
    env = tmp_path / "x.env"
    env.write_text("# comment\n\nexport A=1\nB = 'two words'\nC=\"q\"\nD=a=b\n")
    assert read_env_file(env) == {"A": "1", "B": "two words", "C": "q", "D": "a=b"}
    env.write_text("A=1\nnot a line\n")
    with pytest.raises(ValueError, match=r"x\.env:2"):
        read_env_file(env)


# --- TLS -------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    assert exe is not None
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca_and_server_cert(d: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1 signed by it."""
    d.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", f"/CN={name}-ca", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf",
             cwd=d)
    return d / "ca.crt", d / "server.crt", d / "server.key"


def test_tls_listener_with_mqtts_urls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    ca, cert, key = _make_ca_and_server_cert(tmp_path / "pki", "gpuheal-test")
    other_ca, _c, _k = _make_ca_and_server_cert(tmp_path / "other", "stranger")
    port, tls_port = free_port(), free_port()
    init = init_broker(tmp_path / "b", port, prefix=PREFIX,
                       tls=TlsPaths(ca, cert, key, port=tls_port, bind="127.0.0.1",
                                    public_host="localhost"))
    url = init.tls_urls["recorder"]
    assert url.startswith("mqtts://recorder:") and f"@localhost:{tls_port}?ca=" in url
    assert read_env_file(init.env_files["recorder"])["GPUHEAL_BROKER_TLS"] == url
    broker = start_broker(init.conf_path, port, init.log_path)
    try:
        wait_for(lambda: port_answers("127.0.0.1", tls_port), 5, "the TLS listener")
        bus = Bus(url, "recorder", "tlshost", T)
        try:
            assert bus.start(wait_s=10), bus.last_connect_error
            assert bus.broker.tls
        finally:
            bus.stop()
        # A client that trusts another CA does not connect; nor does one without a password.
        stranger = Bus(url.replace(str(ca), str(other_ca)), "recorder", "tlshost", T)
        try:
            stranger.start()
            wait_for(lambda: stranger.stats.connect_failures > 0, 10, "the TLS handshake failing")
            assert not stranger.connected
        finally:
            stranger.stop()
        anonymous = Bus(f"mqtts://localhost:{tls_port}?ca={ca}", "recorder", "tlshost", T)
        try:
            anonymous.start()
            wait_for(lambda: anonymous.stats.connect_failures > 0, 10, "anonymous refused")
            assert anonymous.last_connect_error == (f"broker localhost:{tls_port} rejected an "
                                                    "anonymous login (Not authorized)")
            assert anonymous.auth_failed
        finally:
            anonymous.stop()
    finally:
        broker.stop()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """As root: a directory the ``mosquitto`` account can reach (like ``/etc/gpuheal``)."""
    if os.geteuid() != 0:
        pytest.skip("only meaningful when run as root")
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no `mosquitto` account on this machine")
    top = Path(tempfile.mkdtemp(prefix="gpuheal-broker-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top)


def test_root_init_lets_mosquitto_drop_privileges(reachable_dir: Path, tmp_path: Path) -> None:
    """Run as root, Mosquitto drops to the ``mosquitto`` account: it must still read its files."""
    account = pwd.getpwnam("mosquitto")
    port = free_port()
    init = init_broker(reachable_dir / "b", port)
    assert init.run_as == "mosquitto"
    assert "\nuser mosquitto\n" in init.conf_path.read_text()
    for path in (init.passwd_path, init.acl_path, init.data_dir):
        assert path.stat().st_uid == account.pw_uid
    for env in init.env_files.values():
        assert env.stat().st_uid == 0 and env.stat().st_mode & 0o077 == 0
    broker = start_broker(init.conf_path, port, tmp_path / "mosquitto.log")
    try:
        assert not connect_reason(init.url("recorder")).is_failure
        assert connect_reason(f"mqtt://127.0.0.1:{port}").is_failure
    finally:
        broker.stop()


def test_root_tls_key_must_be_readable_by_mosquitto(reachable_dir: Path) -> None:
    """Mosquitto 2.0 loads the certificates after dropping privileges: say so at init."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    account = pwd.getpwnam("mosquitto")
    ca, cert, key = _make_ca_and_server_cert(reachable_dir / "pki", "gpuheal-test")
    key.chmod(0o600)  # root's only
    port, tls_port = free_port(), free_port()
    tls = TlsPaths(ca, cert, key, port=tls_port, bind="127.0.0.1", public_host="localhost")
    with pytest.raises(BrokerInitError, match="not readable by the account 'mosquitto'"):
        init_broker(reachable_dir / "b", port, tls=tls)
    os.chown(key, 0, account.pw_gid)
    key.chmod(0o640)
    init = init_broker(reachable_dir / "b", port, tls=tls)
    broker = start_broker(init.conf_path, port, init.log_path)
    try:
        wait_for(lambda: port_answers("127.0.0.1", tls_port), 5, "the TLS listener")
        bus = Bus(init.tls_urls["analyzer"], "analyzer", "tlshost", T)
        try:
            assert bus.start(wait_s=10), bus.last_connect_error
        finally:
            bus.stop()
    finally:
        broker.stop()


def test_forget_needs_the_admin_identity_and_says_what_was_refused(secure: Secure,
                                                                   host: str) -> None:
    import io

    from gpuheal.options import CommonOptions
    from gpuheal.status import forget_host

    speaker = Speaker(secure.url("analyzer"))
    try:
        state = (b'{"v":1,"host":"%s","index":0,"health":"healthy","timestamp":'
                 b'"2026-11-30T12:00:00.000Z","ts":1796040000.0}' % host.encode())
        assert not speaker.send(T.state(host, 0), state, retain=True).is_failure
    finally:
        speaker.close()
    out = io.StringIO()
    operator = CommonOptions(broker=secure.url("operator"), prefix=PREFIX, host_name="ops")
    assert forget_host(operator, host, out=out) == 1
    assert f"refused {T.state(host, 0)}" in out.getvalue()
    out = io.StringIO()
    admin = CommonOptions(broker=secure.url("admin"), prefix=PREFIX, host_name="ops")
    assert forget_host(admin, host, out=out) == 0
    assert f"cleared {T.state(host, 0)}" in out.getvalue()
    marker = T.status(host, "analyzer")
    with Collector(secure.url("viewer"), [T.state(host, 0), marker]) as seen:
        probe = Speaker(secure.url("analyzer"))  # a marker after any retained message
        try:
            probe.send(marker, b"online")
        finally:
            probe.close()
        seen.wait(lambda ms: any(m.topic == marker for m in ms), 5, "the marker")
        assert not [m for m in seen.snapshot() if m.topic == T.state(host, 0)]  # gone
