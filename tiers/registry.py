"""Which public keys a tier accepts messages from, and the keys it signs and verifies with.

Imports protocol and ``tiers._declared`` only (no bus, no trio). A
:class:`KeyRegistry` maps key ids to public keys and to human names for log
lines. Its sources are TOML files with one table::

    [keys]
    veh-0042 = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"

and/or directories of PEM public keys named ``<name>.pub`` (what ``fedtier
keys new --name NAME`` writes beside ``NAME.key``: copy the ``.pub`` in to
register a sender). ``reload()`` reads the sources again (the daemons call it
on SIGHUP); a failed reload keeps the old keys.

A sender rotates its key without a gap by holding several keys for a while,
each with an optional validity window (Unix milliseconds or TOML datetimes,
half-open ``[not_before, not_after)``)::

    [keys]
    edge-north = [
        { public_key = "3d40...660c", not_after = 2026-12-31T00:00:00Z },
        { public_key = "9a1b...07f2", not_before = 2026-12-01T00:00:00Z },
    ]

A key outside its window is not registered at that moment (``unknown_sender``).
A device's entry may declare its data size, ``{ public_key = "...", max_samples = 480 }``
(``tiers._declared``): the edge caps that device's updates' weight there
(:meth:`KeyRegistry.declared_samples`).
A signed revocation list (``protocol.certificates.RevocationList``) set with
:meth:`KeyRegistry.set_revocations` refuses a revoked key id or name with
``revoked`` from that moment on; it survives ``reload()``, which re-reads the
registry files only.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedtier.protocol.certificates import (
    KeyCertificate,
    KeyRole,
    ModelSigners,
    RevocationList,
    open_certificate,
)
from fedtier.protocol.errors import (
    ConfigError,
    KeyFileError,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
    UpdateRejected,
)
from fedtier.protocol.files import load_public_key, load_signing_identity, read_toml
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.tiers._declared import DECLARED_FIELD, declared_size

__all__ = [
    "KeyRegistry",
    "TierKeys",
    "certificate_files",
    "is_hex_key",
    "load_certificates",
    "load_verify_key",
]


_ALWAYS: tuple[int, int] = (0, 1 << 64)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class KeyRegistry(Mapping[str, VerifyKey]):
    """Key id -> public key, loaded from TOML files and PEM directories.

    Usable directly as the ``keys`` argument of ``protocol.envelope.open_envelope``:
    its :meth:`get` is where validity windows and revocation apply, so every
    admission sees them. Iterating lists every registered key, in window or not.

    Args:
        sources: TOML files and/or directories of ``.pub`` PEM files.
        role: what the keys belong to (``"device"``, ``"edge"``...), for log lines.
        clock_ms: Unix milliseconds now, for validity windows (tests pass a fixed one).
    """

    def __init__(
        self,
        sources: Iterable[Path] = (),
        *,
        role: str = "sender",
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.sources = tuple(Path(p) for p in sources)
        self.role = role
        self.clock_ms = clock_ms or _wall_ms
        self._keys: dict[str, VerifyKey] = {}
        self._names: dict[str, str] = {}
        self._windows: dict[str, tuple[int, int]] = {}
        # key id -> the device's declared data size (tiers._declared), when given.
        self._declared: dict[str, int] = {}
        self.revocations: RevocationList | None = None
        if self.sources:
            self.reload()

    @classmethod
    def from_keys(cls, keys: Mapping[str, VerifyKey], *, role: str = "sender") -> KeyRegistry:
        """A registry of ``name -> key`` held in memory (tests, simulations)."""
        registry = cls(role=role)
        for name, key in keys.items():
            registry._add(name, key, "memory")
        return registry

    def reload(self) -> None:
        """Read every source again and replace the keys atomically.

        Raises:
            ConfigError: a source is missing, unreadable or holds a bad key.
        """
        fresh = KeyRegistry(role=self.role)
        for source in self.sources:
            if source.is_dir():
                fresh._load_dir(source)
            else:
                fresh._load_toml(source)
        self._keys, self._names, self._windows = fresh._keys, fresh._names, fresh._windows
        self._declared = fresh._declared

    def set_revocations(self, revocations: RevocationList | None) -> None:
        """Refuse the keys and names ``revocations`` lists from now on (None lifts them).

        The caller verified the list and its serial; inputs accepted before stay accepted.
        """
        self.revocations = revocations

    def _add(
        self, name: str, key: VerifyKey, where: str, window: tuple[int, int] = _ALWAYS
    ) -> None:
        key_id = key.key_id
        if key_id in self._keys and self._names[key_id] != name:
            raise ConfigError(
                f"{where}: {self.role} key {key_id} is listed as both "
                f"{self._names[key_id]!r} and {name!r}"
            )
        self._keys[key_id] = key
        self._names[key_id] = name
        self._windows[key_id] = window

    def _load_toml(self, path: Path) -> None:
        data = read_toml(path, what="key registry")
        unknown = sorted(k for k in data if k != "keys")
        if unknown:
            raise ConfigError(f"key registry {path} has unknown table {unknown[0]!r}; use [keys]")
        table = data.get("keys", {})
        if not isinstance(table, dict):
            raise ConfigError(f"key registry {path}: 'keys' must be a table of name = hex")
        for name, value in table.items():
            entries = value if isinstance(value, list) else [value]
            if not entries:
                raise ConfigError(f"key registry {path}: key {name!r} lists no key")
            for entry in entries:
                key, window = _registry_entry(path, name, entry)
                self._add(name, key, str(path), window)
                size = declared_size(path, name, entry)
                if size is not None:
                    self._declared[key.key_id] = size

    def _load_dir(self, path: Path) -> None:
        for file in sorted(path.glob("*.pub")):
            try:
                key = load_public_key(file)
            except KeyFileError as exc:
                raise ConfigError(f"key registry {path}: {exc}") from exc
            self._add(file.stem, key, str(path))

    # -- Mapping -----------------------------------------------------------------------

    def __getitem__(self, key_id: str) -> VerifyKey:
        return self._keys[key_id]

    def get(self, key_id: str, default: VerifyKey | None = None, /) -> VerifyKey | None:  # type: ignore[override]  # narrower than Mapping.get on purpose
        """The key of ``key_id`` if it may sign now, else ``default``.

        Raises:
            UpdateRejected: the key or its name is revoked (reason ``revoked``).
        """
        key = self._keys.get(key_id)
        if key is None:
            return default
        if self.revocations is not None and self.revocations.revokes(
            key_id, self._names.get(key_id)
        ):
            raise UpdateRejected(
                f"{self.describe(key_id)} is revoked by revocation list {self.revocations.serial}",
                reason=Reason.REVOKED,
            )
        not_before, not_after = self._windows.get(key_id, _ALWAYS)
        if (not_before, not_after) != _ALWAYS and not not_before <= self.clock_ms() < not_after:
            return default
        return key

    def window(self, key_id: str) -> tuple[int, int] | None:
        """The ``[not_before, not_after)`` window of a registered key (ms), None if unknown."""
        return self._windows.get(key_id) if key_id in self._keys else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def declared_samples(self) -> Mapping[str, int]:
        """Key id -> declared data size (``max_samples`` of its entry), for the weight cap.

        The same object until :meth:`reload` replaces it, so a caller may cache
        what it derives from it by identity.
        """
        return self._declared

    def name_of(self, key_id: str) -> str | None:
        """The human name registered for ``key_id``, or None."""
        return self._names.get(key_id)

    def describe(self, key_id: str) -> str:
        """A log-line label such as ``device 'veh-0042' (tc5ik...)``."""
        name = self._names.get(key_id)
        short = f"{key_id[:5]}..."
        if name is None:
            return f"unregistered {self.role} ({short})"
        return f"{self.role} {name!r} ({short})"


def _ms(path: Path, name: str, field_name: str, value: object) -> int:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ConfigError(
                f"key registry {path}: key {name!r} {field_name} needs a time zone (e.g. Z)"
            )
        return int(value.timestamp() * 1000)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(
        f"key registry {path}: key {name!r} {field_name} must be a datetime or Unix "
        f"milliseconds, got {value!r}"
    )


def _registry_entry(path: Path, name: str, entry: object) -> tuple[VerifyKey, tuple[int, int]]:
    """One key of a registry file: ``"hex"`` or ``{public_key, not_before?, not_after?}``."""
    window = _ALWAYS
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"public_key", "not_before", "not_after", DECLARED_FIELD})
        if unknown:
            raise ConfigError(f"key registry {path}: key {name!r} has unknown field {unknown[0]!r}")
        window = (
            _ms(path, name, "not_before", entry.get("not_before", _ALWAYS[0])),
            _ms(path, name, "not_after", entry.get("not_after", _ALWAYS[1])),
        )
        if window[0] >= window[1]:
            raise ConfigError(f"key registry {path}: key {name!r} has an empty validity window")
        entry = entry.get("public_key")
    if not isinstance(entry, str):
        raise ConfigError(f"key registry {path}: key {name!r} must be 64 hex digits, got {entry!r}")
    try:
        return VerifyKey.from_hex(entry), window
    except LocalProtocolError as exc:
        raise ConfigError(f"key registry {path}: key {name!r} is unusable: {exc}") from exc


def is_hex_key(value: str) -> bool:
    """Whether ``value`` is a public key written as 64 hex digits (rather than a file path)."""
    text = value.strip()
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def load_verify_key(value: str, *, base_dir: Path | None = None) -> VerifyKey:
    """Parse a pinned key given as 64 hex digits or as the path of a PEM ``.pub`` file.

    Args:
        value: the key as written in a config.
        base_dir: the folder a relative path is relative to (the config file's);
            None leaves it relative to the working directory.

    Raises:
        ConfigError: neither form works.
    """
    text = value.strip()
    if is_hex_key(text):
        return VerifyKey.from_hex(text)
    path = Path(text)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        return load_public_key(path)
    except KeyFileError as exc:
        raise ConfigError(
            f"pinned key {value!r} is neither 64 hex digits nor a key file: {exc}"
        ) from exc


@dataclass(frozen=True, slots=True)
class TierKeys:
    """The keys one daemon works with.

    Attributes:
        identity: this daemon's signing identity. The one field that changes
            while a daemon runs: the central's key rotation without a restart
            (:meth:`rotate_identity`, ``tiers._identity``).
        senders: whom it accepts inputs from (devices at an edge, edges at a
            regional daemon, regional daemons at the central).
        central: the pinned central key that model versions verify against;
            None when only the fleet root is pinned (then every central key
            is accepted by its certificate).
        root: the pinned fleet root, when the fleet has one: model versions
            signed by any central key it certified (for the version's time)
            verify too.
        certificates: key id -> certificate bytes of the central keys the
            config lists (the central publishes them beside its models).
        models: who may sign model versions (``central`` and, with a root,
            the certified keys the daemon has seen); the one lookup to verify
            a model version with.
    """

    identity: SigningIdentity
    senders: KeyRegistry
    central: VerifyKey | None = None
    root: VerifyKey | None = None
    certificates: Mapping[str, bytes] = field(default_factory=dict)
    models: ModelSigners = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Pin at least one of the two: ModelSigners says so otherwise.
        models = ModelSigners(() if self.central is None else (self.central,), root=self.root)
        for certificate in self.certificates.values():
            models.add_certificate(certificate)
        # A private copy: a rotation adds the new key's certificate to it.
        object.__setattr__(self, "certificates", dict(self.certificates))
        object.__setattr__(self, "models", models)

    def identity_certificate(self, at_ms: int) -> KeyCertificate | None:
        """The certificate of :attr:`identity` held here and valid at ``at_ms``, if any."""
        cert = next((c for c in self.models.certificates if c.key_id == self.identity.key_id), None)
        return cert if cert is not None and cert.valid_at(at_ms) else None

    def check_central_identity(self, now_ms: int | None = None) -> None:
        """Raise unless models this identity signs verify wherever the fleet's pins are.

        That is: it is the pinned central key, or the root certified it for the
        central role and the certificate holds now.

        Raises:
            ConfigError: neither; the message says which pin or certificate is missing.
        """
        key_id = self.identity.key_id
        if self.central is not None and key_id == self.central.key_id:
            return
        at_ms = _wall_ms() if now_ms is None else now_ms
        if self.root is not None and self.identity_certificate(at_ms) is not None:
            return
        if self.root is None:
            assert self.central is not None  # ModelSigners needs one of the two
            raise ConfigError(
                f"the central's identity is {key_id} but [keys] central pins "
                f"{self.central.key_id}; devices would reject its models (pin the fleet "
                "root and list the key's certificate to rotate it)"
            )
        raise ConfigError(
            f"the central's identity {key_id} has no certificate valid now among [keys] "
            f"certificates (issued by root {self.root.key_id} for the central role); "
            "devices would reject its models"
        )

    def rotate_identity(self, identity: SigningIdentity, certificate: bytes) -> KeyCertificate:
        """Sign with ``identity`` from now on; ``certificate`` is its root certificate.

        The caller (``tiers._identity``) checked the certificate and published
        it in the registry before calling, so that no version signed by the new
        key is ever announced before the certificate that makes it verify.

        Raises:
            RemoteProtocolError: the certificate does not verify against the
                pinned root for the central role, or is for another key.
        """
        cert = self.models.add_certificate(certificate)
        if cert.key_id != identity.key_id:
            raise UpdateRejected(
                f"certificate {cert.serial} is for key {cert.key_id}, not {identity.key_id}",
                reason=Reason.UNKNOWN_SENDER,
            )
        certificates = self.certificates
        assert isinstance(certificates, dict)  # made one in __post_init__
        certificates[cert.key_id] = bytes(certificate)
        object.__setattr__(self, "identity", identity)
        return cert

    @classmethod
    def load(
        cls,
        identity_key: Path,
        sender_sources: Iterable[Path],
        central: str = "",
        *,
        role: str,
        base_dir: Path | None = None,
        root: str = "",
        certificates: Iterable[Path] = (),
    ) -> TierKeys:
        """Load the identity, the sender registry and the pinned central key.

        Args:
            identity_key: this daemon's private key file.
            sender_sources: key registry sources (see :class:`KeyRegistry`).
            central: 64 hex digits, or the path of a PEM file; empty when
                ``root`` is given and every central key is taken by its certificate.
            role: whose keys ``sender_sources`` hold, for log lines.
            base_dir: what a relative path of ``central`` is relative to: the
                config file's folder, as for every other path of a config (a
                loaded config has resolved it already). Never the identity
                key's folder: ``keys/central.pub`` beside ``keys/me.key`` would
                then be looked for in ``keys/keys/``.
            root: the pinned fleet root (as ``central``), empty for none.
            certificates: certificate files of central keys (what ``fedtier keys
                rotate`` writes), or folders whose ``*.cert`` files all count,
                each verified against ``root`` now.

        Raises:
            ConfigError: any of them cannot be loaded, a certificate does not
                verify against the root, or neither ``central`` nor ``root`` is given.
        """
        if not central and not root:
            raise ConfigError("pin the fleet root ([keys] root), the central's key, or both")
        try:
            identity = load_signing_identity(identity_key)
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from exc
        pinned_root = load_verify_key(root, base_dir=base_dir) if root else None
        return cls(
            identity=identity,
            senders=KeyRegistry(sender_sources, role=role),
            central=load_verify_key(central, base_dir=base_dir) if central else None,
            root=pinned_root,
            certificates=load_certificates(certificates, pinned_root),
        )


def certificate_files(sources: Iterable[Path]) -> list[Path]:
    """The certificate files ``[keys] certificates`` names: files, and folders' ``*.cert``."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        files.extend(sorted(path.glob("*.cert")) if path.is_dir() else [path])
    return files


def load_certificates(sources: Iterable[Path], root: VerifyKey | None) -> dict[str, bytes]:
    """Key id -> bytes of each central key certificate in ``sources``, verified against ``root``.

    The window is not checked here: a certificate that ended still verifies the
    versions its key signed inside it (the central reads its own back at start).

    Raises:
        ConfigError: a file is unreadable, or a certificate does not verify
            (another root, another role, revoked, malformed), or no root is pinned.
    """
    documents: dict[str, bytes] = {}
    serials: dict[str, int] = {}
    for path in certificate_files(sources):
        if root is None:
            raise ConfigError(f"certificate {path} needs [keys] root to verify it against")
        try:
            data = path.read_bytes()
            cert = open_certificate(data, root, role=KeyRole.CENTRAL)
        except OSError as exc:
            raise ConfigError(f"cannot read certificate {path}: {exc.strerror}") from exc
        except RemoteProtocolError as exc:
            raise ConfigError(f"certificate {path} is unusable: {exc}") from exc
        # Two certificates of one key (a renewal beside the old one): the newer serial.
        if serials.get(cert.key_id, -1) < cert.serial:
            documents[cert.key_id], serials[cert.key_id] = data, cert.serial
    return documents
