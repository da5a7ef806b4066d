"""Ed25519 identities of devices, tier daemons and the central, to and from bytes; no file I/O.

Keys go to and from PEM bytes here; reading and writing key files (mode 0600,
refusing a world-readable private key) is ``fedtier.protocol.files``'s job, so
this module never touches the file system.

A key id is the stable, printable name of a public key: the first 15 bytes of
BLAKE3 over the 32 raw public-key bytes, in lowercase RFC 4648 base32 without
padding (24 characters from ``a-z2-7``). It is safe in MQTT topics, NATS
subjects and file names, and every message names its sender by it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtier.protocol.errors import LocalProtocolError, SignatureError

__all__ = [
    "KEY_ID_LENGTH",
    "SigningIdentity",
    "VerifyKey",
    "key_id_for",
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
    def from_pem(cls, data: bytes) -> VerifyKey:
        """Parse a SubjectPublicKeyInfo PEM block (what :meth:`to_pem` writes).

        Raises:
            LocalProtocolError: not a PEM public key, or not an Ed25519 one.
        """
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise LocalProtocolError("not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise LocalProtocolError(f"holds a {type(key).__name__}, not an Ed25519 public key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

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

    def to_pem(self) -> bytes:
        """Return the private key as unencrypted PKCS#8 PEM (secret: write it mode 0600)."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> SigningIdentity:
        """Parse an unencrypted PEM private key (what :meth:`to_pem` writes).

        Raises:
            LocalProtocolError: not an unencrypted PEM private key, or not an Ed25519 one.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise LocalProtocolError("not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise LocalProtocolError(f"holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)
