"""The central's signing key replaced while it runs: checked, published, then used; no bus adapter.

Imports protocol, trio and ``tiers.registry``/``tiers.model_registry``/``tiers._upstream``
only; never a concrete bus, the client or simulations.

``systemctl reload`` (SIGHUP) makes the central read again the two things its
config names for its identity: the key file ``identity_key`` and the
certificate files ``[keys] certificates`` (files, or folders of ``*.cert``).
When the key in the file is not the one it signs with, the new key takes
over only if the pinned fleet root certified it for the central role, the
certificate holds now and the key is not revoked; otherwise the old key stays
and the refusal is logged and counted (:attr:`IdentityReload.refused`, by
reason). An accepted key's certificate is put in the model registry first,
and only once that put is done does the central sign with the new key: no
follower or device ever sees a version whose signer it cannot look up. The
versions cut in between are signed by the old key, which is still valid.

Why files at the same paths rather than a new config: the config a daemon
started with stays the one it runs with (a reload never half-applies other
settings), and after the rotation the same config starts the central with
the new key (``fedtier keys rotate --install`` writes it there). The
daemon's instance id (metrics, status, lease holder, log lines) stays the key
id it started with: it names the process, not the signer.

A renewed certificate of the key in use is not taken this way: followers
fetch a central key's certificate once, when they first see the key, so a
key whose certificate nears its end is rotated to a new key instead.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from fedtier.protocol.certificates import (
    KeyCertificate,
    KeyRole,
    open_certificate,
    parse_certificate,
)
from fedtier.protocol.errors import KeyFileError, RemoteProtocolError
from fedtier.protocol.files import load_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.tiers._telemetry import TierMetricsLike
from fedtier.tiers._upstream import retry_transient
from fedtier.tiers.config import RetrySettings
from fedtier.tiers.model_registry import ModelRegistryWriter
from fedtier.tiers.registry import TierKeys, certificate_files

__all__ = ["NO_CERTIFICATE", "NO_ROOT", "UNREADABLE_KEY", "IdentityReload"]

NO_ROOT: Final = "no_root"
"""Refused: no fleet root is pinned, so nobody could verify a new key."""
NO_CERTIFICATE: Final = "no_certificate"
"""Refused: no certificate file names the new key."""
UNREADABLE_KEY: Final = "unreadable_key"
"""Refused: the key file cannot be read (half copied, wrong mode, not a key)."""


@dataclass(frozen=True, slots=True)
class _Rotation:
    identity: SigningIdentity
    certificate: KeyCertificate
    document: bytes


class IdentityReload:
    """Reads the central's key and certificates again on request, and rotates to a new key.

    Args:
        keys: the central's keys; :meth:`TierKeys.rotate_identity` swaps the identity.
        identity_key: the key file the config names.
        certificates: the certificate files and folders the config names.
        registry: where the certificate is published before the key is used.
        clock_ms: Unix milliseconds now (the certificate must hold now).
        retry: backoff for the registry put.
        metrics: counts the put's retries (``rotate_identity``).
        log: the daemon's logger.

    Attributes:
        refused: reloads that kept the old key, by reason (a ``Reason`` token
            for a certificate's verdict, or :data:`NO_ROOT`,
            :data:`NO_CERTIFICATE`, :data:`UNREADABLE_KEY`).
        rotations: keys taken over since start.
    """

    def __init__(
        self,
        keys: TierKeys,
        *,
        identity_key: Path,
        certificates: Sequence[Path],
        registry: ModelRegistryWriter,
        clock_ms: Callable[[], int],
        retry: RetrySettings,
        metrics: TierMetricsLike,
        log: logging.Logger,
    ) -> None:
        self.keys = keys
        self.identity_key = identity_key
        self.certificates = tuple(certificates)
        self.registry = registry
        self.clock_ms = clock_ms
        self.retry = retry
        self.metrics = metrics
        self.log = log
        self.refused: Counter[str] = Counter()
        self.rotations = 0
        self._pending: _Rotation | None = None
        self._wakeup = trio.Event()

    @property
    def pending(self) -> bool:
        """Whether an accepted key waits for its certificate to be published."""
        return self._pending is not None

    def request(self) -> str | None:
        """Read the key file and certificates again; queue the rotation if the new key is usable.

        Never raises: what is wrong is logged and counted, and the old key stays.

        Returns:
            None when a rotation is queued or the key did not change, else the
            reason it was refused.
        """
        try:
            identity = load_signing_identity(self.identity_key)
        except KeyFileError as exc:
            return self._refuse(UNREADABLE_KEY, f"cannot read {self.identity_key}: {exc}")
        if identity.key_id == self.keys.identity.key_id:
            self._pending = None  # the file went back to the key in use: that key stays
            self.log.info(
                "identity reload: %s still holds key %s; nothing to rotate",
                self.identity_key,
                identity.key_id,
            )
            return None
        root = self.keys.root
        if root is None:
            return self._refuse(
                NO_ROOT,
                f"{self.identity_key} now holds key {identity.key_id}, but no fleet root is "
                "pinned ([keys] root) to certify it; restart with the new key pinned instead",
            )
        now = self.clock_ms()
        verdict = (NO_CERTIFICATE, "no certificate in [keys] certificates names it")
        for path in certificate_files(self.certificates):
            try:
                data = path.read_bytes()
            except OSError as exc:
                self.log.warning("identity reload: cannot read %s: %s", path, exc.strerror)
                continue
            try:
                cert = open_certificate(
                    data,
                    root,
                    role=KeyRole.CENTRAL,
                    at_ms=now,
                    revocations=self.keys.models.revocations,
                )
            except RemoteProtocolError as exc:
                if _names_key(data, identity.key_id):
                    verdict = (exc.reason.value, f"certificate {path}: {exc}")
                continue
            if cert.key_id == identity.key_id:
                self._pending = _Rotation(identity, cert, data)
                self._wakeup.set()
                self.log.warning(
                    "identity reload: key %s certified by the fleet root (serial %d, valid "
                    "until %d); publishing its certificate before it signs",
                    identity.key_id,
                    cert.serial,
                    cert.not_after_ms,
                )
                return None
        reason, detail = verdict
        return self._refuse(
            reason, f"{self.identity_key} now holds key {identity.key_id}: {detail}"
        )

    def _refuse(self, reason: str, detail: str) -> str:
        self.refused[reason] += 1
        self.log.error(
            "identity reload refused (%s), still signing with %s: %s",
            reason,
            self.keys.identity.key_id,
            detail,
        )
        return reason

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish each accepted key's certificate, then sign with the key; until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            rotation = self._pending
            if rotation is None:
                continue
            key_id = rotation.certificate.key_id
            await retry_transient(
                f"publish of the certificate of central key {key_id}",
                "rotate_identity",
                functools.partial(self.registry.put_certificate, key_id, rotation.document),
                retry=self.retry,
                metrics=self.metrics,
                log=self.log,
            )
            if self._pending is not rotation:
                continue  # a newer reload replaced it while the put ran: that one goes next
            self._pending = None
            old = self.keys.identity.key_id
            try:
                self.keys.rotate_identity(rotation.identity, rotation.document)
            except RemoteProtocolError as exc:
                # Revoked between the check and now: the old key stays.
                self._refuse(exc.reason.value, f"key {key_id}: {exc}")
                continue
            self.rotations += 1
            self.log.warning(
                "central signing key rotated: %s -> %s; versions from now on are signed by it",
                old,
                key_id,
            )


def _names_key(data: bytes, key_id: str) -> bool:
    """Whether certificate bytes (unverified) are about ``key_id``: only those explain a refusal."""
    try:
        return parse_certificate(data)[0].key_id == key_id
    except RemoteProtocolError:
        return False
