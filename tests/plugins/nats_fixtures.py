"""Pytest fixtures: a real nats-server on free loopback ports, and the trio-asyncio loop.

A missing or too old nats-server makes these fixtures fail with one readable
sentence (how to install it), never skip: the integration tests always run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.testing import NatsServerProcess


def _start(workdir: Path) -> NatsServerProcess:
    try:
        return NatsServerProcess.start(workdir)
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    """One nats-server for the whole session; tests keep apart by unique subjects and names."""
    server = _start(tmp_path_factory.mktemp("nats"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_nats_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """A nats-server of this test's own, free to kill -9 and restart."""
    server = _start(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nats_loop() -> AsyncIterator[None]:
    """The trio-asyncio loop nats-py runs on, open for the whole test.

    Take it as a test argument: pytest-trio does not run an async fixture
    named only in ``usefixtures``, and the loop is found through a context
    variable that pytest-trio shares between a test and its fixtures.
    """
    # Imported here so that sessions without NATS tests never import
    # trio_asyncio, which changes asyncio.run for the whole process.
    from fedtier.protocol.bus.nats import open_nats_loop

    async with open_nats_loop():
        yield
