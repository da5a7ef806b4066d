"""Fixtures shared by every test folder: real broker processes and a fast hypothesis profile."""

from __future__ import annotations

from hypothesis import settings

from tests.conformance import FACTORY_MODULES

pytest_plugins = [
    "tests.plugins.mosquitto_fixtures",
    "tests.plugins.nats_fixtures",
    *(f"tests.conformance.{name}" for name in FACTORY_MODULES),
]

settings.register_profile("fedtier", max_examples=100, deadline=None)
settings.load_profile("fedtier")
