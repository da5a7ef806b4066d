"""Runs the conformance suite once per bus implementation (one ``factory_*.py`` each).

The factory modules are registered as plugins by ``tests/conftest.py`` so their
fixtures are visible here.
"""

from __future__ import annotations

import importlib

import pytest

from tests.conformance import FACTORY_MODULES

_FIXTURES = {
    name.removeprefix("factory_"): importlib.import_module(
        f"tests.conformance.{name}"
    ).FACTORY_FIXTURE
    for name in FACTORY_MODULES
}


@pytest.fixture(params=sorted(_FIXTURES))
def bus_factory(request: pytest.FixtureRequest) -> object:
    """A ``BusFactory`` for each transport: memory, mqtt, nats."""
    return request.getfixturevalue(_FIXTURES[request.param])
