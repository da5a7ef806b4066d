"""Local files every participant shares: TOML configuration tables, key files, atomic writes.

The one module of ``fedtier.protocol`` outside ``bus/`` and ``telemetry/`` that
touches the file system; it imports the standard library and the rest of
``fedtier.protocol`` only, never trio or a bus, so a config loader or a key
tool stays a plain function.

* :class:`ConfigTable` is the one typed reader of a TOML table. Every bad value
  is one ``ConfigError`` sentence naming the file and the dotted key path
  (``edge.toml: mqtt.port is 70000; expected a TCP port (1-65535)``), and a key
  nothing read is an error, so a typo never silently falls back to a default.
  TOML has no null: ``false`` switches an optional setting off.
* :func:`atomic_write` leaves the old file or the new one after a crash, never
  half of one.
* Key files: a private key is PKCS#8 PEM written mode 0600 from the start and
  never replaced; loading refuses one that others may read. The keys
  themselves go to and from PEM bytes in ``fedtier.protocol.identity``.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeGuard, TypeVar, overload

from fedtier.protocol.errors import ConfigError, KeyFileError, LocalProtocolError
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.names import check_token

__all__ = [
    "REQUIRED",
    "ConfigTable",
    "atomic_write",
    "load_public_key",
    "load_signing_identity",
    "read_toml",
    "save_public_key",
    "save_signing_identity",
]

D = TypeVar("D")
S = TypeVar("S", bound=str)


class _Required:
    """The default that makes a getter raise when its key is absent."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()
_ABSENT: Final = object()
_SHOWN_CHARS: Final = 60


# -- atomic writes ------------------------------------------------------------------


def atomic_write(
    path: Path, data: bytes | bytearray | memoryview, *, mode: int = 0o644, overwrite: bool = True
) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half.

    The bytes go to a uniquely named temporary file in the same folder
    (created with ``mode``, less the umask, so a secret is never readable by
    others even for a moment), which is fsynced and then renamed over
    ``path``; the folder is fsynced last so the rename itself survives a power
    cut. The folder must exist.

    Args:
        path: the file to write.
        data: its new contents.
        mode: permission bits of the new file (``0o600`` for a private key).
        overwrite: False to refuse an existing ``path`` (a key must never be
            silently replaced); the new file then appears by a hard link, which
            fails atomically when the name is taken.

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists.
        OSError: the file or its folder cannot be written; the temporary file
            is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# -- key files ----------------------------------------------------------------------


def save_signing_identity(identity: SigningIdentity, path: Path) -> None:
    """Write a private key as PKCS#8 PEM, readable by the owner only (0600).

    The file has mode 0600 from its creation (never chmod after writing) and
    must not exist yet, so a key is never silently replaced.

    Raises:
        KeyFileError: ``path`` exists or cannot be written.
    """
    path = Path(path)
    try:
        atomic_write(path, identity.to_pem(), mode=0o600, overwrite=False)
    except FileExistsError as exc:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from exc


def save_public_key(key: VerifyKey, path: Path) -> None:
    """Write a public key as PEM (not secret: world-readable, replaced if present).

    Raises:
        KeyFileError: ``path`` cannot be written.
    """
    path = Path(path)
    try:
        atomic_write(path, key.to_pem(), mode=0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write public key file {path}: {exc.strerror}") from exc


def load_signing_identity(path: Path) -> SigningIdentity:
    """Read a private key written by :func:`save_signing_identity`.

    Raises:
        KeyFileError: missing, unreadable, readable by others, or not an
            Ed25519 private key.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} has mode {mode:04o}; a private key must be 0600 (chmod 600 {path})"
        )
    try:
        return SigningIdentity.from_pem(data)
    except LocalProtocolError as exc:
        raise KeyFileError(f"key file {path}: {exc}") from exc


def load_public_key(path: Path) -> VerifyKey:
    """Read a public key written by :func:`save_public_key` (PEM).

    Raises:
        KeyFileError: missing, unreadable or not an Ed25519 public key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key file {path}: {exc.strerror}") from exc
    try:
        return VerifyKey.from_pem(data)
    except LocalProtocolError as exc:
        raise KeyFileError(f"public key file {path}: {exc}") from exc


# -- TOML configuration -------------------------------------------------------------


def read_toml(path: Path, *, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file.

    Args:
        path: the file.
        what: what the file is, for messages (``"scenario file"``, ``"key registry"``).

    Raises:
        ConfigError: unreadable, or not UTF-8 TOML.
    """
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from exc


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as the file spells it
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _is_number(value: object) -> TypeGuard[int | float]:
    # TOML booleans are ints to Python; ``true`` is never a number here.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigTable:
    """One TOML table being read through typed getters; call :meth:`finish` last.

    A getter called without a default makes its key required. Each getter
    marks its key as known, so :meth:`finish` can name any key nothing read.
    Relative paths resolve against ``base``, the config file's folder.

    Args:
        data: the table's contents.
        source: what messages name first: the file name (``"edge.toml"``) or,
            for tables not read from one file, a label (``"fedprox"``).
        path: the table's dotted key path inside the source, ``""`` at the top.
        base: the folder relative paths are relative to; None leaves them as written.
    """

    __slots__ = ("_base", "_data", "_path", "_read", "_source")

    def __init__(
        self,
        data: Mapping[str, object],
        *,
        source: str,
        path: str = "",
        base: Path | None = None,
    ) -> None:
        self._data = data
        self._source = source
        self._path = path
        self._base = base
        self._read: set[str] = set()

    @classmethod
    def load(cls, file: Path, *, what: str = "config file") -> ConfigTable:
        """Read a TOML file as its top-level table (paths relative to its folder).

        Raises:
            ConfigError: unreadable, or not valid TOML.
        """
        file = Path(file)
        return cls(read_toml(file, what=what), source=file.name, base=file.parent)

    # -- naming -------------------------------------------------------------------

    @property
    def where(self) -> str:
        """The table in messages: ``edge.toml: mqtt``, or the source alone at the top."""
        return f"{self._source}: {self._path}" if self._path else self._source

    def locate(self, key: str) -> str:
        """A key in messages: ``edge.toml: mqtt.port``."""
        return f"{self._source}: {self._dotted(key)}"

    def _dotted(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def fail(self, key: str, expected: str) -> ConfigError:
        """The error for the value of ``key`` as written: ``<key> is <value>; expected <what>``."""
        return ConfigError(
            f"{self.locate(key)} is {_show(self._data.get(key))}; expected {expected}"
        )

    # -- raw access ---------------------------------------------------------------

    def has(self, key: str) -> bool:
        """Whether ``key`` is present (it is not marked as read)."""
        return key in self._data

    def raw(self, key: str, default: object = None) -> object:
        """The value of ``key`` as parsed, ``default`` when absent, for a caller that checks it."""
        self._read.add(key)
        return self._data.get(key, default)

    def remaining(self) -> dict[str, object]:
        """Every key no getter read yet, with its value; they count as read from now on.

        For a table whose keys are free-form (an optimizer's parameters) and
        checked by whoever takes them.
        """
        rest = {k: v for k, v in self._data.items() if k not in self._read}
        self._read.update(rest)
        return rest

    def _get(self, key: str, default: object) -> object:
        self._read.add(key)
        if key in self._data:
            return self._data[key]
        if isinstance(default, _Required):
            raise ConfigError(f"{self.locate(key)} is missing; it is required")
        return _ABSENT

    # -- scalars ------------------------------------------------------------------

    @overload
    def string(self, key: str, *, nonempty: bool = ...) -> str: ...
    @overload
    def string(self, key: str, default: D, *, nonempty: bool = ...) -> str | D: ...
    def string(self, key: str, default: object = REQUIRED, *, nonempty: bool = True) -> object:
        """A string; non-empty unless ``nonempty`` is False."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, str) or (nonempty and not value):
            raise self.fail(key, "a non-empty string" if nonempty else "a string")
        return value

    @overload
    def token(self, key: str, *, kind: str | None = ...) -> str: ...
    @overload
    def token(self, key: str, default: D, *, kind: str | None = ...) -> str | D: ...
    def token(self, key: str, default: object = REQUIRED, *, kind: str | None = None) -> object:
        """A name token (a fleet, site or device name), checked by ``protocol.names``.

        Tokens end up in topics, subjects and file names, so a bad one is
        refused here, where the message can still name the key.

        Args:
            key: the key.
            default: the value when absent; without it the key is required.
            kind: what the token names, for the message (``"device"``); the key by default.
        """
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string")
        try:
            return check_token(kind or key, value)
        except LocalProtocolError as exc:
            raise ConfigError(f"{self.locate(key)}: {exc}") from exc

    def choice(self, key: str, choices: Sequence[S], default: S | _Required = REQUIRED) -> S:
        """One of ``choices`` (returned as the element of ``choices``, so typed)."""
        value = self._get(key, default)
        if value is _ABSENT:
            assert not isinstance(default, _Required)
            return default
        for choice in choices:
            if value == choice:
                return choice
        raise self.fail(key, "one of " + ", ".join(repr(c) for c in choices))

    @overload
    def boolean(self, key: str) -> bool: ...
    @overload
    def boolean(self, key: str, default: D) -> bool | D: ...
    def boolean(self, key: str, default: object = REQUIRED) -> object:
        """``true`` or ``false``."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    @overload
    def integer(self, key: str, *, low: int = ..., high: int | None = ...) -> int: ...
    @overload
    def integer(
        self, key: str, default: D, *, low: int = ..., high: int | None = ...
    ) -> int | D: ...
    def integer(
        self, key: str, default: object = REQUIRED, *, low: int = 0, high: int | None = None
    ) -> object:
        """An integer in ``[low, high]`` (a float such as ``3.0`` is refused)."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not _is_integer(value) or value < low or (high is not None and value > high):
            upper = f" and <= {high}" if high is not None else ""
            raise self.fail(key, f"an integer >= {low}{upper}")
        return value

    @overload
    def number(
        self, key: str, *, low: float = ..., high: float = ..., low_open: bool = ...
    ) -> float: ...
    @overload
    def number(
        self, key: str, default: D, *, low: float = ..., high: float = ..., low_open: bool = ...
    ) -> float | D: ...
    def number(
        self,
        key: str,
        default: object = REQUIRED,
        *,
        low: float = -math.inf,
        high: float = math.inf,
        low_open: bool = False,
    ) -> object:
        """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``), as a float."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        return self._checked_number(key, value, low, high, low_open, "")

    def optional_number(
        self, key: str, *, low: float = 0.0, high: float = math.inf, low_open: bool = True
    ) -> float | None:
        """A number (``> low`` by default), or None when absent or ``false``."""
        value = self._get(key, None)
        if value is _ABSENT or value is False:
            return None
        return self._checked_number(key, value, low, high, low_open, ", or false for none")

    def _checked_number(
        self, key: str, value: object, low: float, high: float, low_open: bool, off: str
    ) -> float:
        if _is_number(value):
            number = float(value)
            too_low = number <= low if low_open else number < low
            if math.isfinite(number) and not too_low and number <= high:
                return number
        bound = f"a number {'>' if low_open else '>='} {low:g}" if low > -math.inf else ""
        expected = bound or "a finite number"
        if high < math.inf:
            expected += f" and <= {high:g}"
        raise self.fail(key, expected + off)

    @overload
    def port(self, key: str) -> int: ...
    @overload
    def port(self, key: str, default: D) -> int | D: ...
    def port(self, key: str, default: object = REQUIRED) -> object:
        """A TCP port, 1-65535."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not _is_integer(value) or not 1 <= value <= 65_535:
            raise self.fail(key, "a TCP port (1-65535)")
        return value

    def optional_port(self, key: str) -> int | None:
        """A TCP port, or None when absent or ``false``."""
        value = self._get(key, None)
        if value is _ABSENT or value is False:
            return None
        if not _is_integer(value) or not 1 <= value <= 65_535:
            raise self.fail(key, "a TCP port (1-65535), or false for none")
        return value

    # -- paths --------------------------------------------------------------------

    def resolve(self, text: str) -> Path:
        """``text`` as a path: ``~`` expanded, relative to the config file's folder."""
        path = Path(text).expanduser()
        if path.is_absolute() or self._base is None:
            return path
        return self._base / path

    @overload
    def path(self, key: str) -> Path: ...
    @overload
    def path(self, key: str, default: D) -> Path | D: ...
    def path(self, key: str, default: object = REQUIRED) -> object:
        """A non-empty path, relative to the config file's folder."""
        value = self._get(key, default)
        if value is _ABSENT:
            return default
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty path")
        return self.resolve(value)

    def paths(self, key: str, *, required: bool = False) -> tuple[Path, ...]:
        """A path or a list of paths; empty when absent.

        Args:
            key: the key.
            required: refuse an absent key or an empty list (a setting that
                needs at least one file, such as the keys a receipt may be signed by).
        """
        value = self._get(key, REQUIRED if required else ())
        if value is _ABSENT:
            return ()
        items = [value] if isinstance(value, str) else value
        if (
            not isinstance(items, list)
            or not all(isinstance(v, str) and v for v in items)
            or (required and not items)
        ):
            raise self.fail(
                key,
                "a path or a non-empty list of paths" if required else "a path or a list of paths",
            )
        return tuple(self.resolve(item) for item in items)

    # -- arrays -------------------------------------------------------------------

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of non-empty strings; empty when absent."""
        value = self._get(key, ())
        if value is _ABSENT:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "a list of non-empty strings")
        return tuple(value)

    def integers(self, key: str, *, low: int = 0) -> tuple[int, ...] | None:
        """A non-empty list of integers >= ``low``, or None when absent."""
        value = self._get(key, None)
        if value is _ABSENT:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(_is_integer(v) and v >= low for v in value)
        ):
            raise self.fail(key, f"a non-empty array of integers >= {low}")
        return tuple(value)

    # -- nested tables ------------------------------------------------------------

    def table(self, key: str) -> ConfigTable:
        """A sub-table (empty when absent), read with the same file, folder and checks."""
        return ConfigTable(
            self.mapping(key), source=self._source, path=self._dotted(key), base=self._base
        )

    def mapping(self, key: str) -> Mapping[str, object]:
        """A sub-table as a plain mapping (empty when absent), for a reader that checks its keys."""
        value = self._get(key, None)
        if value is _ABSENT:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, "a table")
        return value

    def tables(self, key: str, *, required: bool = False) -> list[ConfigTable]:
        """An array of tables (``[[key]]``); empty when absent.

        Args:
            key: the key.
            required: refuse an absent key or an empty array.
        """
        value = self._get(key, REQUIRED if required else None)
        if value is _ABSENT:
            return []
        if (
            not isinstance(value, list)
            or not all(isinstance(v, Mapping) for v in value)
            or (required and not value)
        ):
            raise self.fail(
                key, "a non-empty array of tables" if required else "an array of tables"
            )
        return [
            ConfigTable(v, source=self._source, path=f"{self._dotted(key)}[{i}]", base=self._base)
            for i, v in enumerate(value)
        ]

    # -- the end ------------------------------------------------------------------

    def finish(self) -> None:
        """Refuse any key nothing read: a typo, or a setting that does not exist.

        Raises:
            ConfigError: naming the first unknown key and the known ones.
        """
        unknown = sorted(k for k in self._data if k not in self._read)
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            raise ConfigError(
                f"{self.locate(unknown[0])} is not a known setting "
                f"(unknown key {unknown[0]!r}; known keys: {known})"
            )
