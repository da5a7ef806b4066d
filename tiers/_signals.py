"""Signals a daemon receives before its event loop listens for them: held, never fatal; stdlib only.

A daemon process spends its first second importing trio, numpy and the buses,
then reads its config, before ``trio.open_signal_receiver`` takes over. With
the default dispositions a SIGHUP there (``systemctl reload``, a terminal
closing) ends the process with status 129 and not one log line, and a SIGTERM
ends it with no log line either. ``hold_signals()`` installs handlers that only
record the signal; it imports nothing but the standard library, so
``fedtier.tiers.cli`` calls it before the heavy imports. The daemon then reads
what was held (:meth:`HeldSignals.take`) once it can act on it, and between the
event loop's end and the process exit the held handlers are back in place
(trio restores them), so a late signal is recorded too instead of killing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Final

__all__ = ["DAEMON_SIGNALS", "HeldSignals", "hold_signals"]

DAEMON_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What a daemon acts on: SIGTERM/SIGINT stop it cleanly, SIGHUP reloads its key registries."""


class HeldSignals:
    """Records :data:`DAEMON_SIGNALS` in arrival order while it is installed."""

    def __init__(self) -> None:
        self._pending: list[int] = []
        self._previous: dict[int, object] = {}

    @property
    def installed(self) -> bool:
        """Whether its handlers are in place (or were replaced by trio's, which restores them)."""
        return bool(self._previous)

    def install(self) -> None:
        """Put the recording handlers in place; a no-op when installed or off the main thread."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        for signum in DAEMON_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def release(self) -> None:
        """Restore the handlers found at :meth:`install`; signals still held are dropped."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]  # what signal() returned
        self._previous.clear()
        self._pending.clear()

    def take(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        taken, self._pending = self._pending, []
        return taken

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: an append is all it may do.
        self._pending.append(signum)


_HELD: Final = HeldSignals()


def hold_signals() -> HeldSignals:
    """Start holding the daemon signals (idempotent) and return the process's one holder."""
    _HELD.install()
    return _HELD
