"""The project's exception tree; imports nothing but the standard library.

Every error fedtier raises on purpose is a ``FedtierError``. The tree says whose
fault it was, as h11 does: a ``RemoteProtocolError`` means bytes that came off a
network were bad (count it, drop that message, keep serving); a
``LocalProtocolError`` means our own caller built something invalid (a bug or a
bad configuration on this side).

::

    FedtierError
    ├── RemoteProtocolError          bad input from a peer; has a stable ``reason``
    │   ├── DecodeError              malformed bytes, wrong types, unknown fields
    │   │   ├── LimitExceeded        a size, length or count above its cap
    │   │   └── UnsupportedVersion   a protocol version this code does not speak
    │   ├── SignatureError           Ed25519 signature does not verify
    │   ├── DigestMismatch           payload bytes do not match the signed digest
    │   ├── UnknownSender            no registered key for the sender id
    │   └── LayoutMismatch           update is for another model layout or size
    ├── LocalProtocolError           invalid message or argument built on this side
    ├── ConfigError                  a configuration file or value is unusable
    ├── KeyFileError                 a key file cannot be read, parsed or written
    └── BusError                     a transport failed (see ``protocol.bus``)
        ├── BusUnavailable           not connected; transient, retry with backoff
        ├── PublishError             the broker did not confirm a publish
        └── BusClosed                the bus was closed while in use

``reason`` is a short snake_case token meant for metric labels
(``updates_rejected_total{reason="bad_signature"}``); the message is one
sentence naming the offending value, for the log.
"""

from __future__ import annotations

__all__ = [
    "BusClosed",
    "BusError",
    "BusUnavailable",
    "ConfigError",
    "DecodeError",
    "DigestMismatch",
    "FedtierError",
    "KeyFileError",
    "LayoutMismatch",
    "LimitExceeded",
    "LocalProtocolError",
    "PublishError",
    "RemoteProtocolError",
    "SignatureError",
    "UnknownSender",
    "UnsupportedVersion",
]


class FedtierError(Exception):
    """Root of every error fedtier raises on purpose."""


class RemoteProtocolError(FedtierError):
    """A peer sent something that breaks the wire contract.

    Attributes:
        reason: stable snake_case token for metrics, e.g. ``"bad_signature"``.
    """

    reason: str = "protocol"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class DecodeError(RemoteProtocolError):
    """Bytes that do not parse as the message they claim to be."""

    reason = "malformed"


class LimitExceeded(DecodeError):
    """A declared or actual size, length or count is above its cap."""

    reason = "too_large"


class UnsupportedVersion(DecodeError):
    """The envelope names a protocol version this implementation does not speak."""

    reason = "unsupported_version"


class SignatureError(RemoteProtocolError):
    """The Ed25519 signature does not verify against the sender's key."""

    reason = "bad_signature"


class DigestMismatch(RemoteProtocolError):
    """The payload does not hash to the digest the signed header declares."""

    reason = "digest_mismatch"


class UnknownSender(RemoteProtocolError):
    """No key is registered for the sender id the envelope names."""

    reason = "unknown_sender"


class LayoutMismatch(RemoteProtocolError):
    """An update or partial is for a different model layout or size."""

    reason = "layout_mismatch"


class LocalProtocolError(FedtierError, ValueError):
    """This side tried to build an invalid message or passed an invalid argument."""


class ConfigError(FedtierError):
    """A configuration file or value cannot be used."""


class KeyFileError(FedtierError):
    """A key file cannot be read, parsed or written safely."""


class BusError(FedtierError):
    """A message transport failed."""


class BusUnavailable(BusError):
    """The transport is not connected now; transient, retry with backoff."""


class PublishError(BusError):
    """The broker did not confirm a publish; its outcome is unknown."""


class BusClosed(BusError):
    """The bus was closed while an operation was using it."""
