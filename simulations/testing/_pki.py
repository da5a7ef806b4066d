"""A throwaway test PKI (CA, TLS certificates, nkeys) in a folder; must not import tiers or client.

NOT FOR PRODUCTION. Keys are made in this process and written unencrypted
(mode 0600) next to the certificates, the CA key included, and nothing here
revokes, rotates or audits anything. It exists so that tests and
``fedtier demo --tls`` can run the brokers the way ``deploy/`` configures
them: Mosquitto with client certificates whose Common Name is the client's
identity (``use_identity_as_username``: a device's key id, a daemon's name),
and nats-server with TLS plus nkeys users. Production certificates come from
the fleet's own CA (docs/operations.md, "Transport security").

::

    pki = TestPki.create(tmp_path / "pki")
    broker = pki.issue_server("mosquitto")          # SAN 127.0.0.1 and localhost
    device = pki.issue_client(identity.key_id)      # CN = the device's key id
    edge = pki.issue_nkey_user("edge")              # seed file + public key "U..."

Certificates use ECDSA P-256 keys (fast to make, accepted by OpenSSL in
Mosquitto and by Go in nats-server) and carry the extensions strict
verifiers want: basic constraints, key usage, extended key usage, subject and
authority key identifiers.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtier.protocol.errors import ConfigError

__all__ = ["CertFiles", "NkeyUser", "TestPki"]

# Backdated so that a clock a little behind (another container, a VM) does
# not reject a certificate made a moment ago.
_BACKDATE: Final = datetime.timedelta(minutes=5)
_DEFAULT_VALID: Final = datetime.timedelta(days=7)
_CA_NAME: Final = "fedtier test CA (not for production)"

# nkeys encoding (github.com/nats-io/nkeys): a version byte naming the role,
# the 32 key bytes, a CRC-16/XMODEM little-endian, all in unpadded base32.
_NKEY_PREFIX_SEED: Final = 18 << 3  # "S..."
_NKEY_PREFIX_USER: Final = 20 << 3  # "U..."


@dataclass(frozen=True, slots=True)
class CertFiles:
    """A certificate and its private key, both PEM.

    Attributes:
        cert_file: the certificate.
        key_file: its private key (mode 0600).
        common_name: the subject Common Name.
    """

    cert_file: Path
    key_file: Path
    common_name: str


@dataclass(frozen=True, slots=True)
class NkeyUser:
    """A NATS nkeys user.

    Attributes:
        seed_file: the user seed (``SU...``, mode 0600), for ``NatsConfig.nkeys_seed_file``.
        public_key: the public key (``U...``) the server config lists.
    """

    seed_file: Path
    public_key: str


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: no moment where another user could read it.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _nkey_encode(prefix: bytes, key: bytes) -> str:
    body = prefix + key
    body += _crc16_xmodem(body).to_bytes(2, "little")
    return base64.b32encode(body).decode("ascii").rstrip("=")


def _safe_file_stem(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(
            f"certificate or user name {name!r} must be non-empty letters, digits, '-', '_', '.'"
        )
    return name


class TestPki:
    """A CA and what it issued, all in ``directory``; build it with ``TestPki.create``.

    Attributes:
        directory: where every file is written.
        ca_file: the CA certificate (PEM), for ``MqttConfig.ca_file`` and
            ``NatsConfig.tls_ca_file``.
    """

    # Not a pytest test class, despite the name.
    __test__ = False

    def __init__(
        self,
        directory: Path,
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        valid_for: datetime.timedelta,
    ) -> None:
        self.directory = directory
        self.ca_file = directory / "ca.pem"
        self._ca_key = ca_key
        self._ca_cert = ca_cert
        self._valid_for = valid_for

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        ca_name: str = _CA_NAME,
        valid_for: datetime.timedelta = _DEFAULT_VALID,
    ) -> TestPki:
        """Make a new CA in ``directory`` (created if missing); writes ``ca.pem`` and ``ca.key``.

        Args:
            directory: folder for every file this PKI writes.
            ca_name: the CA's Common Name; two PKIs with the same name are
                still distinct CAs (different keys).
            valid_for: lifetime of the CA and of every certificate it issues.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        now = datetime.datetime.now(datetime.UTC)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        pki = cls(directory, key, cert, valid_for)
        pki.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(directory / "ca.key", _key_pem(key))
        return pki

    def issue_server(
        self, name: str, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    ) -> CertFiles:
        """Issue a server certificate for ``hosts`` (IP addresses or DNS names).

        Writes ``<name>.pem`` and ``<name>.key``.
        """
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        return self._issue(name, ExtendedKeyUsageOID.SERVER_AUTH, alt_names)

    def issue_client(self, common_name: str) -> CertFiles:
        """Issue a client certificate whose subject CN is ``common_name``.

        For Mosquitto with ``use_identity_as_username`` the CN is the user
        name the ACL sees: a device's key id, or an edge daemon's name.
        Writes ``<common_name>.pem`` and ``<common_name>.key``.
        """
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def issue_nkey_user(self, name: str) -> NkeyUser:
        """Make a NATS nkeys user; writes ``<name>.nk`` (the seed, mode 0600)."""
        stem = _safe_file_stem(name)
        private = Ed25519PrivateKey.generate()
        raw_seed = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        raw_public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        # The seed's two version bytes pack "seed" and the role ("user").
        seed_prefix = bytes(
            [_NKEY_PREFIX_SEED | (_NKEY_PREFIX_USER >> 5), (_NKEY_PREFIX_USER & 31) << 3]
        )
        seed = _nkey_encode(seed_prefix, raw_seed)
        public_key = _nkey_encode(bytes([_NKEY_PREFIX_USER]), raw_public)
        seed_file = self.directory / f"{stem}.nk"
        _write_private(seed_file, seed.encode("ascii") + b"\n")
        return NkeyUser(seed_file=seed_file, public_key=public_key)

    def _issue(
        self,
        name: str,
        usage: x509.ObjectIdentifier,
        alt_names: list[x509.GeneralName],
    ) -> CertFiles:
        stem = _safe_file_stem(name)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        now = datetime.datetime.now(datetime.UTC)
        ca_public = self._ca_key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._ca_cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + self._valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        files = CertFiles(
            cert_file=self.directory / f"{stem}.pem",
            key_file=self.directory / f"{stem}.key",
            common_name=name,
        )
        files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(files.key_file, _key_pem(key))
        return files

    def __repr__(self) -> str:
        return f"TestPki({self.directory})"
