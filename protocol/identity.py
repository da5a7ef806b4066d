"""Ed25519 identities of devices, tier daemons and the central; no I/O beyond key files.

A key id is the stable, printable name of a public key: the first 15 bytes of
BLAKE3 over the 32 raw public-key bytes, in lowercase RFC 4648 base32 without
padding (24 characters from ``a-z2-7``). It is safe in MQTT topics, NATS
subjects and file names, and every message names its sender by it.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtier.protocol.errors import KeyFileError, LocalProtocolError, SignatureError

__all__ = [
    "KEY_ID_LENGTH",
    "SigningIdentity",
    "VerifyKey",
    "key_id_for",
    "load_public_key",
    "load_signing_identity",
    "valid_key_id",
]

KEY_ID_LENGTH = 24
_KEY_ID_RE = re.compile(r"[a-z2-7]{24}")


def key_id_for(public_key_raw: bytes) -> str:
    """Return the key id of a 32-byte raw Ed25519 public key."""
    if len(public_key_raw) != 32:
        raise LocalProtocolError(f"an Ed25519 public key has 32 bytes, got {len(public_key_raw)}")
    digest = blake3.blake3(public_key_raw).digest()[:15]
    return base64.b32encode(digest).decode("ascii").lower()


def valid_key_id(value: str) -> bool:
    """Return True when ``value`` has the shape of a key id."""
    return _KEY_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key that checks signatures.

    Attributes:
        raw: the 32 raw public-key bytes.
    """

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise LocalProtocolError(f"an Ed25519 public key has 32 bytes, got {len(self.raw)}")

    @property
    def key_id(self) -> str:
        """The stable printable id of this key."""
        return key_id_for(self.raw)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Check ``signature`` over ``message``.

        Raises:
            SignatureError: the signature does not verify.
        """
        key = Ed25519PublicKey.from_public_bytes(self.raw)
        try:
            key.verify(signature, message)
        except InvalidSignature as exc:
            raise SignatureError(
                f"signature does not verify against the key of {self.key_id}"
            ) from exc

    def to_pem(self) -> bytes:
        """Return the key as a SubjectPublicKeyInfo PEM block."""
        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        """Parse 64 hex digits (the form registries and configs use)."""
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError as exc:
            raise LocalProtocolError(f"public key {text[:16]!r}... is not hex") from exc
        return cls(raw)


class SigningIdentity:
    """A private Ed25519 key and the identity it gives its owner."""

    __slots__ = ("_private", "verify_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.verify_key = VerifyKey(
            private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @classmethod
    def generate(cls) -> SigningIdentity:
        """Create a new random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningIdentity:
        """Create an identity from a 32-byte seed (test vectors, reproducible fleets)."""
        if len(seed) != 32:
            raise LocalProtocolError(f"an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def key_id(self) -> str:
        """The stable printable id of this identity."""
        return self.verify_key.key_id

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message``."""
        return self._private.sign(message)

    def seed(self) -> bytes:
        """Return the 32 raw private bytes (for test vectors; keep them secret)."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the private key as PKCS#8 PEM, readable by the owner only (0600).

        The file is created with mode 0600 from the start (never chmod after
        writing) and must not exist yet, so a key is never silently replaced.
        """
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from exc
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())

    def save_public(self, path: Path) -> None:
        """Write the public key as PEM (not secret)."""
        path.write_bytes(self.verify_key.to_pem())


def load_signing_identity(path: Path) -> SigningIdentity:
    """Read a private key written by ``SigningIdentity.save``.

    Raises:
        KeyFileError: missing, unreadable, readable by others, or not an
            Ed25519 private key.
    """
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
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"key file {path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return SigningIdentity(key)


def load_public_key(path: Path) -> VerifyKey:
    """Read a public key written by ``SigningIdentity.save_public`` (PEM).

    Raises:
        KeyFileError: missing, unreadable or not an Ed25519 public key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key file {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"public key file {path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key file {path} holds a {type(key).__name__}, not Ed25519")
    return VerifyKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
