"""Fixtures: a real Mosquitto per test session, on a free port, from the project's config."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuheal.broker import PrivateBroker, start_local_broker
from tests.support import FIXTURES, REPO

pytest.register_assert_rewrite("tests.factories")

__all__ = ["FIXTURES", "REPO"]


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    """One Mosquitto for the whole test session (never port 1883)."""
    b = start_local_broker(tmp_path_factory.mktemp("mosquitto"))
    assert b.port != 1883
    yield b
    b.stop()


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A Mosquitto of its own, for tests that need an empty retained store."""
    b = start_local_broker(tmp_path / "mosquitto")
    yield b
    b.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A topic prefix unique to the test, so tests sharing a broker never see each other."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[-40:]
    return f"t{os.getpid()}_{name}"


@pytest.fixture
def gpuheal_cmd() -> list[str]:
    """argv that runs the gpuheal CLI in a real subprocess."""
    return [sys.executable, "-m", "gpuheal"]
