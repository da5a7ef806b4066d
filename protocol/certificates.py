r"""Fleet-root key certificates, signed revocation lists and who may sign models; sans-IO.

Imports the rest of ``fedtier.protocol``, msgpack and cryptography; never trio,
a bus, a clock or the file system (callers pass the time and the bytes).

Wire form (normative text in docs/protocol.md, "Key certificates and revocation")::

    document    = msgpack array [version: uint = 1, body: bin, signature: bin(64)]
    certificate : body = map {issuer, serial, key_id, public_key, role, name,
                              not_before_ms, not_after_ms}
                  signature = Ed25519(root, b"fedtier-v1-keycert\x00" || body)
    revocations : body = map {issuer, fleet, serial, issued_ms, next_update_ms,
                              key_ids, names}
                  signature = Ed25519(issuer, b"fedtier-v1-revocations\x00" || body)

As with the envelope, the body travels as opaque bytes and is signed as such,
so a verifier never depends on re-encoding msgpack the same way; the two
domain-separation prefixes keep a signature over one kind of document (or an
envelope header) from ever verifying as another.

The fleet root is an offline key: it only signs certificates and revocation
lists. Devices, followers and the central pin it (or, as before, a bare central
key), and :class:`ModelSigners` is the one place that says which key may sign a
model version created at a given time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import msgpack

from fedtier.protocol.errors import (
    DecodeError,
    FedtierError,
    LimitExceeded,
    LocalProtocolError,
    Reason,
    UnknownSender,
    UnsupportedVersion,
    UpdateRejected,
)
from fedtier.protocol.identity import SigningIdentity, VerifyKey, key_id_for, valid_key_id
from fedtier.protocol.names import check_token

__all__ = [
    "CERTIFICATE_CONTEXT",
    "DOCUMENT_VERSION",
    "MAX_CERTIFICATE_BYTES",
    "MAX_REVOCATION_BYTES",
    "REVOCATION_CONTEXT",
    "KeyCertificate",
    "KeyRole",
    "ModelSigners",
    "RevocationList",
    "check_window",
    "issue_certificate",
    "open_certificate",
    "open_revocations",
    "parse_certificate",
    "parse_revocations",
    "sign_revocations",
    "window_reason",
]

DOCUMENT_VERSION: Final = 1
CERTIFICATE_CONTEXT: Final = b"fedtier-v1-keycert\x00"
REVOCATION_CONTEXT: Final = b"fedtier-v1-revocations\x00"
MAX_CERTIFICATE_BYTES: Final = 1024
"""A certificate is about 250 bytes; the cap keeps a hostile one cheap to refuse."""
MAX_REVOCATION_BYTES: Final = 1 << 20
"""Room for about 25,000 revoked key ids: a fleet revoking more re-keys instead."""
_MAX_NAME: Final = 128
_U64: Final = (1 << 64) - 1

_CERT_FIELDS: Final = (
    "issuer",
    "serial",
    "key_id",
    "public_key",
    "role",
    "name",
    "not_before_ms",
    "not_after_ms",
)
_REVOCATION_FIELDS: Final = (
    "issuer",
    "fleet",
    "serial",
    "issued_ms",
    "next_update_ms",
    "key_ids",
    "names",
)


class KeyRole(StrEnum):
    """What a certified key may do: sign models (central) or inputs of one tier."""

    CENTRAL = "central"
    REGIONAL = "regional"
    EDGE = "edge"
    DEVICE = "device"


@dataclass(frozen=True, slots=True)
class KeyCertificate:
    """The fleet root's statement that ``public_key`` belongs to ``name`` in ``role`` for a time.

    Attributes:
        issuer: the key id of the root that signed it.
        serial: the root's number for it (unique per root; revocation may name it).
        public_key: the 32 raw bytes of the certified Ed25519 key.
        role: what the key may sign.
        name: the subject's name (``central``, ``edge-north``, ``veh-0042``).
        not_before_ms: first millisecond (Unix time) the key is valid.
        not_after_ms: first millisecond it is no longer valid (half-open window).
    """

    issuer: str
    serial: int
    public_key: bytes
    role: KeyRole
    name: str
    not_before_ms: int
    not_after_ms: int

    @property
    def key_id(self) -> str:
        """The key id of the certified key."""
        return key_id_for(self.public_key)

    @property
    def verify_key(self) -> VerifyKey:
        """The certified key."""
        return VerifyKey(self.public_key)

    def valid_at(self, t_ms: int) -> bool:
        """Whether ``t_ms`` lies in ``[not_before_ms, not_after_ms)``."""
        return self.not_before_ms <= t_ms < self.not_after_ms


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A signed deny-list: keys and names no input or model may come from any more.

    Attributes:
        issuer: the key id that signed it (the fleet root or the central).
        fleet: the fleet it is for.
        serial: increases with each list an issuer signs; a loaded list is
            never replaced by one with a lower serial (no rollback).
        issued_ms: when it was signed.
        next_update_ms: when the issuer promises a newer list; past it, a
            holder keeps enforcing this one and says it is overdue.
        key_ids: revoked key ids.
        names: revoked subject names (every key registered under the name).
    """

    issuer: str
    fleet: str
    serial: int
    issued_ms: int
    next_update_ms: int
    key_ids: frozenset[str]
    names: frozenset[str]

    def revokes(self, key_id: str, name: str | None = None) -> bool:
        """Whether ``key_id`` (registered as ``name``, when known) is revoked."""
        return key_id in self.key_ids or (name is not None and name in self.names)

    def overdue(self, now_ms: int) -> bool:
        """Whether the issuer's promised next list is late."""
        return now_ms >= self.next_update_ms


# -- encoding -------------------------------------------------------------------------


def _document(body: dict[str, Any], signer: SigningIdentity, context: bytes) -> bytes:
    body_bytes = msgpack.packb(body, use_bin_type=True)
    signature = signer.sign(context + body_bytes)
    return msgpack.packb([DOCUMENT_VERSION, body_bytes, signature], use_bin_type=True)


def _check_window(not_before_ms: int, not_after_ms: int) -> None:
    if not 0 <= not_before_ms < not_after_ms <= _U64:
        raise LocalProtocolError(
            f"a validity window needs 0 <= not_before_ms < not_after_ms, got "
            f"[{not_before_ms}, {not_after_ms})"
        )


def issue_certificate(
    root: SigningIdentity,
    subject: VerifyKey,
    *,
    role: KeyRole,
    name: str,
    not_before_ms: int,
    not_after_ms: int,
    serial: int,
) -> bytes:
    """Return the certificate bytes for ``subject``, signed by ``root``.

    Raises:
        LocalProtocolError: an empty or long name, a bad window or serial.
    """
    _check_window(not_before_ms, not_after_ms)
    if not 0 <= serial <= _U64:
        raise LocalProtocolError(f"serial must be a uint64, got {serial}")
    _check_name(name, LocalProtocolError)
    body = {
        "issuer": root.key_id,
        "serial": serial,
        "key_id": subject.key_id,
        "public_key": subject.raw,
        "role": KeyRole(role).value,
        "name": name,
        "not_before_ms": not_before_ms,
        "not_after_ms": not_after_ms,
    }
    return _document(body, root, CERTIFICATE_CONTEXT)


def sign_revocations(
    signer: SigningIdentity,
    *,
    fleet: str,
    serial: int,
    issued_ms: int,
    next_update_ms: int,
    key_ids: Iterable[str] = (),
    names: Iterable[str] = (),
) -> bytes:
    """Return a revocation list signed by ``signer`` (the fleet root or the central).

    Key ids and names are written sorted, so the same list signs to the same bytes.

    Raises:
        LocalProtocolError: a malformed key id or name, a bad serial or time.
    """
    _check_window(issued_ms, next_update_ms)
    if not 0 <= serial <= _U64:
        raise LocalProtocolError(f"serial must be a uint64, got {serial}")
    ids = sorted(set(key_ids))
    bad = [k for k in ids if not valid_key_id(k)]
    if bad:
        raise LocalProtocolError(f"{bad[0]!r} is not a key id")
    sorted_names = sorted(set(names))
    for name in sorted_names:
        _check_name(name, LocalProtocolError)
    body = {
        "issuer": signer.key_id,
        "fleet": check_token("fleet", fleet),
        "serial": serial,
        "issued_ms": issued_ms,
        "next_update_ms": next_update_ms,
        "key_ids": ids,
        "names": sorted_names,
    }
    return _document(body, signer, REVOCATION_CONTEXT)


# -- decoding -------------------------------------------------------------------------


def _check_name(name: object, error: type[FedtierError]) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME or not name.isprintable():
        raise error(f"a subject name is 1 to {_MAX_NAME} printable characters, got {name!r}")
    return name


def _unpack_document(
    data: bytes | bytearray | memoryview, what: str, max_bytes: int
) -> tuple[dict[str, Any], bytes, bytes]:
    """Split a document into its parsed body, body bytes and signature (no crypto)."""
    if len(data) > max_bytes:
        raise LimitExceeded(f"{what} has {len(data)} bytes; at most {max_bytes} are allowed")

    def unique(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise DecodeError(f"{what} map repeats a key")
        return out

    def unpack(raw: bytes | bytearray | memoryview) -> Any:
        try:
            return msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                max_ext_len=0,
                object_pairs_hook=unique,
                max_bin_len=max_bytes,
                max_str_len=max_bytes,
                max_array_len=max_bytes,
                max_map_len=16,
            )
        except FedtierError:
            raise
        except Exception as exc:  # the C unpacker raises many types; all mean "malformed"
            raise DecodeError(f"{what} is not valid msgpack: {exc}") from exc

    outer = unpack(data)
    if not isinstance(outer, list) or len(outer) != 3:
        raise DecodeError(f"{what} is not an array [version, body, signature]")
    version, body_bytes, signature = outer
    if version != DOCUMENT_VERSION or isinstance(version, bool):
        raise UnsupportedVersion(f"{what} has version {version!r}; this code speaks 1")
    if not isinstance(body_bytes, bytes) or not isinstance(signature, bytes):
        raise DecodeError(f"{what} body and signature must be bin")
    if len(signature) != 64:
        raise DecodeError(f"{what} signature has {len(signature)} bytes, not 64")
    body = unpack(body_bytes)
    if not isinstance(body, dict):
        raise DecodeError(f"{what} body is not a map")
    return body, body_bytes, signature


def _fields(body: dict[str, Any], names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in body]
    extra = sorted(str(k) for k in body if k not in names)
    if missing or extra:
        raise DecodeError(f"{what} misses fields {missing} or has unknown fields {extra}")


def _uint(body: dict[str, Any], name: str, what: str) -> int:
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
        raise DecodeError(f"{what} field {name!r} must be a uint64, got {value!r}")
    return value


def _key_id_field(value: object, what: str) -> str:
    if not isinstance(value, str) or not valid_key_id(value):
        raise DecodeError(f"{what} names {value!r}, which is not a key id")
    return value


def parse_certificate(
    data: bytes | bytearray | memoryview,
) -> tuple[KeyCertificate, bytes, bytes]:
    """Parse a certificate without checking its signature: ``(certificate, body, signature)``.

    Raises:
        DecodeError: malformed (wrong types, unknown or missing fields, a key id
            that is not the public key's).
    """
    what = "key certificate"
    body, body_bytes, signature = _unpack_document(data, what, MAX_CERTIFICATE_BYTES)
    _fields(body, _CERT_FIELDS, what)
    public_key = body["public_key"]
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise DecodeError(f"{what} public_key must be 32 bytes")
    key_id = _key_id_field(body["key_id"], what)
    if key_id != key_id_for(public_key):
        raise DecodeError(f"{what} key_id {key_id} is not the id of its public key")
    try:
        role = KeyRole(body["role"])
    except ValueError as exc:
        raise DecodeError(f"{what} role {body['role']!r} is not one of {list(KeyRole)}") from exc
    not_before, not_after = _uint(body, "not_before_ms", what), _uint(body, "not_after_ms", what)
    if not_before >= not_after:
        raise DecodeError(f"{what} window [{not_before}, {not_after}) is empty")
    cert = KeyCertificate(
        issuer=_key_id_field(body["issuer"], what),
        serial=_uint(body, "serial", what),
        public_key=public_key,
        role=role,
        name=_check_name(body["name"], DecodeError),
        not_before_ms=not_before,
        not_after_ms=not_after,
    )
    return cert, body_bytes, signature


def open_certificate(
    data: bytes | bytearray | memoryview,
    root: VerifyKey,
    *,
    role: KeyRole | None = None,
    at_ms: int | None = None,
    revocations: RevocationList | None = None,
) -> KeyCertificate:
    """Verify a certificate against the pinned ``root``, the checks cheapest first.

    Args:
        data: the certificate bytes.
        root: the pinned fleet root key.
        role: the role the caller needs, None to accept any.
        at_ms: the time it must be valid at (a model's ``created_ms``, an
            input's arrival), None to skip the window check.
        revocations: the loaded revocation list, if any.

    Raises:
        DecodeError: malformed.
        UnknownSender: issued by another root.
        SignatureError: the root's signature does not verify.
        UpdateRejected: for another role (reason ``wrong_role``), not valid at
            ``at_ms`` (``certificate_expired``, ``certificate_not_yet_valid``),
            or revoked (``revoked``).
    """
    cert, body_bytes, signature = parse_certificate(data)
    label = f"certificate {cert.serial} of {cert.role.value} key {cert.key_id} ({cert.name!r})"
    if cert.issuer != root.key_id:
        raise UnknownSender(
            f"{label} is issued by {cert.issuer}, not the pinned root {root.key_id}"
        )
    root.verify(signature, CERTIFICATE_CONTEXT + body_bytes)
    if role is not None and cert.role is not role:
        raise UpdateRejected(f"{label} is not for the {role.value} role", reason=Reason.WRONG_ROLE)
    if at_ms is not None:
        check_window(cert, at_ms, label)
    if revocations is not None and revocations.revokes(cert.key_id, cert.name):
        raise UpdateRejected(
            f"{label} is revoked by list {revocations.serial}", reason=Reason.REVOKED
        )
    return cert


def window_reason(cert: KeyCertificate, t_ms: int) -> Reason | None:
    """Why ``cert`` does not hold at ``t_ms`` (expired or not yet valid), None when it does."""
    if t_ms < cert.not_before_ms:
        return Reason.CERTIFICATE_NOT_YET_VALID
    if t_ms >= cert.not_after_ms:
        return Reason.CERTIFICATE_EXPIRED
    return None


def check_window(cert: KeyCertificate, t_ms: int, label: str) -> None:
    """Raise unless ``cert`` is valid at ``t_ms``.

    Raises:
        UpdateRejected: reason ``certificate_expired`` or ``certificate_not_yet_valid``.
    """
    reason = window_reason(cert, t_ms)
    if reason is not None:
        raise UpdateRejected(
            f"{label} is valid in [{cert.not_before_ms}, {cert.not_after_ms}), not at {t_ms}",
            reason=reason,
        )


def parse_revocations(data: bytes | bytearray | memoryview) -> tuple[RevocationList, bytes, bytes]:
    """Parse a revocation list without checking its signature: ``(list, body, signature)``.

    Raises:
        DecodeError: malformed.
    """
    what = "revocation list"
    body, body_bytes, signature = _unpack_document(data, what, MAX_REVOCATION_BYTES)
    _fields(body, _REVOCATION_FIELDS, what)
    key_ids, names = body["key_ids"], body["names"]
    if not isinstance(key_ids, list) or not isinstance(names, list):
        raise DecodeError(f"{what} key_ids and names must be arrays")
    fleet = body["fleet"]
    if not isinstance(fleet, str):
        raise DecodeError(f"{what} fleet must be a string")
    try:
        check_token("fleet", fleet)
    except LocalProtocolError as exc:
        raise DecodeError(f"{what}: {exc}") from exc
    issued, next_update = _uint(body, "issued_ms", what), _uint(body, "next_update_ms", what)
    if issued >= next_update:
        raise DecodeError(f"{what} next_update_ms {next_update} is not after issued_ms {issued}")
    revocations = RevocationList(
        issuer=_key_id_field(body["issuer"], what),
        fleet=fleet,
        serial=_uint(body, "serial", what),
        issued_ms=issued,
        next_update_ms=next_update,
        key_ids=frozenset(_key_id_field(k, what) for k in key_ids),
        names=frozenset(_check_name(n, DecodeError) for n in names),
    )
    return revocations, body_bytes, signature


def open_revocations(
    data: bytes | bytearray | memoryview, signers: Mapping[str, VerifyKey], fleet: str
) -> RevocationList:
    """Verify a revocation list signed by one of ``signers`` (the root, the central) for ``fleet``.

    Raises:
        DecodeError: malformed.
        UnknownSender: signed by a key not in ``signers``.
        SignatureError: the signature does not verify.
        UpdateRejected: for another fleet (reason ``wrong_fleet``).
    """
    revocations, body_bytes, signature = parse_revocations(data)
    key = signers.get(revocations.issuer)
    if key is None:
        raise UnknownSender(
            f"revocation list {revocations.serial} is signed by {revocations.issuer}, "
            "which may not sign revocation lists here"
        )
    key.verify(signature, REVOCATION_CONTEXT + body_bytes)
    if revocations.fleet != fleet:
        raise UpdateRejected(
            f"revocation list {revocations.serial} is for fleet {revocations.fleet!r}",
            reason=Reason.WRONG_FLEET,
        )
    return revocations


# -- who may sign model versions --------------------------------------------------------


class ModelSigners:
    """The keys a model version may be signed by: pinned central keys, or keys the root certified.

    A participant pins the fleet root, a bare central key (the old way, still
    accepted), or both. Certificates arrive beside the models
    (:meth:`add_certificate`); one that does not verify is refused and never
    remembered. Pass :meth:`lookup` to ``open_envelope``, then :meth:`check`
    the opened message's ``created_ms``: a certified key signs only what it
    created inside its window, and a revoked key signs nothing from the
    moment the revocation list is loaded (:meth:`set_revocations`).

    Args:
        pinned: central keys accepted at any time (back compatibility).
        root: the fleet root key, None when only bare keys are pinned.
    """

    def __init__(self, pinned: Iterable[VerifyKey] = (), *, root: VerifyKey | None = None) -> None:
        self._pinned = {key.key_id: key for key in pinned}
        self.root = root
        self._certified: dict[str, KeyCertificate] = {}
        self._documents: dict[str, bytes] = {}
        self.revocations: RevocationList | None = None
        if not self._pinned and root is None:
            raise LocalProtocolError("pin the fleet root, a central key, or both")

    @classmethod
    def of(cls, signers: VerifyKey | ModelSigners) -> ModelSigners:
        """``signers`` itself, or a bare pinned key wrapped."""
        return signers if isinstance(signers, ModelSigners) else cls((signers,))

    @property
    def pinned(self) -> tuple[VerifyKey, ...]:
        """The bare central keys pinned."""
        return tuple(self._pinned.values())

    @property
    def certificates(self) -> tuple[KeyCertificate, ...]:
        """The verified certificates held, oldest serial first."""
        return tuple(sorted(self._certified.values(), key=lambda c: c.serial))

    def knows(self, key_id: str) -> bool:
        """Whether ``key_id`` is pinned or certified (revoked or not)."""
        return key_id in self._pinned or key_id in self._certified

    def add_certificate(self, data: bytes | bytearray | memoryview) -> KeyCertificate:
        """Verify a central key's certificate against the root and remember it.

        Raises:
            RemoteProtocolError: no root is pinned, or the certificate fails
                :func:`open_certificate` (window not checked here: a model's time is).
        """
        if self.root is None:
            raise UnknownSender("no fleet root is pinned here: a certificate cannot be checked")
        cert = open_certificate(data, self.root, role=KeyRole.CENTRAL, revocations=self.revocations)
        held = self._certified.get(cert.key_id)
        if held is None or held.serial < cert.serial:
            self._certified[cert.key_id] = cert
            self._documents[cert.key_id] = bytes(data)
        return cert

    def document(self, key_id: str) -> bytes | None:
        """The certificate bytes held for central key ``key_id`` (to pass on), or None."""
        return self._documents.get(key_id)

    def set_revocations(self, revocations: RevocationList | None) -> None:
        """Apply a verified revocation list from now on (older serials are the caller's check)."""
        self.revocations = revocations

    def lookup(self, key_id: str) -> VerifyKey | None:
        """The key with id ``key_id`` that may sign models, None when none is known.

        Raises:
            UpdateRejected: the key is revoked (reason ``revoked``).
        """
        self._check_revoked(key_id)
        pinned = self._pinned.get(key_id)
        if pinned is not None:
            return pinned
        cert = self._certified.get(key_id)
        return None if cert is None else cert.verify_key

    def known_key(self, key_id: str) -> VerifyKey | None:
        """The pinned or certified key ``key_id``, revoked or not.

        For the central reading back what its own store holds: revoking an old
        key of its own refuses that key's versions everywhere else, but must not
        stop the central that signed them from starting.
        """
        pinned = self._pinned.get(key_id)
        if pinned is not None:
            return pinned
        cert = self._certified.get(key_id)
        return None if cert is None else cert.verify_key

    def check(self, key_id: str, created_ms: int) -> None:
        """Raise unless ``key_id`` may sign a model created at ``created_ms``.

        Raises:
            UnknownSender: neither pinned nor certified.
            UpdateRejected: revoked (reason ``revoked``), or the key's certificate
                does not hold at ``created_ms`` (``certificate_expired``,
                ``certificate_not_yet_valid``: a renewed certificate may still come).
        """
        self._check_revoked(key_id)
        if key_id in self._pinned:
            return
        cert = self._certified.get(key_id)
        if cert is None:
            raise UnknownSender(f"model signed by {key_id}: no pinned key or certificate for it")
        check_window(cert, created_ms, f"model created at {created_ms}: central key {key_id}")

    def _check_revoked(self, key_id: str) -> None:
        cert = self._certified.get(key_id)
        name = None if cert is None else cert.name
        if self.revocations is not None and self.revocations.revokes(key_id, name):
            raise UpdateRejected(
                f"central key {key_id} is revoked by list {self.revocations.serial}",
                reason=Reason.REVOKED,
            )
