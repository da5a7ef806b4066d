"""``fedtier keys``: Ed25519 key files, the fleet root, key certificates, rotation, revocation.

Imports protocol only, and cryptography's X.509 for the brokers' TLS CA and
CRL. Every participant (device, daemon, operator) needs it, so it lives in the
installed namespace's top-level package rather than with one part. Key files
are read and written by ``fedtier.protocol.files``, the signed documents built
by ``fedtier.protocol.certificates``.

One naming everywhere: ``NAME.key`` is the private key (PKCS#8 PEM, mode
0600) and ``NAME.pub`` the public key (PEM). The examples in ``deploy/``, the
docs, the simulator and the key registry folders (which read ``*.pub``) all
use it, so a key made here is registered by copying its ``.pub`` file.
``NAME.cert`` is a key certificate signed by the fleet root (``root.key``,
made by ``fedtier keys ca`` and kept offline), and ``revocations.bin`` the
fleet's signed revocation list. The runbooks that use these commands are in
docs/operations.md ("Rotate the central's signing key", "Rotate an edge's
key", "Revoke a device").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedtier.protocol.identity import VerifyKey

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fedtier keys`` and its actions to the subcommand table ``sub``."""
    keys = sub.add_parser("keys", help="create and inspect Ed25519 identities")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = keys_sub.add_parser(
        "new", help="create a key pair: NAME.key (private, mode 0600) and NAME.pub (public)"
    )
    new.add_argument("--name", required=True, help="file name stem, e.g. veh-0042")
    new.add_argument("--out", type=Path, default=Path(), help="directory (default: .)")
    new.add_argument("--json", action="store_true", help="print JSON")
    new.set_defaults(run=_keys_new)
    show = keys_sub.add_parser(
        "show",
        help="print a key file's key id, or a certificate's or revocation list's fields",
    )
    show.add_argument(
        "path", type=Path, help="a .key or .pub PEM file, a .cert, or a revocation list"
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_keys_show)
    _add_lifecycle_commands(keys_sub)


def _keys_new(args: argparse.Namespace) -> int:
    from fedtier.protocol.files import save_public_key, save_signing_identity
    from fedtier.protocol.identity import SigningIdentity

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = SigningIdentity.generate()
    private, public = out_dir / f"{args.name}.key", out_dir / f"{args.name}.pub"
    save_signing_identity(ident, private)
    save_public_key(ident.verify_key, public)
    _print_key(args, ident.key_id, ident.verify_key.raw.hex(), private=private, public=public)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from fedtier.protocol.errors import KeyFileError
    from fedtier.protocol.files import load_public_key, load_signing_identity

    path: Path = args.path
    document = _show_document(path)
    if document is not None:
        _emit(args, {"file": str(path), **document})
        return 0
    try:
        key = load_public_key(path)
    except KeyFileError:
        key = load_signing_identity(path).verify_key
    _print_key(args, key.key_id, key.raw.hex(), source=path)
    return 0


def _show_document(path: Path) -> dict[str, object] | None:
    """The fields of a key certificate or revocation list (signature not checked), else None."""
    from fedtier.protocol.certificates import parse_certificate, parse_revocations
    from fedtier.protocol.errors import RemoteProtocolError

    try:
        data = path.read_bytes()
    except OSError:
        return None  # the key loaders say why
    if data.startswith(b"-----"):
        return None  # PEM: a key file
    try:
        cert = parse_certificate(data)[0]
    except RemoteProtocolError:
        pass
    else:
        return {
            "kind": "key certificate (signature not checked)",
            "key_id": cert.key_id,
            "role": cert.role.value,
            "name": cert.name,
            "issuer": cert.issuer,
            "serial": cert.serial,
            "not_before_ms": cert.not_before_ms,
            "not_after_ms": cert.not_after_ms,
        }
    try:
        revocations = parse_revocations(data)[0]
    except RemoteProtocolError:
        return None
    return {
        "kind": "revocation list (signature not checked)",
        "fleet": revocations.fleet,
        "issuer": revocations.issuer,
        "serial": revocations.serial,
        "issued_ms": revocations.issued_ms,
        "next_update_ms": revocations.next_update_ms,
        "key_ids": sorted(revocations.key_ids),
        "names": sorted(revocations.names),
    }


def _print_key(
    args: argparse.Namespace,
    key_id: str,
    public_hex: str,
    *,
    private: Path | None = None,
    public: Path | None = None,
    source: Path | None = None,
) -> None:
    info = {"key_id": key_id, "public_key": public_hex}
    if source is not None:
        info["file"] = str(source)
    if private is not None:
        info["private_key_file"] = str(private)
    if public is not None:
        info["public_key_file"] = str(public)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            print(f"{name:17} {value}")


# -- the fleet root, certificates, rotation, revocation -------------------------------

_DAY_MS = 86_400_000
_ROLES = ("central", "regional", "edge", "device")


def _add_lifecycle_commands(keys_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = keys_sub.add_parser(
        "ca",
        help="create the fleet root key (root.key, root.pub); keep root.key offline",
        description=(
            "Create the fleet's root key pair. The root signs key certificates and "
            "revocation lists only; devices and tiers pin root.pub ([central] root_key, "
            "[keys] root) and then accept any central key it certified. Keep root.key "
            "on an offline machine: whoever holds it can certify a central."
        ),
    )
    ca.add_argument("--out", type=Path, default=Path(), help="directory (default: .)")
    ca.add_argument("--name", default="root", help="file name stem (default: root)")
    ca.add_argument(
        "--tls",
        action="store_true",
        help=(
            "also make the fleet's TLS CA for the brokers: ca.pem, ca.key (keep offline) and "
            "an empty crl.pem for Mosquitto's crlfile"
        ),
    )
    ca.add_argument("--json", action="store_true", help="print JSON")
    ca.set_defaults(run=_keys_ca)

    issue = keys_sub.add_parser(
        "issue",
        help="certify a public key with the fleet root: write NAME.cert",
        description=(
            "Sign a key certificate: the root's statement that the key in --key belongs "
            "to --name in --role from --not-before for --days. The central publishes its "
            "certificates beside its models ([keys] certificates in central.toml)."
        ),
    )
    issue.add_argument("--root", type=Path, required=True, help="the root private key file")
    issue.add_argument("--key", type=Path, required=True, help="the .pub (or .key) to certify")
    issue.add_argument("--role", choices=_ROLES, required=True, help="what the key signs")
    issue.add_argument("--name", required=True, help="the subject's name, e.g. central")
    _add_window(issue)
    issue.add_argument("--out", type=Path, help="certificate file (default: KEY with .cert)")
    issue.add_argument("--json", action="store_true", help="print JSON")
    issue.set_defaults(run=_keys_issue)

    rotate = keys_sub.add_parser(
        "rotate",
        help="make the next key of a participant (and its certificate or registry entry)",
        description=(
            "Create NAME-N.key/.pub, the next free N in --out. For --role central, also "
            "NAME-N.cert signed by --root, in --out (the folder [keys] certificates names: "
            "keep the old certificate while models it signed are in use). With --install "
            "FILE the new private key also replaces FILE (the central's identity_key); "
            "then `systemctl reload` the central: it publishes the certificate and signs "
            "with the new key, no restart. Devices and tiers that pin the root accept it "
            "with no change. For an edge, a regional or a device, pass --registry "
            "to add the new key to that sender's entry in a key registry file, valid from "
            "now, and to end the old keys' window after --overlap-days."
        ),
    )
    rotate.add_argument("--role", choices=_ROLES, required=True, help="whose key")
    rotate.add_argument("--name", required=True, help="the participant's name, e.g. central")
    rotate.add_argument("--out", type=Path, default=Path(), help="key directory (default: .)")
    rotate.add_argument("--root", type=Path, help="root private key (needed for --role central)")
    rotate.add_argument("--registry", type=Path, help="key registry TOML file to update")
    rotate.add_argument(
        "--install",
        type=Path,
        help=(
            "also write the new private key over this file (mode 0600, atomically): the "
            "identity_key a daemon reads again at SIGHUP; the old key there is gone"
        ),
    )
    rotate.add_argument(
        "--overlap-days",
        type=float,
        default=7.0,
        help="days the old keys stay valid in --registry (default: 7)",
    )
    _add_window(rotate)
    rotate.add_argument("--json", action="store_true", help="print JSON")
    rotate.set_defaults(run=_keys_rotate)

    revoke = keys_sub.add_parser(
        "revoke",
        help="add keys or names to the fleet's signed revocation list",
        description=(
            "Write the fleet's revocation list (--out), signed by --signer (the root, or "
            "the central's key): the keys and names it held already plus the new ones, "
            "with the next serial. Give the file to the central ([keys] revocations), "
            "which publishes it in the model registry; every tier reads it within "
            "[keys] revocation_poll_s and refuses the revoked senders with 'revoked'."
        ),
    )
    revoke.add_argument("--signer", type=Path, required=True, help="root or central .key")
    revoke.add_argument("--fleet", required=True, help="the fleet token")
    revoke.add_argument("--out", type=Path, required=True, help="the revocation list file")
    revoke.add_argument("--key-id", action="append", default=[], help="a key id to revoke")
    revoke.add_argument(
        "--key", type=Path, action="append", default=[], help="a .pub file whose key to revoke"
    )
    revoke.add_argument(
        "--name", action="append", default=[], help="a registered name (all its keys) to revoke"
    )
    revoke.add_argument(
        "--tls-ca",
        type=Path,
        help="folder of the TLS CA 'fedtier keys ca --tls' made: add --tls-cert to its crl.pem",
    )
    revoke.add_argument(
        "--tls-cert",
        type=Path,
        action="append",
        default=[],
        help="a client certificate (PEM) of the device to refuse at the broker",
    )
    revoke.add_argument(
        "--next-update-days",
        type=float,
        default=7.0,
        help="when you promise the next list (default: 7 days)",
    )
    revoke.add_argument("--json", action="store_true", help="print JSON")
    revoke.set_defaults(run=_keys_revoke)


def _add_window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--not-before",
        help="start of validity, ISO 8601 with a time zone (default: now)",
    )
    parser.add_argument("--days", type=float, default=365.0, help="days of validity (default: 365)")
    parser.add_argument("--serial", type=int, help="certificate serial (default: now in ms)")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _parse_time_ms(text: str | None) -> int:
    from fedtier.protocol.errors import ConfigError

    if text is None:
        return _now_ms()
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--not-before {text!r} is not an ISO 8601 time") from exc
    if when.tzinfo is None:
        raise ConfigError(f"--not-before {text!r} needs a time zone, e.g. {text}Z")
    return int(when.timestamp() * 1000)


def _load_any_key(path: Path) -> VerifyKey:
    from fedtier.protocol.errors import KeyFileError
    from fedtier.protocol.files import load_public_key, load_signing_identity

    try:
        return load_public_key(path)
    except KeyFileError:
        return load_signing_identity(path).verify_key


def _emit(args: argparse.Namespace, info: dict[str, object]) -> None:
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            print(f"{name:17} {value}")


def _keys_ca(args: argparse.Namespace) -> int:
    from fedtier.protocol.files import save_public_key, save_signing_identity
    from fedtier.protocol.identity import SigningIdentity

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    root = SigningIdentity.generate()
    private, public = out_dir / f"{args.name}.key", out_dir / f"{args.name}.pub"
    save_signing_identity(root, private)
    save_public_key(root.verify_key, public)
    info: dict[str, object] = {
        "root_key_id": root.key_id,
        "public_key": root.verify_key.raw.hex(),
        "private_key_file": str(private),
        "public_key_file": str(public),
    }
    if args.tls:
        info.update(_tls_ca(out_dir))
    _emit(args, info)
    return 0


def _tls_ca(out_dir: Path) -> dict[str, object]:
    """A self-signed ECDSA P-256 CA for the brokers' TLS, and its first (empty) CRL."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from fedtier.protocol.errors import KeyFileError
    from fedtier.protocol.files import atomic_write

    ca_file, key_file = out_dir / "ca.pem", out_dir / "ca.key"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtier fleet CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        atomic_write(key_file, pem, mode=0o600, overwrite=False)
    except FileExistsError as exc:
        raise KeyFileError(f"{key_file} already exists; refusing to overwrite a CA key") from exc
    atomic_write(ca_file, cert.public_bytes(serialization.Encoding.PEM))
    crl = _write_crl(out_dir, set())
    return {"tls_ca_file": str(ca_file), "tls_ca_key_file": str(key_file), "crl_file": str(crl)}


def _write_crl(ca_dir: Path, serials: set[int]) -> Path:
    """Sign ``ca_dir/crl.pem`` listing ``serials`` with ``ca_dir/ca.key``; valid for 30 days.

    Mosquitto refuses every client while its CRL is past ``next_update``, so
    the list is re-signed at every revocation; docs/operations.md says to
    re-run ``fedtier keys revoke`` monthly at least.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedtier.protocol.errors import ConfigError
    from fedtier.protocol.files import atomic_write

    try:
        ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{ca_dir} holds no TLS CA made by 'fedtier keys ca --tls': {exc}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / 'ca.key'} is not the CA's ECDSA key")
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=30))
    )
    for serial in sorted(serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    path = ca_dir / "crl.pem"
    crl = builder.sign(key, hashes.SHA256())
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def _revoke_tls(ca_dir: Path, certs: list[Path]) -> tuple[Path, list[int]]:
    """Add the serials of ``certs`` (issued by the CA in ``ca_dir``) to its CRL."""
    from cryptography import x509

    from fedtier.protocol.errors import ConfigError

    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    held: set[int] = set()
    crl_file = ca_dir / "crl.pem"
    if crl_file.exists():
        held = {r.serial_number for r in x509.load_pem_x509_crl(crl_file.read_bytes())}
    added = []
    for path in certs:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read TLS certificate {path}: {exc}") from exc
        if cert.issuer != ca.subject:
            raise ConfigError(f"{path} is not issued by the CA in {ca_dir}")
        added.append(cert.serial_number)
    return _write_crl(ca_dir, held | set(added)), added


def _certify(
    args: argparse.Namespace, root_path: Path, key: VerifyKey, role: str, name: str, out: Path
) -> dict[str, object]:
    from fedtier.protocol.certificates import KeyRole, issue_certificate
    from fedtier.protocol.errors import ConfigError, LocalProtocolError
    from fedtier.protocol.files import atomic_write, load_signing_identity

    root = load_signing_identity(root_path)
    not_before = _parse_time_ms(args.not_before)
    not_after = not_before + int(args.days * _DAY_MS)
    serial = _now_ms() if args.serial is None else args.serial
    try:
        data = issue_certificate(
            root,
            key,
            role=KeyRole(role),
            name=name,
            not_before_ms=not_before,
            not_after_ms=not_after,
            serial=serial,
        )
    except LocalProtocolError as exc:
        raise ConfigError(str(exc)) from exc
    atomic_write(out, data)
    return {
        "certificate_file": str(out),
        "key_id": key.key_id,
        "role": role,
        "name": name,
        "issuer": root.key_id,
        "serial": serial,
        "not_before_ms": not_before,
        "not_after_ms": not_after,
    }


def _keys_issue(args: argparse.Namespace) -> int:
    path: Path = args.key
    key = _load_any_key(path)
    out: Path = args.out or path.with_suffix(".cert")
    _emit(args, _certify(args, args.root, key, args.role, args.name, out))
    return 0


def _next_stem(out_dir: Path, name: str) -> str:
    n = 1
    while (out_dir / f"{name}-{n}.key").exists() or (out_dir / f"{name}-{n}.pub").exists():
        n += 1
    return f"{name}-{n}"


def _keys_rotate(args: argparse.Namespace) -> int:
    from fedtier.protocol.errors import ConfigError
    from fedtier.protocol.files import atomic_write, save_public_key, save_signing_identity
    from fedtier.protocol.identity import SigningIdentity

    if args.role == "central" and args.root is None:
        raise ConfigError(
            "--role central needs --root: devices accept the new key by its certificate"
        )
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _next_stem(out_dir, args.name)
    ident = SigningIdentity.generate()
    private, public = out_dir / f"{stem}.key", out_dir / f"{stem}.pub"
    save_signing_identity(ident, private)
    save_public_key(ident.verify_key, public)
    info: dict[str, object] = {
        "key_id": ident.key_id,
        "public_key": ident.verify_key.raw.hex(),
        "private_key_file": str(private),
        "public_key_file": str(public),
    }
    if args.root is not None:
        info.update(
            _certify(
                args, args.root, ident.verify_key, args.role, args.name, out_dir / f"{stem}.cert"
            )
        )
    if args.install is not None:
        # Written last: the certificate exists before any daemon can read the new key.
        try:
            atomic_write(args.install, ident.to_pem(), mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.install}: {exc.strerror}") from exc
        info["installed_key_file"] = str(args.install)
    if args.registry is not None:
        start = _parse_time_ms(args.not_before)
        retire = start + int(args.overlap_days * _DAY_MS)
        _rotate_in_registry(args.registry, args.name, ident.verify_key, start, retire)
        info["registry"] = str(args.registry)
        info["old_keys_valid_until_ms"] = retire
    _emit(args, info)
    return 0


def _rotate_in_registry(
    path: Path, name: str, new: VerifyKey, start_ms: int, retire_ms: int
) -> None:
    """Give ``name`` the key ``new`` from ``start_ms`` and end its other keys at ``retire_ms``.

    The file is rewritten in the registry's own format (comments are not kept).
    """
    from fedtier.protocol.errors import ConfigError
    from fedtier.protocol.files import atomic_write, read_toml

    data = read_toml(path, what="key registry")
    table = data.get("keys", {})
    if not isinstance(table, dict):
        raise ConfigError(f"key registry {path}: 'keys' must be a table")
    if name not in table:
        raise ConfigError(f"key registry {path} has no sender {name!r} to rotate")
    entries = table[name] if isinstance(table[name], list) else [table[name]]
    rotated: list[dict[str, object]] = []
    for entry in entries:
        item = dict(entry) if isinstance(entry, dict) else {"public_key": entry}
        if str(item.get("public_key", "")).lower() == new.raw.hex():
            continue
        end = item.get("not_after")
        end_ms = _toml_ms(end) if end is not None else None
        if end_ms is None or end_ms > retire_ms:
            item["not_after"] = retire_ms
        rotated.append(item)
    rotated.append({"public_key": new.raw.hex(), "not_before": start_ms})
    table[name] = rotated
    lines = ["[keys]"]
    for sender, value in table.items():
        lines.append(f"{json.dumps(sender)} = {_toml_entry(value)}")
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def _toml_ms(value: object) -> int | None:
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1000)
    return value if isinstance(value, int) else None


def _toml_entry(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    assert isinstance(value, list)
    items = []
    for item in value:
        fields = []
        for k, v in item.items() if isinstance(item, dict) else [("public_key", item)]:
            text = v.isoformat() if isinstance(v, dt.datetime) else json.dumps(v)
            fields.append(f"{k} = {text}")
        items.append("    { " + ", ".join(fields) + " },")
    return "[\n" + "\n".join(items) + "\n]"


def _keys_revoke(args: argparse.Namespace) -> int:
    from fedtier.protocol.certificates import open_revocations, sign_revocations
    from fedtier.protocol.errors import ConfigError, LocalProtocolError, RemoteProtocolError
    from fedtier.protocol.files import atomic_write, load_signing_identity

    signer = load_signing_identity(args.signer)
    out: Path = args.out
    key_ids = set(args.key_id) | {_load_any_key(p).key_id for p in args.key}
    names = set(args.name)
    serial = 1
    if out.exists():
        try:
            held = open_revocations(
                out.read_bytes(), {signer.key_id: signer.verify_key}, args.fleet
            )
        except RemoteProtocolError as exc:
            raise ConfigError(
                f"{out} is not a revocation list signed by {args.signer} for fleet "
                f"{args.fleet!r}: {exc}"
            ) from exc
        key_ids |= held.key_ids
        names |= held.names
        serial = held.serial + 1
    if not key_ids and not names:
        raise ConfigError("name at least one --key-id, --key or --name to revoke")
    if args.tls_cert and args.tls_ca is None:
        raise ConfigError("--tls-cert needs --tls-ca, the folder of the fleet's TLS CA")
    issued = _now_ms()
    try:
        data = sign_revocations(
            signer,
            fleet=args.fleet,
            serial=serial,
            issued_ms=issued,
            next_update_ms=issued + int(args.next_update_days * _DAY_MS),
            key_ids=key_ids,
            names=names,
        )
    except LocalProtocolError as exc:
        raise ConfigError(str(exc)) from exc
    atomic_write(out, data)
    info: dict[str, object] = {
        "revocation_list": str(out),
        "serial": serial,
        "issuer": signer.key_id,
        "key_ids": sorted(key_ids),
        "names": sorted(names),
    }
    if args.tls_ca is not None:
        crl, serials = _revoke_tls(args.tls_ca, args.tls_cert)
        info["crl_file"] = str(crl)
        info["tls_serials_revoked"] = [f"{s:x}" for s in serials]
    _emit(args, info)
    return 0
