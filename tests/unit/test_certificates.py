"""Key certificates, revocation lists, who may sign models, and key registries over time.

The vectors in tests/vectors/certificates.json are derived again here from
their seeds, and each verification case is checked twice: by this
implementation, and by a plain reading of docs/protocol.md (msgpack and
Ed25519 only, no fedtier code) as a client in another language would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtier.protocol.certificates import (
    KeyRole,
    ModelSigners,
    issue_certificate,
    open_certificate,
    open_revocations,
    parse_revocations,
    sign_revocations,
)
from fedtier.protocol.envelope import seal
from fedtier.protocol.errors import (
    ConfigError,
    DecodeError,
    LimitExceeded,
    Reason,
    RemoteProtocolError,
    UpdateRejected,
)
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.messages import ModelAnnouncement
from fedtier.protocol.models import open_model_pointer
from fedtier.tiers.registry import KeyRegistry
from tests.vectors.make_certificate_vectors import DAY, T0, certificate_vectors

VECTORS = Path(__file__).parent.parent / "vectors" / "certificates.json"
ROOT = SigningIdentity.from_seed(b"\x51" * 32)
CENTRAL_1 = SigningIdentity.from_seed(b"\x52" * 32)
CENTRAL_2 = SigningIdentity.from_seed(b"\x53" * 32)
DEVICE = SigningIdentity.from_seed(b"\x54" * 32)


def certify(subject: SigningIdentity, start: int, end: int, *, serial: int = 1) -> bytes:
    return issue_certificate(
        ROOT,
        subject.verify_key,
        role=KeyRole.CENTRAL,
        name="central",
        not_before_ms=start,
        not_after_ms=end,
        serial=serial,
    )


def pointer(signer: SigningIdentity, version: int, created_ms: int) -> bytes:
    message = ModelAnnouncement(
        fleet="acme",
        sender=signer.key_id,
        seq=version + 1,
        created_ms=created_ms,
        version=version,
        layout=b"\x00" * 16,
        num_params=4,
        blob_blake3=b"\x00" * 32,
        blob_size=16,
        update_count=0,
    )
    return seal(message, b"", signer)


# -- vectors ------------------------------------------------------------------------


def test_committed_vectors_are_what_the_seeds_give() -> None:
    assert json.loads(VECTORS.read_text()) == json.loads(json.dumps(certificate_vectors()))


def _reference_verdict(case: dict[str, Any], vectors: dict[str, Any]) -> str:
    """docs/protocol.md's verifier steps, written with msgpack and Ed25519 only."""
    data = bytes.fromhex(case["certificate"])
    version, body, signature = msgpack.unpackb(data)
    assert version == 1
    fields = msgpack.unpackb(body)
    root = bytes.fromhex(vectors["root"]["public_key"])
    if fields["issuer"] != vectors["root"]["key_id"]:
        return "unknown_sender"
    try:
        Ed25519PublicKey.from_public_bytes(root).verify(
            signature, bytes.fromhex(vectors["contexts"]["certificate"]) + body
        )
    except InvalidSignature:
        return "bad_signature"
    if fields["role"] != case["role"]:
        return "unknown_sender"
    if not fields["not_before_ms"] <= case["at_ms"] < fields["not_after_ms"]:
        return "unknown_sender"
    revoked = vectors["revocations"]["fields"]
    if case["with_revocations"] and (
        fields["key_id"] in revoked["key_ids"] or fields["name"] in revoked["names"]
    ):
        return "revoked"
    return "ok"


def test_each_vector_case_gets_its_answer_here_and_from_the_spec() -> None:
    vectors = json.loads(VECTORS.read_text())
    root = VerifyKey.from_hex(vectors["root"]["public_key"])
    revocations = open_revocations(
        bytes.fromhex(vectors["revocations"]["document"]), {root.key_id: root}, "acme"
    )
    assert len(vectors["cases"]) >= 8
    for case in vectors["cases"]:
        try:
            open_certificate(
                bytes.fromhex(case["certificate"]),
                root,
                role=KeyRole(case["role"]),
                at_ms=case["at_ms"],
                revocations=revocations if case["with_revocations"] else None,
            )
            got = "ok"
        except RemoteProtocolError as exc:
            got = exc.reason.value
        assert got == case["expect"], case["name"]
        assert _reference_verdict(case, vectors) == case["expect"], case["name"]


def test_vector_signing_bytes_are_the_context_and_the_body() -> None:
    vectors = json.loads(VECTORS.read_text())
    root = Ed25519PublicKey.from_public_bytes(bytes.fromhex(vectors["root"]["public_key"]))
    for cert in vectors["certificates"]:
        root.verify(bytes.fromhex(cert["signature"]), bytes.fromhex(cert["signing_bytes"]))
        assert cert["signing_bytes"] == vectors["contexts"]["certificate"] + cert["body"]
    rev = vectors["revocations"]
    root.verify(bytes.fromhex(rev["signature"]), bytes.fromhex(rev["signing_bytes"]))


# -- certificates -------------------------------------------------------------------


def test_a_certificate_round_trips_and_knows_its_window() -> None:
    data = certify(CENTRAL_1, T0, T0 + DAY, serial=9)
    cert = open_certificate(data, ROOT.verify_key, role=KeyRole.CENTRAL, at_ms=T0)
    assert (cert.key_id, cert.serial, cert.name) == (CENTRAL_1.key_id, 9, "central")
    assert cert.valid_at(T0 + DAY - 1)
    assert not cert.valid_at(T0 + DAY)
    assert not cert.valid_at(T0 - 1)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: d[:-3], DecodeError),
        (lambda d: d + b"\x00", DecodeError),
        (lambda d: b"\x00" * 2000, LimitExceeded),
        (lambda d: msgpack.packb([2, b"x", b"\x00" * 64]), DecodeError),
        (lambda d: msgpack.packb([1, msgpack.packb({"issuer": 1}), b"\x00" * 64]), DecodeError),
    ],
)
def test_malformed_certificates_are_refused_before_any_crypto(mutate: Any, error: Any) -> None:
    with pytest.raises(error):
        open_certificate(mutate(certify(CENTRAL_1, T0, T0 + DAY)), ROOT.verify_key)


def test_a_certificate_whose_key_id_is_not_its_key_is_malformed() -> None:
    _v, body, _sig = msgpack.unpackb(certify(CENTRAL_1, T0, T0 + DAY))
    fields = msgpack.unpackb(body)
    fields["key_id"] = CENTRAL_2.key_id
    forged_body = msgpack.packb(fields)
    forged = msgpack.packb([1, forged_body, ROOT.sign(b"fedtier-v1-keycert\x00" + forged_body)])
    with pytest.raises(DecodeError, match="not the id of its public key"):
        open_certificate(forged, ROOT.verify_key)


def test_an_envelope_signature_never_verifies_as_a_certificate() -> None:
    """Domain separation: the root signing other bytes never makes a certificate."""
    _v, body, _sig = msgpack.unpackb(certify(CENTRAL_1, T0, T0 + DAY))
    confused = msgpack.packb([1, body, ROOT.sign(b"fedtier-v1-envelope\x00" + body)])
    with pytest.raises(RemoteProtocolError) as info:
        open_certificate(confused, ROOT.verify_key)
    assert info.value.reason is Reason.BAD_SIGNATURE


# -- revocation lists ---------------------------------------------------------------


def test_a_revocation_list_names_keys_and_names() -> None:
    data = sign_revocations(
        ROOT,
        fleet="acme",
        serial=3,
        issued_ms=T0,
        next_update_ms=T0 + DAY,
        key_ids=[DEVICE.key_id],
        names=["veh-0099"],
    )
    rl = open_revocations(data, {ROOT.key_id: ROOT.verify_key}, "acme")
    assert rl.serial == 3
    assert rl.revokes(DEVICE.key_id)
    assert rl.revokes(CENTRAL_1.key_id, "veh-0099")
    assert not rl.revokes(CENTRAL_1.key_id, "veh-0001")
    assert rl.overdue(T0 + DAY)
    assert not rl.overdue(T0 + DAY - 1)
    # Same content, same bytes: sorted ids and names.
    again = sign_revocations(
        ROOT,
        fleet="acme",
        serial=3,
        issued_ms=T0,
        next_update_ms=T0 + DAY,
        key_ids=[DEVICE.key_id, DEVICE.key_id],
        names=["veh-0099"],
    )
    assert again == data


def test_a_revocation_list_from_a_stranger_or_another_fleet_is_refused() -> None:
    data = sign_revocations(
        DEVICE, fleet="acme", serial=1, issued_ms=T0, next_update_ms=T0 + 1, key_ids=[]
    )
    with pytest.raises(RemoteProtocolError) as info:
        open_revocations(data, {ROOT.key_id: ROOT.verify_key}, "acme")
    assert info.value.reason is Reason.UNKNOWN_SENDER
    other = sign_revocations(ROOT, fleet="other", serial=1, issued_ms=T0, next_update_ms=T0 + 1)
    with pytest.raises(RemoteProtocolError) as info:
        open_revocations(other, {ROOT.key_id: ROOT.verify_key}, "acme")
    assert info.value.reason is Reason.WRONG_FLEET
    body_tampered = bytearray(other)
    body_tampered[-70] ^= 1
    with pytest.raises(RemoteProtocolError):
        open_revocations(bytes(body_tampered), {ROOT.key_id: ROOT.verify_key}, "other")
    parsed, _, _ = parse_revocations(other)
    assert parsed.fleet == "other"


# -- model signers ------------------------------------------------------------------


def test_a_root_pinning_participant_accepts_a_rotated_central_by_time() -> None:
    signers = ModelSigners(root=ROOT.verify_key)
    old = pointer(CENTRAL_1, 5, T0 + 10)
    with pytest.raises(RemoteProtocolError) as info:
        open_model_pointer(old, signers, "acme", limits=_limits())
    assert info.value.reason is Reason.UNKNOWN_SENDER
    signers.add_certificate(certify(CENTRAL_1, T0, T0 + 30 * DAY, serial=1))
    signers.add_certificate(certify(CENTRAL_2, T0 + 20 * DAY, T0 + 400 * DAY, serial=2))
    assert open_model_pointer(old, signers, "acme", _limits())[1].version == 5
    new = pointer(CENTRAL_2, 6, T0 + 21 * DAY)
    assert open_model_pointer(new, signers, "acme", _limits())[1].version == 6
    # The old key after its certificate's end, the new key before its start: refused.
    for late in (pointer(CENTRAL_1, 7, T0 + 30 * DAY), pointer(CENTRAL_2, 7, T0 + DAY)):
        with pytest.raises(RemoteProtocolError) as info:
            open_model_pointer(late, signers, "acme", _limits())
        assert info.value.reason is Reason.UNKNOWN_SENDER
    # Revoking the old key refuses even what it signed inside its window.
    signers.set_revocations(
        open_revocations(
            sign_revocations(
                ROOT,
                fleet="acme",
                serial=1,
                issued_ms=T0,
                next_update_ms=T0 + DAY,
                key_ids=[CENTRAL_1.key_id],
            ),
            {ROOT.key_id: ROOT.verify_key},
            "acme",
        )
    )
    with pytest.raises(RemoteProtocolError) as info:
        open_model_pointer(old, signers, "acme", _limits())
    assert info.value.reason is Reason.REVOKED
    assert open_model_pointer(new, signers, "acme", _limits())[1].version == 6


def test_a_bare_pinned_central_key_still_works_and_certificates_need_a_root() -> None:
    signers = ModelSigners((CENTRAL_1.verify_key,))
    assert open_model_pointer(pointer(CENTRAL_1, 1, 0), signers, "acme", _limits())[1].version == 1
    assert open_model_pointer(pointer(CENTRAL_1, 1, 0), CENTRAL_1.verify_key, "acme", _limits())
    with pytest.raises(RemoteProtocolError):
        signers.add_certificate(certify(CENTRAL_2, T0, T0 + DAY))
    with pytest.raises(RemoteProtocolError):
        open_model_pointer(pointer(CENTRAL_2, 1, T0), signers, "acme", _limits())


def test_a_device_certificate_cannot_sign_models() -> None:
    signers = ModelSigners(root=ROOT.verify_key)
    device_cert = issue_certificate(
        ROOT,
        DEVICE.verify_key,
        role=KeyRole.DEVICE,
        name="veh-1",
        not_before_ms=T0,
        not_after_ms=T0 + DAY,
        serial=4,
    )
    with pytest.raises(RemoteProtocolError) as info:
        signers.add_certificate(device_cert)
    assert info.value.reason is Reason.UNKNOWN_SENDER
    assert not signers.knows(DEVICE.key_id)


def _limits() -> Any:
    from fedtier.protocol.limits import DEFAULT_LIMITS

    return DEFAULT_LIMITS


# -- key registries over time -------------------------------------------------------


def test_a_registry_holds_several_keys_per_sender_with_windows(tmp_path: Path) -> None:
    old, new = CENTRAL_1.verify_key, CENTRAL_2.verify_key
    path = tmp_path / "edges.toml"
    path.write_text(
        "[keys]\n"
        f'edge-north = [\n  {{ public_key = "{old.raw.hex()}", not_after = {T0 + DAY} }},\n'
        f'  {{ public_key = "{new.raw.hex()}", not_before = 2025-11-28T12:00:00Z }},\n]\n'
        f'edge-south = "{DEVICE.verify_key.raw.hex()}"\n'
    )
    now = [T0]
    registry = KeyRegistry([path], role="edge", clock_ms=lambda: now[0])
    assert len(registry) == 3
    assert registry.name_of(new.key_id) == "edge-north"
    assert registry.get(old.key_id) == old
    assert registry.get(new.key_id) is None  # before 12:00
    now[0] = T0 + DAY // 2
    assert registry.get(old.key_id) == old
    assert registry.get(new.key_id) == new
    now[0] = T0 + DAY
    assert registry.get(old.key_id) is None
    assert registry.get(new.key_id) == new
    assert registry.get(DEVICE.key_id) == DEVICE.verify_key


def test_a_registry_refuses_a_revoked_key_or_name_with_revoked(tmp_path: Path) -> None:
    registry = KeyRegistry.from_keys(
        {"veh-1": DEVICE.verify_key, "veh-2": CENTRAL_1.verify_key}, role="device"
    )
    registry.set_revocations(
        open_revocations(
            sign_revocations(
                ROOT, fleet="acme", serial=2, issued_ms=T0, next_update_ms=T0 + 1, names=["veh-2"]
            ),
            {ROOT.key_id: ROOT.verify_key},
            "acme",
        )
    )
    assert registry.get(DEVICE.key_id) == DEVICE.verify_key
    with pytest.raises(UpdateRejected) as info:
        registry.get(CENTRAL_1.key_id)
    assert info.value.reason is Reason.REVOKED


@pytest.mark.parametrize(
    "entry",
    [
        '[{ public_key = "00" }]',
        "[]",
        f'[{{ public_key = "{"ab" * 32}", not_before = 5, not_after = 5 }}]',
        f'[{{ public_key = "{"ab" * 32}", colour = 1 }}]',
        f'[{{ public_key = "{"ab" * 32}", not_after = 2025-11-28T12:00:00 }}]',
    ],
)
def test_bad_registry_entries_are_config_errors(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f"[keys]\nx = {entry}\n")
    with pytest.raises(ConfigError):
        KeyRegistry([path])


def test_a_device_config_pins_the_root_beside_the_central_key(tmp_path: Path) -> None:
    from fedtier.client.config import load_device_settings
    from fedtier.protocol.files import save_public_key

    save_public_key(DEVICE.verify_key, tmp_path / "edge.pub")
    config = tmp_path / "device.toml"
    config.write_text(
        '[device]\nfleet = "acme"\nsite = "site-1"\nidentity_key = "device.key"\n'
        'outbox = "outbox.sqlite"\n\n'
        '[central]\npublic_key = "central.pub"\nroot_key = "keys/root.pub"\n\n'
        '[edges]\npublic_keys = ["edge.pub"]\n\n[mqtt]\nhost = "localhost"\nport = 1884\n'
    )
    settings = load_device_settings(config, require_data=False)
    assert settings.root_key == tmp_path / "keys" / "root.pub"
    # The root alone is enough; with neither, the central key is required.
    config.write_text(config.read_text().replace('public_key = "central.pub"\n', ""))
    settings = load_device_settings(config, require_data=False)
    assert settings.central_key is None
    assert settings.root_key is not None
    config.write_text(config.read_text().replace('root_key = "keys/root.pub"\n', ""))
    with pytest.raises(ConfigError, match="public_key"):
        load_device_settings(config, require_data=False)


def test_a_tier_config_reads_the_key_lifecycle_settings(tmp_path: Path) -> None:
    from fedtier.tiers.config import load_config

    path = tmp_path / "edge.toml"
    minimal = (
        'fleet = "acme"\nsite = "s1"\nregion = "r1"\nidentity_key = "k.pem"\n'
        'state_dir = "state"\n[keys]\nsenders = "devices.toml"\ncentral = "central.pub"\n'
    )
    path.write_text(minimal)
    config = load_config("edge", path)
    assert (config.root_key, config.certificates, config.revocations) == ("", (), None)
    assert config.revocation_poll_s == 30.0
    path.write_text(
        minimal + 'root = "keys/root.pub"\ncertificates = ["keys/central.cert"]\n'
        'revocations = "keys/revocations.bin"\nrevocation_poll_s = 5\n'
    )
    config = load_config("edge", path)
    assert config.root_key == str(tmp_path / "keys" / "root.pub")
    assert config.certificates == (tmp_path / "keys" / "central.cert",)
    assert config.revocations == tmp_path / "keys" / "revocations.bin"
    assert config.revocation_poll_s == 5.0
    path.write_text(minimal + "revocation_poll_s = 0\n")
    with pytest.raises(ConfigError, match="revocation_poll_s"):
        load_config("edge", path)


def test_the_central_still_reads_back_versions_of_its_own_revoked_key() -> None:
    signers = ModelSigners((CENTRAL_2.verify_key,), root=ROOT.verify_key)
    signers.add_certificate(certify(CENTRAL_1, T0, T0 + DAY))
    signers.set_revocations(
        open_revocations(
            sign_revocations(
                ROOT,
                fleet="acme",
                serial=1,
                issued_ms=T0,
                next_update_ms=T0 + 1,
                key_ids=[CENTRAL_1.key_id],
            ),
            {ROOT.key_id: ROOT.verify_key},
            "acme",
        )
    )
    with pytest.raises(UpdateRejected):
        signers.lookup(CENTRAL_1.key_id)
    assert signers.known_key(CENTRAL_1.key_id) == CENTRAL_1.verify_key


async def test_revocation_follower_takes_newer_lists_only_and_publishes_the_file(
    tmp_path: Path,
) -> None:
    import logging

    from fedtier.tiers.model_registry import MemoryModelRegistry, RevocationFollower
    from fedtier.tiers.registry import TierKeys

    def rl(serial: int, *names: str, signer: SigningIdentity = ROOT) -> bytes:
        return sign_revocations(
            signer, fleet="acme", serial=serial, issued_ms=T0, next_update_ms=T0 + 1, names=names
        )

    registry = MemoryModelRegistry()
    keys = TierKeys(
        CENTRAL_1,
        KeyRegistry.from_keys({"veh-1": DEVICE.verify_key}, role="device"),
        CENTRAL_1.verify_key,
        root=ROOT.verify_key,
    )
    path = tmp_path / "revocations.bin"
    follower = RevocationFollower(
        keys,
        fleet="acme",
        registry=registry,
        path=path,
        poll_s=1.0,
        log=logging.getLogger("test"),
        publish=registry,
    )

    def serial() -> int | None:
        return None if follower.current is None else follower.current.serial

    await follower.poll_once()  # no file yet: nothing in force, nothing published
    assert serial() is None
    assert await registry.revocations() is None
    path.write_bytes(rl(2, "veh-1"))
    await follower.poll_once()
    assert serial() == 2
    assert await registry.revocations() == path.read_bytes()
    with pytest.raises(UpdateRejected):
        keys.senders.get(DEVICE.key_id)
    # An older list (a replayed KV value, an old file) changes nothing; a forged one neither.
    assert not follower.offer(rl(1), "replay")
    assert not follower.offer(rl(3, signer=DEVICE), "forgery")
    assert serial() == 2
    # A newer list from the registry replaces it, and lifts what it no longer names.
    await registry.put_revocations(rl(3, "veh-9"))
    path.unlink()
    await follower.poll_once()
    assert serial() == 3
    assert keys.senders.get(DEVICE.key_id) == DEVICE.verify_key
