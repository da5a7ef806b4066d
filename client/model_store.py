"""The device's verified current model from the central's signed pointer and blob; imports no trio.

A device loads model parameters only from bytes that verify against the
central's pinned public key (docs/architecture.md, security). The central publishes two
retained messages per site: a small signed ``ModelAnnouncement`` (version,
layout, BLAKE3 of the blob's payload) and a signed ``ModelBlob`` (the
parameters). They may arrive in either order, and again after every
reconnect. The store:

* accepts a blob when it verifies, is for this fleet and layout, is newer
  than the current version, decodes to finite values and, when the pointer
  for that version is already known, is the blob that pointer names
  (``protocol.models.check_blob_against_pointer``, the rule every tier applies);
* remembers pointers (they tell which blob digest to expect for a version);
* on any failure keeps the last good model and counts the reason in
  ``rejected`` (a repeat or an older version is counted in ``ignored``).

A device pins the central's key, the fleet root's, or both (``central_key`` is
then a ``protocol.certificates.ModelSigners``): with the root, a model signed
by any central key whose certificate (offered with :meth:`ModelStore.offer_certificate`,
published beside the models) is valid at the model's ``created_ms`` loads, so
a rotated central key needs no change on the device. A model whose signer
has no certificate yet (``unknown_sender``) or one that does not hold at the
model's time (``certificate_expired``, ``certificate_not_yet_valid``) is kept,
and loads when a certificate that covers it arrives.

A loaded blob can be kept in a cache file: the blob envelope exactly as
received, written atomically (``protocol.files.atomic_write``). On start the
file is verified again like any received blob: the signed envelope is the one
source of truth, so the file holds nothing a signature does not cover, and
nothing in it is unpickled.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from fedtier.protocol.certificates import ModelSigners
from fedtier.protocol.codecs import decode
from fedtier.protocol.envelope import Envelope, parse_envelope
from fedtier.protocol.errors import Reason, RemoteProtocolError
from fedtier.protocol.files import atomic_write
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob
from fedtier.protocol.models import check_blob_against_pointer, open_model_envelope
from fedtier.protocol.names import check_token

__all__ = ["ModelOffer", "ModelStore", "OfferStatus"]

_log = logging.getLogger("fedtier.device.model")
# Pointers remembered per version; more would only matter for a central that
# announces many versions faster than their blobs arrive.
_POINTERS_KEPT: Final = 8
_AWAITS_CERTIFICATE: Final = frozenset(
    {Reason.UNKNOWN_SENDER, Reason.CERTIFICATE_EXPIRED, Reason.CERTIFICATE_NOT_YET_VALID}
)
"""Refusals a certificate may still lift: the signer's first one, or a renewed one (a
higher serial with a window that holds the model's ``created_ms``), published beside
the models; so the model is kept and offered again when one arrives."""
_M = TypeVar("_M", ModelAnnouncement, ModelBlob)


class OfferStatus(StrEnum):
    """What the store did with an offered message."""

    LOADED = "loaded"  # a blob that is now the current model
    NOTED = "noted"  # a pointer, verified and remembered
    IGNORED = "ignored"  # verified, but not newer than the current model
    REJECTED = "rejected"  # failed a check; the last good model is kept


@dataclass(frozen=True, slots=True)
class ModelOffer:
    """The outcome of one ``offer_*`` call.

    Attributes:
        status: what happened.
        version: the version the message names, None when it did not parse.
        reason: a snake_case token (``bad_signature``, ``digest_mismatch``,
            ``older_version``...), empty when loaded or noted.
        detail: one sentence for the log.
    """

    status: OfferStatus
    version: int | None
    reason: str = ""
    detail: str = ""


class ModelStore:
    """The newest model version that verified, for one fleet and layout.

    Not thread-safe: call it from one thread (the device's trio thread).

    Args:
        central_key: the pinned public key of the central, or the keys that may
            sign models (a pinned root and the certificates offered); nothing
            signed by another key is ever loaded.
        layout: the layout the device's trainer uses.
        fleet: the device's fleet token.
        cache_path: where to keep the last good blob across restarts, None
            to keep it in memory only. An existing file is verified and
            loaded now; a bad one is counted and ignored.
        limits: decoding caps.
    """

    def __init__(
        self,
        central_key: VerifyKey | ModelSigners,
        layout: ModelLayout,
        fleet: str,
        *,
        cache_path: Path | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.layout = layout
        self.fleet = check_token("fleet", fleet)
        self.signers = ModelSigners.of(central_key)
        self._limits = limits
        self._cache_path = None if cache_path is None else Path(cache_path)
        self._version: int | None = None
        self._params: npt.NDArray[np.float32] | None = None
        self._blob_digest: bytes | None = None
        self._pointers: dict[int, ModelAnnouncement] = {}
        # A pointer and a blob signed by a key no certificate vouches for yet.
        self._unknown_key: list[tuple[str, str, bytes]] = []
        self.rejected: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()
        if self._cache_path is not None:
            self._load_cache(self._cache_path)

    # -- reading --------------------------------------------------------------

    @property
    def current(self) -> tuple[int, npt.NDArray[np.float32]] | None:
        """``(version, params)`` of the current model, None before the first.

        ``params`` is read-only; copy it before training on it.
        """
        if self._version is None or self._params is None:
            return None
        return self._version, self._params

    @property
    def version(self) -> int | None:
        """The current model version, None before the first."""
        return self._version

    @property
    def announced_version(self) -> int | None:
        """The newest version a verified pointer named (its blob may not be here yet)."""
        return max(self._pointers, default=None)

    # -- offers ---------------------------------------------------------------

    def offer_certificate(self, data: bytes | bytearray | memoryview) -> ModelOffer:
        """Verify a central key's certificate against the pinned root and remember it.

        A rejected certificate is counted like any rejected offer; models signed
        by its key stay refused (``unknown_sender``).
        """
        try:
            cert = self.signers.add_certificate(data)
        except RemoteProtocolError as exc:
            return self._reject(None, exc.reason, f"central key certificate: {exc}")
        # Certificate, pointer and blob arrive on separate retained topics in any
        # order: what waited for this key is offered again (pointer first).
        waiting, self._unknown_key = self._unknown_key, []
        loaded: ModelOffer | None = None
        for sender, what, held in waiting:
            if sender != cert.key_id:
                self._unknown_key.append((sender, what, held))
                continue
            offer = self.offer_pointer(held) if what == "pointer" else self.offer_blob(held)
            if offer.status is OfferStatus.LOADED:
                loaded = offer
        return loaded or ModelOffer(OfferStatus.NOTED, None)

    def offer_pointer(self, data: bytes | bytearray | memoryview) -> ModelOffer:
        """Verify a ``ModelAnnouncement`` envelope and remember which blob it names."""
        opened = self._open(data, ModelAnnouncement, "model pointer")
        if isinstance(opened, ModelOffer):
            return opened
        _envelope, msg = opened
        if self._version is not None and msg.version < self._version:
            return self._ignore(msg.version, "older_version", "pointer")
        if msg.version == self._version and self._blob_digest != msg.blob_blake3:
            return self._reject(
                msg.version,
                "digest_mismatch",
                f"pointer for model v{msg.version} names blob {msg.blob_blake3.hex()[:16]}...; "
                f"the loaded blob is {(self._blob_digest or b'').hex()[:16]}...",
            )
        self._pointers[msg.version] = msg
        while len(self._pointers) > _POINTERS_KEPT:
            del self._pointers[min(self._pointers)]
        return ModelOffer(OfferStatus.NOTED, msg.version)

    def offer_blob(self, data: bytes | bytearray | memoryview) -> ModelOffer:
        """Verify a ``ModelBlob`` envelope and make it current if it is newer.

        The cache file, when configured, is written before this returns;
        failing to write it is logged and does not undo the load.
        """
        offer = self._accept_blob(data)
        if offer.status is OfferStatus.LOADED and self._cache_path is not None:
            self._write_cache(self._cache_path, bytes(data))
        return offer

    def _accept_blob(self, data: bytes | bytearray | memoryview) -> ModelOffer:
        opened = self._open(data, ModelBlob, "model blob")
        if isinstance(opened, ModelOffer):
            return opened
        envelope, msg = opened
        if self._version is not None and msg.version <= self._version:
            reason = "same_version" if msg.version == self._version else "older_version"
            return self._ignore(msg.version, reason, "blob")
        pointer = self._pointers.get(msg.version)
        try:
            if pointer is not None:
                check_blob_against_pointer(envelope, msg, pointer)
            params = decode(envelope.payload, msg.codec, msg.num_params)
        except RemoteProtocolError as exc:
            return self._reject(msg.version, exc.reason, f"blob for model v{msg.version}: {exc}")
        if not bool(np.isfinite(params).all()):
            return self._reject(
                msg.version, "non_finite", f"blob for model v{msg.version} holds inf or NaN"
            )
        params.flags.writeable = False
        self._version = msg.version
        self._params = params
        self._blob_digest = envelope.payload_blake3
        # Pointers for versions at or below the current one can no longer matter.
        for version in [v for v in self._pointers if v < msg.version]:
            del self._pointers[version]
        return ModelOffer(OfferStatus.LOADED, msg.version)

    def _open(
        self, data: bytes | bytearray | memoryview, kind: type[_M], what: str
    ) -> tuple[Envelope, _M] | ModelOffer:
        """Verify signature, kind, fleet and layout; a ``ModelOffer`` means rejected."""
        try:
            envelope = open_model_envelope(data, self.signers, self._limits)
            msg = envelope.message
            if not isinstance(msg, kind):
                return self._reject(
                    None, "wrong_kind", f"{what} topic carried a {msg.KIND.value} message"
                )
            if msg.fleet != self.fleet:
                return self._reject(
                    msg.version, "wrong_fleet", f"{what} is for fleet {msg.fleet!r}"
                )
            self.layout.check(msg.layout, msg.num_params, what=f"{what} v{msg.version}")
            if isinstance(msg, ModelBlob):
                # The header ties the tensor list to the fingerprint; checking
                # both keeps a hash collision on the fingerprint out of scope.
                self.layout.check(
                    msg.tensors.fingerprint, msg.tensors.num_params, what=f"{what} tensors"
                )
        except RemoteProtocolError as exc:
            if exc.reason in _AWAITS_CERTIFICATE and self.signers.root is not None:
                self._hold_for_certificate(data, "pointer" if kind is ModelAnnouncement else "blob")
            return self._reject(None, exc.reason, f"{what}: {exc}")
        return envelope, msg

    def _hold_for_certificate(self, data: bytes | bytearray | memoryview, what: str) -> None:
        """Keep the newest pointer and blob whose key is unknown until a certificate comes."""
        try:
            sender = parse_envelope(data, self._limits).sender
        except RemoteProtocolError:
            return
        self._unknown_key = [e for e in self._unknown_key if e[1] != what]
        self._unknown_key.append((sender, what, bytes(data)))

    def _reject(self, version: int | None, reason: str, detail: str) -> ModelOffer:
        self.rejected[reason] += 1
        _log.warning("rejected %s; keeping model v%s", detail, self._version)
        return ModelOffer(OfferStatus.REJECTED, version, reason, detail)

    def _ignore(self, version: int, reason: str, what: str) -> ModelOffer:
        self.ignored[reason] += 1
        return ModelOffer(
            OfferStatus.IGNORED,
            version,
            reason,
            f"{what} for model v{version} is not newer than v{self._version}",
        )

    # -- the cache file ----------------------------------------------------------

    def _load_cache(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._reject(None, "cache_unreadable", f"model cache {path}: {exc.strerror}")
            return
        offer = self._accept_blob(data)
        if offer.status is OfferStatus.LOADED:
            _log.info("loaded model v%s from cache %s", offer.version, path)

    @staticmethod
    def _write_cache(path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as exc:
            _log.warning("cannot write model cache %s: %s", path, exc.strerror)
