"""Fault injection for the chaos suite: crash points and unsafe switches; stdlib and protocol only.

Never imports trio, a bus, ``client`` or ``simulations``. The daemons call
:func:`crash_point` at named points of their acceptance sequence and read the
unsafe switches once, when a daemon is built. Nothing is armed unless a
process asks for it (``tiers.daemon.run_daemon`` reads the environment below;
tests call :func:`configure`), and an unarmed :func:`crash_point` is one test of
an empty dict.

Crash points (``FEDTIER_CRASH_AT``)
    A comma-separated list of ``POINT:PROBABILITY[:SKIP]``. At each passage
    through ``POINT``, after the first ``SKIP`` passages, the process ends with
    probability ``PROBABILITY`` through ``os._exit(CRASH_EXIT_STATUS)``: no
    ``finally`` block, no flush, no goodbye to a broker, exactly what kill -9
    leaves behind (sqlite keeps what its last commit wrote). A line naming the
    point goes to stderr first, so a supervisor can count them. ``POINT`` is
    ``<tier>.<moment>`` with ``tier`` one of ``edge``, ``regional``, ``central``:

    =================  ====================================================
    moment             state of the input or output when the process dies
    =================  ====================================================
    ``after_admit``    an input was checked and folded and its record
                       submitted; nothing is on disk, nothing acknowledged
    ``before_commit``  a batch of records is about to be written; nothing
                       of it is on disk
    ``after_commit``   the batch is on disk; no input of it is acknowledged
                       yet (the moment between commit and acknowledgement)
    ``after_ack``      an input was acknowledged to its broker; the edge
                       has not sent its receipt yet
    ``after_receipt``  edge only: the receipt was published
    ``before_publish`` a flushed partial (central: a stored model version)
                       is durable and not yet published
    ``after_publish``  its PubAck (central: registry and announcement)
                       arrived; the store does not know it yet
    =================  ====================================================

Unsafe switches (``FEDTIER_UNSAFE``)
    A comma-separated list of safeties to turn off, so the chaos suite can
    show that its faults are able to lose or duplicate updates (a test that
    cannot fail proves nothing). Never for production: every daemon logs a
    warning at start for each one that is on.

    * ``ack_before_commit``: acknowledge an input to its broker (and, at the
      edge, send its receipt) before its record is committed.
    * ``dedupe_open_buffer_only``: remember input ids only while they are in
      the open buffer, as a broker's dedupe window would, and keep no index of
      the leaves of accepted partials; a copy arriving after the original was
      flushed is folded again.
    * ``drop_unconfirmed_partials``: publish a partial once; if no PubAck
      comes, count it as sent and drop it instead of retrying.
    * ``reject_late_partials``: refuse a partial made more than
      ``max_staleness`` versions ago as ``stale`` (what fedtier did before it
      folded them), dropping the acknowledged updates inside it.
    * ``no_norm_bound``: let an edge run without any bound on an update's L2
      norm (``[validation] max_norm = false`` or ``norm_bound = "none"``): one
      registered device can then move the model as far as it likes, and finite
      f32 values can overflow the fold. Read when the edge's config is loaded.

    The device's own switch (trust the broker's PUBACK instead of waiting for
    the edge's receipt) is ``client.device.DeviceConfig.unsafe_trust_puback``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fedtier.protocol.errors import ConfigError

__all__ = [
    "CRASH_ENV",
    "CRASH_EXIT_STATUS",
    "CRASH_MOMENTS",
    "UNSAFE_ENV",
    "UNSAFE_SWITCHES",
    "configure",
    "configure_from_environment",
    "crash_point",
    "unsafe",
    "unsafe_requested",
    "unsafe_switches",
]

CRASH_ENV: Final = "FEDTIER_CRASH_AT"
UNSAFE_ENV: Final = "FEDTIER_UNSAFE"
CRASH_EXIT_STATUS: Final = 86
"""Exit status of a process ended by a crash point (distinct from signals and errors)."""

TIERS: Final = ("edge", "regional", "central")
CRASH_MOMENTS: Final = (
    "after_admit",
    "before_commit",
    "after_commit",
    "after_ack",
    "after_receipt",
    "before_publish",
    "after_publish",
)
UNSAFE_SWITCHES: Final = frozenset(
    {
        "ack_before_commit",
        "answer_before_upstream",
        "resend_earlier_tenure",
        "dedupe_open_buffer_only",
        "drop_unconfirmed_partials",
        "no_norm_bound",
        "reject_late_partials",
    }
)


@dataclass(slots=True)
class _Armed:
    probability: float
    skip: int
    passages: int = 0


_armed: dict[str, _Armed] = {}
_unsafe: frozenset[str] = frozenset()
# Not seeded: a restarted process must not crash at the same passage again.
_rng = random.Random()  # noqa: S311 - fault timing, not cryptography


def _parse_crash_points(text: str) -> dict[str, _Armed]:
    armed: dict[str, _Armed] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (2, 3):
            raise ConfigError(
                f"{CRASH_ENV} entry {item!r} is not POINT:PROBABILITY or POINT:PROBABILITY:SKIP"
            )
        point = fields[0]
        tier, _, moment = point.partition(".")
        if tier not in TIERS or moment not in CRASH_MOMENTS:
            raise ConfigError(
                f"{CRASH_ENV} names point {point!r}; points are <tier>.<moment> with tier in "
                f"{', '.join(TIERS)} and moment in {', '.join(CRASH_MOMENTS)}"
            )
        try:
            probability = float(fields[1])
            skip = int(fields[2]) if len(fields) == 3 else 0
        except ValueError as exc:
            raise ConfigError(f"{CRASH_ENV} entry {item!r} has a bad number: {exc}") from exc
        if not 0.0 <= probability <= 1.0 or skip < 0:
            raise ConfigError(
                f"{CRASH_ENV} entry {item!r}: probability must be in [0, 1] and skip >= 0"
            )
        armed[point] = _Armed(probability, skip)
    return armed


def _parse_unsafe(text: str) -> frozenset[str]:
    names = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(names - UNSAFE_SWITCHES)
    if unknown:
        raise ConfigError(
            f"{UNSAFE_ENV} names {unknown[0]!r}; the switches are "
            f"{', '.join(sorted(UNSAFE_SWITCHES))}"
        )
    return names


def configure(*, crash_at: str = "", unsafe: str = "") -> None:
    """Arm crash points and turn unsafe switches on for this process (empty: disarm, all safe).

    Args:
        crash_at: the ``FEDTIER_CRASH_AT`` syntax.
        unsafe: the ``FEDTIER_UNSAFE`` syntax.

    Raises:
        ConfigError: an unknown point or switch, or a bad number; nothing changes then.
    """
    global _armed, _unsafe
    armed = _parse_crash_points(crash_at)
    switches = _parse_unsafe(unsafe)
    _armed, _unsafe = armed, switches


def configure_from_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """:func:`configure` from ``FEDTIER_CRASH_AT`` and ``FEDTIER_UNSAFE``; returns warnings to log.

    Raises:
        ConfigError: as :func:`configure`.
    """
    env = os.environ if environ is None else environ
    configure(crash_at=env.get(CRASH_ENV, ""), unsafe=env.get(UNSAFE_ENV, ""))
    warnings = [
        f"UNSAFE: {name} is on ({UNSAFE_ENV}); this daemon can lose or double-count updates"
        for name in sorted(_unsafe)
    ]
    warnings.extend(
        f"fault injection: crash point {point} armed with probability {armed.probability:g} "
        f"after {armed.skip} passages ({CRASH_ENV})"
        for point, armed in sorted(_armed.items())
    )
    return warnings


def unsafe(switch: str) -> bool:
    """Whether the unsafe switch ``switch`` is on in this process."""
    if switch not in UNSAFE_SWITCHES:
        raise ConfigError(f"{switch!r} is not an unsafe switch")
    return switch in _unsafe


def unsafe_requested(switch: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``switch`` is on in this process or named in ``FEDTIER_UNSAFE``.

    For checks made while a config is loaded, which happens before
    :func:`configure_from_environment` runs.

    Raises:
        ConfigError: ``switch`` is not an unsafe switch, or the variable names one
            that is not.
    """
    if unsafe(switch):
        return True
    env = os.environ if environ is None else environ
    return switch in _parse_unsafe(env.get(UNSAFE_ENV, ""))


def unsafe_switches() -> frozenset[str]:
    """The unsafe switches that are on."""
    return _unsafe


def crash_point(point: str) -> None:
    """End the process here if ``point`` is armed and its draw says so (module docstring)."""
    if not _armed:
        return
    armed = _armed.get(point)
    if armed is None:
        return
    armed.passages += 1
    if armed.passages <= armed.skip:
        return
    if armed.probability >= 1.0 or _rng.random() < armed.probability:
        _crash(point)


def _crash(point: str) -> None:
    # os.write, not logging or print: nothing buffered may stand between the
    # line and the exit, and nothing else may run.
    os.write(2, f"fedtier crash point {point}: exiting with status {CRASH_EXIT_STATUS}\n".encode())
    os._exit(CRASH_EXIT_STATUS)
