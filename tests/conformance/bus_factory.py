"""What each bus implementation provides to the conformance suite.

Each ``factory_*.py`` module beside this file defines ``FACTORY_FIXTURE``: the
name of a pytest fixture (defined in that module or a plugin) that returns a
``BusFactory``. ``conftest.py`` collects them all, so adding a transport means
adding one file.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from fedtier.protocol.bus import Bus, Flavor


class BusFactory(Protocol):
    """Connects conformance tests to one kind of broker."""

    flavor: Flavor
    supports_retain: bool
    dedupes_msg_id: bool

    def connect(self, client_id: str) -> AbstractAsyncContextManager[Bus]:
        """Open a bus connection; the same ``client_id`` resumes the same session."""
        ...

    def subject(self, *tokens: str) -> str:
        """Build a concrete subject from tokens in this flavor (inside the test namespace)."""
        ...

    def wildcard_rest(self, *tokens: str) -> str:
        """Build ``tokens`` followed by the multi-level wildcard."""
        ...

    def wildcard_one(self, *tokens: str) -> str:
        """Build ``tokens`` with the single-level wildcard in place of ``"*"`` tokens."""
        ...
