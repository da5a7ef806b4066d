"""Verifying a model version's pointer and blob against the pinned central or fleet root; sans-IO.

Imports only the rest of ``fedtier.protocol``. Every participant that takes a
model version (edges relaying it, regionals and the central following it,
devices loading it) runs these checks, so there is one place that says when a
blob is the blob its pointer names, and which key may have signed it: a pinned
central key, or a central key whose certificate from the pinned fleet root is
valid at the version's ``created_ms`` (``protocol.certificates.ModelSigners``).
"""

from __future__ import annotations

from fedtier.protocol.certificates import ModelSigners
from fedtier.protocol.envelope import Envelope, open_envelope
from fedtier.protocol.errors import (
    DecodeError,
    DigestMismatch,
    LayoutMismatch,
    Reason,
    UpdateRejected,
)
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.limits import Limits
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob

__all__ = [
    "check_blob_against_pointer",
    "open_model_blob",
    "open_model_envelope",
    "open_model_pointer",
]


def open_model_envelope(
    data: bytes | bytearray | memoryview, central: VerifyKey | ModelSigners, limits: Limits
) -> Envelope:
    """Open a model envelope (pointer or blob) signed by a key that may sign it then.

    Raises:
        RemoteProtocolError: malformed, signed by no accepted key, signed by a
            certified key outside its window (``unknown_sender``) or a revoked
            one (``revoked``).
    """
    signers = ModelSigners.of(central)
    envelope = open_envelope(data, signers.lookup, limits)
    message = envelope.message
    if isinstance(message, ModelAnnouncement | ModelBlob):
        signers.check(envelope.sender, message.created_ms)
    return envelope


def open_model_pointer(
    data: bytes, central: VerifyKey | ModelSigners, fleet: str, limits: Limits
) -> tuple[Envelope, ModelAnnouncement]:
    """Verify a model pointer against the pinned central key or the certified ones.

    Raises:
        RemoteProtocolError: malformed, not signed by the central, another kind or fleet.
    """
    envelope = open_model_envelope(data, central, limits)
    message = envelope.message
    if not isinstance(message, ModelAnnouncement):
        raise DecodeError(f"expected a model pointer, got a {message.KIND.value} message")
    if message.fleet != fleet:
        raise UpdateRejected(
            f"model pointer v{message.version} is for fleet {message.fleet!r}",
            reason=Reason.WRONG_FLEET,
        )
    return envelope, message


def check_blob_against_pointer(
    envelope: Envelope, blob: ModelBlob, pointer: ModelAnnouncement
) -> None:
    """Raise unless ``blob`` (opened from ``envelope``) is the blob ``pointer`` names.

    Raises:
        LayoutMismatch: another version, layout, size or fleet.
        DigestMismatch: the payload's size or BLAKE3 digest is not the pointer's.
    """
    if (blob.version, blob.layout, blob.num_params, blob.fleet) != (
        pointer.version,
        pointer.layout,
        pointer.num_params,
        pointer.fleet,
    ):
        raise LayoutMismatch(
            f"model blob v{blob.version} ({blob.layout.hex()}, {blob.num_params} values) is not "
            f"the blob pointer v{pointer.version} names"
        )
    if envelope.payload_blake3 != pointer.blob_blake3 or len(envelope.payload) != pointer.blob_size:
        raise DigestMismatch(
            f"model blob v{blob.version} has {len(envelope.payload)} bytes and digest "
            f"{envelope.payload_blake3.hex()[:16]}...; its pointer names "
            f"{pointer.blob_blake3.hex()[:16]}... ({pointer.blob_size} bytes)"
        )


def open_model_blob(
    data: bytes, central: VerifyKey | ModelSigners, pointer: ModelAnnouncement, limits: Limits
) -> tuple[Envelope, ModelBlob]:
    """Verify a model blob against the central's keys and the pointer that names it.

    Raises:
        RemoteProtocolError: malformed, not signed by the central, or not the blob
            the pointer names (version, layout, size or digest).
    """
    envelope = open_model_envelope(data, central, limits)
    blob = envelope.message
    if not isinstance(blob, ModelBlob):
        raise DecodeError(f"expected a model blob, got a {blob.KIND.value} message")
    check_blob_against_pointer(envelope, blob, pointer)
    return envelope, blob
