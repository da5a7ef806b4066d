"""The project's one exception tree and its reason tokens; imports nothing but the standard library.

Every error fedtier raises on purpose is a ``FedtierError``, defined here and
nowhere else. The tree says whose fault it was, as h11 does: a
``RemoteProtocolError`` means bytes that came off a network were bad (count it,
drop or quarantine that message, keep serving); a ``LocalProtocolError`` means
our own caller built something invalid (a bug or a bad configuration on this
side).

::

    FedtierError
    ├── RemoteProtocolError          bad input from a peer; has a stable ``reason``
    │   ├── DecodeError              malformed bytes, wrong types, unknown fields
    │   │   ├── LimitExceeded        a size, length or count above its cap
    │   │   └── UnsupportedVersion   a protocol version this code does not speak
    │   ├── SignatureError           Ed25519 signature does not verify
    │   ├── DigestMismatch           payload bytes do not match the signed digest
    │   ├── UnknownSender            no registered key for the sender id
    │   ├── LayoutMismatch           update is for another model layout or size
    │   ├── UpdateRejected           an input failed a check before folding
    │   │                            (wrong_fleet, replay, stale, non_finite, ...)
    │   └── InconsistentPartial      a partial's counts, ids or versions disagree
    ├── LocalProtocolError           invalid message or argument built on this side
    ├── ConfigError                  a configuration file or value is unusable
    ├── KeyFileError                 a key file cannot be read, parsed or written
    ├── StoreError                   a daemon's state store failed; the daemon stops
    ├── RegistryConflict             the model registry holds versions this central did
    │                                not write (a second writer, or a store behind it)
    ├── BusError                     a transport failed (see ``fedtier.protocol.bus``)
    │   ├── BusUnavailable           not connected; transient, retry with backoff
    │   ├── PublishError             the broker did not confirm a publish
    │   ├── BusClosed                the bus was closed while in use
    │   ├── KvConflict               a KV compare-and-set lost against a newer revision
    │   └── ObjectNotFound           the object store holds no object of that name
    └── LabError                     the lab (``fedtier.simulations``) could not run
        ├── ChildFailed              a child process died or never got ready
        └── BenchError               a benchmark could not measure

``reason`` is a :class:`Reason` token meant for metric labels
(``updates_rejected_total{reason="bad_signature"}``), receipts and logs; the
message is one sentence naming the offending value, for the log.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BenchError",
    "BusClosed",
    "BusError",
    "BusUnavailable",
    "ChildFailed",
    "ConfigError",
    "DecodeError",
    "DigestMismatch",
    "FedtierError",
    "InconsistentPartial",
    "KeyFileError",
    "KvConflict",
    "LabError",
    "LayoutMismatch",
    "LimitExceeded",
    "LocalProtocolError",
    "ObjectNotFound",
    "PublishError",
    "Reason",
    "RegistryConflict",
    "RemoteProtocolError",
    "SignatureError",
    "StoreError",
    "UnknownSender",
    "UnsupportedVersion",
    "UpdateRejected",
    "sole_error",
]


class Reason(StrEnum):
    """Why an input was refused: the one list of tokens for receipts, metrics and logs.

    The wire carries a receipt's reason as a plain string, so a peer may send a
    token this list does not know; fedtier only ever emits these.
    """

    PROTOCOL = "protocol"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SIGNATURE = "bad_signature"
    DIGEST_MISMATCH = "digest_mismatch"
    UNKNOWN_SENDER = "unknown_sender"
    LAYOUT_MISMATCH = "layout_mismatch"
    WRONG_FLEET = "wrong_fleet"
    REPLAY = "replay"
    STALE = "stale"
    NON_FINITE = "non_finite"
    NORM_EXCEEDED = "norm_exceeded"
    INCONSISTENT_PARTIAL = "inconsistent_partial"
    # A child partial carries a device update already counted through another
    # input (two edges took one update, a device resent at another site).
    LEAF_COUNTED_TWICE = "leaf_counted_twice"
    # Bounded influence per device (edge): not final, the device keeps the update.
    FUTURE_BASE = "future_base"
    RATE_LIMITED = "rate_limited"
    CONTRIBUTION_CAPPED = "contribution_capped"
    # Backpressure (edge): the state disk is under its low watermark; not final, the
    # device keeps the update and resends it later.
    DISK_FULL = "disk_full"
    # A tier could not decide about one delivery (a bug, caught): quarantined, never a crash.
    INTERNAL_ERROR = "internal_error"
    # Robust aggregation ([robust] outlier_score): an acknowledged input far from its
    # buffer's robust centre, moved to the quarantine at the cut; never a receipt reason.
    OUTLIER = "outlier"
    # Key lifecycle: the signing key (or the device name) is on the fleet's signed
    # revocation list, or its certificate is; refused from the moment the list is loaded.
    REVOKED = "revoked"
    # Key certificates (protocol section 13): the root signed it, but for a window that
    # does not hold the time it is needed at (a model's ``created_ms``, now), or for
    # another role than the key is used in. Not final for a model: a renewed
    # certificate of the same key (a higher serial) may still arrive.
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    WRONG_ROLE = "wrong_role"


class FedtierError(Exception):
    """Root of every error fedtier raises on purpose."""


class RemoteProtocolError(FedtierError):
    """A peer sent something that breaks the wire contract.

    Attributes:
        reason: stable token for metrics, receipts and logs, e.g. ``Reason.BAD_SIGNATURE``.
    """

    reason: Reason = Reason.PROTOCOL

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = Reason(reason)


class DecodeError(RemoteProtocolError):
    """Bytes that do not parse as the message they claim to be."""

    reason = Reason.MALFORMED


class LimitExceeded(DecodeError):
    """A declared or actual size, length or count is above its cap."""

    reason = Reason.TOO_LARGE


class UnsupportedVersion(DecodeError):
    """The envelope names a protocol version this implementation does not speak."""

    reason = Reason.UNSUPPORTED_VERSION


class SignatureError(RemoteProtocolError):
    """The Ed25519 signature does not verify against the sender's key."""

    reason = Reason.BAD_SIGNATURE


class DigestMismatch(RemoteProtocolError):
    """The payload does not hash to the digest the signed header declares."""

    reason = Reason.DIGEST_MISMATCH


class UnknownSender(RemoteProtocolError):
    """No key is registered for the sender id the envelope names."""

    reason = Reason.UNKNOWN_SENDER


class LayoutMismatch(RemoteProtocolError):
    """An update or partial is for a different model layout or size."""

    reason = Reason.LAYOUT_MISMATCH


class UpdateRejected(RemoteProtocolError):
    """An input failed a check before folding; ``reason`` names the check (always given)."""

    def __init__(self, message: str, *, reason: Reason) -> None:
        super().__init__(message, reason=reason)


class InconsistentPartial(RemoteProtocolError):
    """A child partial's counts, histogram, ids or versions contradict each other."""

    reason = Reason.INCONSISTENT_PARTIAL


class LocalProtocolError(FedtierError, ValueError):
    """This side tried to build an invalid message or passed an invalid argument."""


class ConfigError(FedtierError):
    """A configuration file or value cannot be used."""


class KeyFileError(FedtierError):
    """A key file cannot be read, parsed or written safely."""


class StoreError(FedtierError):
    """The state store cannot be opened, read or written; the daemon must stop."""


class RegistryConflict(FedtierError):
    """The model registry holds a version this central did not write; it must not publish.

    Two centrals (or a split brain, or a central restarted on an empty or older
    store) would otherwise publish different signed models under one version
    number. The central stops instead, and says which version it found.
    """


class BusError(FedtierError):
    """A message transport failed."""


class BusUnavailable(BusError):
    """The transport is not connected now; transient, retry with backoff."""


class PublishError(BusError):
    """The broker did not confirm a publish; its outcome is unknown."""


class BusClosed(BusError):
    """The bus was closed while an operation was using it."""


class KvConflict(BusError):
    """A KV ``update`` named a revision that is no longer the key's latest."""


class ObjectNotFound(BusError):
    """The object store holds no object of that name."""


class LabError(FedtierError):
    """The lab (simulator, demo, benchmarks, chaos harness) could not do what it was asked."""


class ChildFailed(LabError):
    """A child process exited while it was expected to run, or did not get ready in time."""


class BenchError(LabError):
    """A benchmark could not measure: a child failed, timed out, or counts disagree."""


def sole_error(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups, or ``exc`` itself.

    trio wraps an error raised in a nursery in an ``ExceptionGroup``; a
    command maps the error inside to its exit status and sentence.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
