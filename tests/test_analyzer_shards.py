"""``gpuheal analyzer --shard K/N``: N analyzers split the hosts by a stable hash of their
names (found from the publishers' retained status), with explicit per-host subscriptions, so
a GPU's state never splits between processes; a restarted shard continues its hosts'
conditions from the retained States."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from analyzer.service import AnalyzerService
from gpuheal.models import Sample
from gpuheal.options import AnalyzerOptions, CommonOptions, shard, shard_of
from gpuheal.runtime import Component
from gpuheal.topics import Topics
from tests.support import Collector, Speaker, wait_for

T0 = 1_700_000_000.0
HOSTS = [f"node{i:02d}" for i in range(12)]


def test_every_host_has_exactly_one_share() -> None:
    for shares in (1, 2, 3, 7):
        owners = Counter(shard_of(h, shares) for h in (f"h{i}" for i in range(1000)))
        assert set(owners) == set(range(1, shares + 1))
        assert min(owners.values()) > 1000 / shares * 0.7  # an even split
    assert shard_of("gpu-node-17", 4) == shard_of("gpu-node-17", 4)  # stable


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_refused(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        shard(bad)


def _sample(host: str, seq: int, temperature_c: float) -> bytes:
    return Sample(host=host, index=0, source="sim", ts=T0 + seq, seq=seq,
                  temperature_c=temperature_c, utilization_pct=40.0).to_json()


def _analyzer(url: str, prefix: str, share: int) -> Component:
    common = CommonOptions(broker=url, prefix=prefix, host_name=f"central-shard{share}of2")
    return Component(AnalyzerService(AnalyzerOptions(common=common, shard=(share, 2))),
                     common)


def test_two_shards_split_the_hosts_and_a_restart_continues(broker, prefix: str) -> None:
    t = Topics(prefix)
    shards = {1: _analyzer(broker.url, prefix, 1), 2: _analyzer(broker.url, prefix, 2)}
    with Speaker(broker.url) as pub, Collector(broker.url, f"{prefix}/+/gpu/+/+") as seen:
        for host in HOSTS:
            pub.send(t.status(host, "publisher"), b"online", retain=True)
        for component in shards.values():
            assert component.start(wait_s=10)
        try:
            def all_served(seq: int, temp: float) -> bool:  # the shards subscribe when they
                for host in HOSTS:                          # see a publisher: send until heard
                    pub.send(t.sample(host, 0), _sample(host, seq, temp))
                states = {s["host"] for s in seen.payloads("/state")
                          if s["temperature"] == temp}
                return states == set(HOSTS)

            wait_for(lambda: all_served(1, 50.0), 20, "every host served by a shard")
            writers: dict[str, set[str | None]] = {}
            for s in seen.payloads("/state"):
                writers.setdefault(s["host"], set()).add(s["analyzer"])
            for host, names in writers.items():
                assert names == {f"central-shard{shard_of(host, 2)}of2"}, (host, names)
            # a hot host of share 1; then share 1 restarts and continues its condition
            hot = next(h for h in HOSTS if shard_of(h, 2) == 1)
            for seq in range(2, 5):
                pub.send(t.sample(hot, 0), _sample(hot, seq, 88.0))
            seen.wait(lambda _: [e for e in seen.payloads("/event") if e["host"] == hot], 10,
                      "the hot host's event")
            [raised] = [e for e in seen.payloads("/event") if e["host"] == hot]
            shards[1].stop()
            shards[1] = _analyzer(broker.url, prefix, 1)
            assert shards[1].start(wait_s=10)
            seqs = iter(range(5, 1000))

            def cooled_and_cleared() -> bool:  # until the new shard subscribed and heard it
                pub.send(t.sample(hot, 0), _sample(hot, next(seqs), 60.0))
                return any(e["phase"] == "cleared" and e["host"] == hot
                           for e in seen.payloads("/event"))

            wait_for(cooled_and_cleared, 15, "cleared by the restarted shard")
            events = [e for e in seen.payloads("/event") if e["host"] == hot]
            assert [e["phase"] for e in events] == ["raised", "cleared"]  # not raised again
            assert {e["event_id"] for e in events} == {raised["event_id"]}
        finally:
            for component in shards.values():
                component.stop()
