"""Which public keys a tier accepts messages from, and the keys it signs and verifies with.

Imports protocol only (no bus, no trio). A :class:`KeyRegistry` maps key ids to
public keys and to human names for log lines. Its sources are TOML files with
one table::

    [keys]
    veh-0042 = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"

and/or directories of PEM public keys named ``<name>.pub`` (what ``fedtier
keys new --name NAME`` writes beside ``NAME.key``: copy the ``.pub`` in to
register a sender). ``reload()`` reads the sources again (the daemons call it
on SIGHUP); a failed reload keeps the old keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedtier.protocol.errors import ConfigError, KeyFileError, LocalProtocolError
from fedtier.protocol.files import load_public_key, load_signing_identity, read_toml
from fedtier.protocol.identity import SigningIdentity, VerifyKey

__all__ = ["KeyRegistry", "TierKeys", "is_hex_key", "load_verify_key"]


class KeyRegistry(Mapping[str, VerifyKey]):
    """Key id -> public key, loaded from TOML files and PEM directories.

    Usable directly as the ``keys`` argument of ``protocol.envelope.open_envelope``.

    Args:
        sources: TOML files and/or directories of ``.pub`` PEM files.
        role: what the keys belong to (``"device"``, ``"edge"``...), for log lines.
    """

    def __init__(self, sources: Iterable[Path] = (), *, role: str = "sender") -> None:
        self.sources = tuple(Path(p) for p in sources)
        self.role = role
        self._keys: dict[str, VerifyKey] = {}
        self._names: dict[str, str] = {}
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
        self._keys, self._names = fresh._keys, fresh._names

    def _add(self, name: str, key: VerifyKey, where: str) -> None:
        key_id = key.key_id
        if key_id in self._keys and self._names[key_id] != name:
            raise ConfigError(
                f"{where}: {self.role} key {key_id} is listed as both "
                f"{self._names[key_id]!r} and {name!r}"
            )
        self._keys[key_id] = key
        self._names[key_id] = name

    def _load_toml(self, path: Path) -> None:
        data = read_toml(path, what="key registry")
        unknown = sorted(k for k in data if k != "keys")
        if unknown:
            raise ConfigError(f"key registry {path} has unknown table {unknown[0]!r}; use [keys]")
        table = data.get("keys", {})
        if not isinstance(table, dict):
            raise ConfigError(f"key registry {path}: 'keys' must be a table of name = hex")
        for name, value in table.items():
            if not isinstance(value, str):
                raise ConfigError(
                    f"key registry {path}: key {name!r} must be 64 hex digits, got {value!r}"
                )
            try:
                key = VerifyKey.from_hex(value)
            except LocalProtocolError as exc:
                raise ConfigError(f"key registry {path}: key {name!r} is unusable: {exc}") from exc
            self._add(name, key, str(path))

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

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

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
        identity: this daemon's signing identity.
        senders: whom it accepts inputs from (devices at an edge, edges at a
            regional daemon, regional daemons at the central).
        central: the pinned central key that model versions must verify against.
    """

    identity: SigningIdentity
    senders: KeyRegistry
    central: VerifyKey

    @classmethod
    def load(
        cls,
        identity_key: Path,
        sender_sources: Iterable[Path],
        central: str,
        *,
        role: str,
        base_dir: Path | None = None,
    ) -> TierKeys:
        """Load the identity, the sender registry and the pinned central key.

        Args:
            identity_key: this daemon's private key file.
            sender_sources: key registry sources (see :class:`KeyRegistry`).
            central: 64 hex digits, or the path of a PEM file.
            role: whose keys ``sender_sources`` hold, for log lines.
            base_dir: what a relative path of ``central`` is relative to: the
                config file's folder, as for every other path of a config (a
                loaded config has resolved it already). Never the identity
                key's folder: ``keys/central.pub`` beside ``keys/me.key`` would
                then be looked for in ``keys/keys/``.

        Raises:
            ConfigError: any of them cannot be loaded.
        """
        try:
            identity = load_signing_identity(identity_key)
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from exc
        return cls(
            identity=identity,
            senders=KeyRegistry(sender_sources, role=role),
            central=load_verify_key(central, base_dir=base_dir),
        )
