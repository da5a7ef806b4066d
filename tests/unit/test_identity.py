from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedtier.protocol.errors import KeyFileError, LocalProtocolError, SignatureError
from fedtier.protocol.files import (
    load_public_key,
    load_signing_identity,
    save_public_key,
    save_signing_identity,
)
from fedtier.protocol.identity import SigningIdentity, VerifyKey, key_id_for, valid_key_id


def test_key_id_is_stable_and_topic_safe() -> None:
    ident = SigningIdentity.from_seed(bytes(32))
    assert ident.key_id == key_id_for(ident.verify_key.raw)
    assert SigningIdentity.from_seed(bytes(32)).key_id == ident.key_id
    assert valid_key_id(ident.key_id)
    assert len(ident.key_id) == 24
    assert SigningIdentity.from_seed(b"\x01" * 32).key_id != ident.key_id


def test_sign_and_verify_round_trip_and_tamper() -> None:
    ident = SigningIdentity.generate()
    sig = ident.sign(b"hello")
    ident.verify_key.verify(sig, b"hello")
    with pytest.raises(SignatureError, match=ident.key_id):
        ident.verify_key.verify(sig, b"hellp")
    other = SigningIdentity.generate()
    with pytest.raises(SignatureError):
        other.verify_key.verify(sig, b"hello")


def test_private_key_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    ident = SigningIdentity.generate()
    path = tmp_path / "device.key"
    save_signing_identity(ident, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_identity(path).key_id == ident.key_id
    with pytest.raises(KeyFileError, match="already exists"):
        save_signing_identity(SigningIdentity.generate(), path)
    assert load_signing_identity(path).key_id == ident.key_id


def test_loading_refuses_a_world_readable_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    save_signing_identity(SigningIdentity.generate(), path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="0644"):
        load_signing_identity(path)


def test_loading_garbage_and_missing_files_is_a_key_file_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not a key")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_signing_identity(bad)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_signing_identity(tmp_path / "missing.pem")
    with pytest.raises(KeyFileError):
        load_public_key(bad)


def test_public_key_round_trips_through_pem_and_hex(tmp_path: Path) -> None:
    ident = SigningIdentity.generate()
    path = tmp_path / "device.pub"
    save_public_key(ident.verify_key, path)
    assert load_public_key(path) == ident.verify_key
    assert VerifyKey.from_hex(ident.verify_key.raw.hex()) == ident.verify_key
    with pytest.raises(LocalProtocolError):
        VerifyKey(b"short")
    with pytest.raises(LocalProtocolError):
        VerifyKey.from_hex("zz")


def test_keys_round_trip_through_pem_bytes() -> None:
    ident = SigningIdentity.generate()
    assert SigningIdentity.from_pem(ident.to_pem()).key_id == ident.key_id
    assert VerifyKey.from_pem(ident.verify_key.to_pem()) == ident.verify_key
    with pytest.raises(LocalProtocolError, match="not an unencrypted PEM private key"):
        SigningIdentity.from_pem(ident.verify_key.to_pem())
    with pytest.raises(LocalProtocolError, match="not a PEM public key"):
        VerifyKey.from_pem(b"garbage")


def test_a_private_key_is_0600_from_creation_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    save_signing_identity(SigningIdentity.generate(), path)
    save_public_key(SigningIdentity.generate().verify_key, tmp_path / "k.pub")
    save_public_key(SigningIdentity.generate().verify_key, tmp_path / "k.pub")  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem", "k.pub"]
    with pytest.raises(KeyFileError, match="cannot create key file"):
        save_signing_identity(SigningIdentity.generate(), tmp_path / "missing" / "k.pem")
