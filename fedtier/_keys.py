"""``fedtier keys new|show``: create and inspect Ed25519 key files; imports protocol only.

Every participant (device, daemon, operator) needs it, so it lives in the
installed namespace's top-level package rather than with one part; the key
files themselves are read and written by ``fedtier.protocol.files``.

One naming everywhere: ``NAME.key`` is the private key (PKCS#8 PEM, mode
0600) and ``NAME.pub`` the public key (PEM). The examples in ``deploy/``, the
docs, the simulator and the key registry folders (which read ``*.pub``) all
use it, so a key made here is registered by copying its ``.pub`` file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    show = keys_sub.add_parser("show", help="print the key id and public key of a key file")
    show.add_argument("path", type=Path, help="a .key or .pub PEM file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_keys_show)


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
    try:
        key = load_public_key(path)
    except KeyFileError:
        key = load_signing_identity(path).verify_key
    _print_key(args, key.key_id, key.raw.hex(), source=path)
    return 0


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
