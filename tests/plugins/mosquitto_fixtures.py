"""Pytest fixtures that start a real Mosquitto on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.testing import MosquittoProcess


def _start(
    workdir: Path, *, autosave_interval: int = 1, autosave_on_changes: bool = False
) -> MosquittoProcess:
    try:
        return MosquittoProcess.start(
            workdir,
            autosave_interval=autosave_interval,
            autosave_on_changes=autosave_on_changes,
        )
    except ConfigError as exc:
        # Fail, never skip: the broker tests always run in `make test`.
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """One broker shared by the whole test session; use fresh names per test."""
    broker = _start(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A broker of this test's own, for tests that kill or restart it.

    Sessions and subscriptions are saved as soon as they change, so they
    survive a kill -9; unacknowledged messages are saved with the next
    change or at ``stop()``/``restart()`` (SIGTERM).
    """
    broker = _start(tmp_path / "mosquitto", autosave_interval=1, autosave_on_changes=True)
    try:
        yield broker
    finally:
        broker.stop()
