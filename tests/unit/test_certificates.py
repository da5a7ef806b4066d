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
        return "wrong_role"
    if case["at_ms"] < fields["not_before_ms"]:
        return "certificate_not_yet_valid"
    if case["at_ms"] >= fields["not_after_ms"]:
        return "certificate_expired"
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
    # The old key after its certificate's end, the new key before its start: refused,
    # each with its typed reason.
    for late, reason in (
        (pointer(CENTRAL_1, 7, T0 + 30 * DAY), Reason.CERTIFICATE_EXPIRED),
        (pointer(CENTRAL_2, 7, T0 + DAY), Reason.CERTIFICATE_NOT_YET_VALID),
    ):
        with pytest.raises(RemoteProtocolError) as info:
            open_model_pointer(late, signers, "acme", _limits())
        assert info.value.reason is reason
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
    assert info.value.reason is Reason.WRONG_ROLE
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


# -- the central's signing key rotated while it runs ---------------------------------------

CENTRAL_3 = SigningIdentity.from_seed(b"\x55" * 32)


def _reload_setup(
    tmp_path: Path, *, root: VerifyKey | None = ROOT.verify_key
) -> tuple[Any, Any, Path, Path]:
    """A central signing with CENTRAL_1; its identity_key file and certificates folder."""
    import logging

    from fedtier.tiers._identity import IdentityReload
    from fedtier.tiers._telemetry import quiet_metrics
    from fedtier.tiers.config import RetrySettings
    from fedtier.tiers.model_registry import MemoryModelRegistry
    from fedtier.tiers.registry import TierKeys

    certs = tmp_path / "certs"
    certs.mkdir(parents=True)
    (certs / "central.cert").write_bytes(certify(CENTRAL_1, T0, T0 + 60 * DAY))
    keys = TierKeys(
        CENTRAL_1,
        KeyRegistry.from_keys({}, role="regional"),
        None if root is not None else CENTRAL_1.verify_key,
        root=root,
        certificates={}
        if root is None
        else {CENTRAL_1.key_id: certify(CENTRAL_1, T0, T0 + 60 * DAY)},
    )
    registry = MemoryModelRegistry()
    identity_key = tmp_path / "central.key"
    reload = IdentityReload(
        keys,
        identity_key=identity_key,
        certificates=[certs],
        registry=registry,
        clock_ms=lambda: T0 + DAY,
        retry=RetrySettings(),
        metrics=quiet_metrics("central", CENTRAL_1.key_id),
        log=logging.getLogger("test"),
    )
    return reload, registry, identity_key, certs


def _install(path: Path, identity: SigningIdentity) -> None:
    from fedtier.protocol.files import atomic_write

    atomic_write(path, identity.to_pem(), mode=0o600)


@pytest.mark.parametrize(
    ("certificate", "reason"),
    [
        (None, "no_certificate"),
        (lambda: certify(CENTRAL_2, T0 - 10 * DAY, T0), "certificate_expired"),
        (lambda: certify(CENTRAL_2, T0 + 5 * DAY, T0 + 60 * DAY), "certificate_not_yet_valid"),
        (
            lambda: issue_certificate(
                ROOT,
                CENTRAL_2.verify_key,
                role=KeyRole.EDGE,
                name="central",
                not_before_ms=T0,
                not_after_ms=T0 + 60 * DAY,
                serial=9,
            ),
            "wrong_role",
        ),
        (
            lambda: issue_certificate(
                CENTRAL_3,
                CENTRAL_2.verify_key,
                role=KeyRole.CENTRAL,
                name="central",
                not_before_ms=T0,
                not_after_ms=T0 + 60 * DAY,
                serial=9,
            ),
            "unknown_sender",
        ),
    ],
)
def test_a_reload_refuses_a_key_the_root_did_not_certify_for_now_and_keeps_the_old(
    tmp_path: Path, certificate: Any, reason: str
) -> None:
    reload, _, identity_key, certs = _reload_setup(tmp_path)
    _install(identity_key, CENTRAL_2)
    if certificate is not None:
        (certs / "central-2.cert").write_bytes(certificate())
    assert reload.request() == reason
    assert reload.refused == {reason: 1}
    assert not reload.pending
    assert reload.keys.identity.key_id == CENTRAL_1.key_id


def test_a_reload_refuses_a_revoked_key_without_a_root_or_an_unreadable_file(
    tmp_path: Path,
) -> None:
    reload, _, identity_key, certs = _reload_setup(tmp_path)
    identity_key.write_text("half a key")
    assert reload.request() == "unreadable_key"
    _install(identity_key, CENTRAL_2)
    (certs / "central-2.cert").write_bytes(certify(CENTRAL_2, T0, T0 + 60 * DAY, serial=2))
    revocations = sign_revocations(
        ROOT, fleet="acme", serial=1, issued_ms=T0, next_update_ms=T0 + DAY,
        key_ids=[CENTRAL_2.key_id],
    )  # fmt: skip
    reload.keys.models.set_revocations(
        open_revocations(revocations, {ROOT.key_id: ROOT.verify_key}, "acme")
    )
    assert reload.request() == "revoked"
    pinned, _, pinned_key, _ = _reload_setup(tmp_path / "pinned", root=None)
    _install(pinned_key, CENTRAL_2)
    assert pinned.request() == "no_root"
    assert reload.keys.identity.key_id == CENTRAL_1.key_id
    assert pinned.keys.identity.key_id == CENTRAL_1.key_id


async def test_a_reload_publishes_the_certificate_then_signs_with_the_new_key(
    tmp_path: Path,
) -> None:
    import trio

    reload, registry, identity_key, certs = _reload_setup(tmp_path)
    _install(identity_key, CENTRAL_1)
    assert reload.request() is None  # the same key: nothing to do
    assert not reload.pending
    document = certify(CENTRAL_2, T0, T0 + 60 * DAY, serial=2)
    (certs / "central-2.cert").write_bytes(document)
    _install(identity_key, CENTRAL_2)
    assert reload.request() is None
    assert reload.pending
    # Until the certificate is in the registry, the old key signs.
    assert reload.keys.identity.key_id == CENTRAL_1.key_id
    assert await registry.certificate(CENTRAL_2.key_id) is None
    async with trio.open_nursery() as nursery:
        await nursery.start(reload.serve)
        with trio.fail_after(5):
            while reload.rotations == 0:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert await registry.certificate(CENTRAL_2.key_id) == document
    assert reload.keys.identity.key_id == CENTRAL_2.key_id
    assert reload.keys.certificates[CENTRAL_2.key_id] == document
    assert reload.keys.models.knows(CENTRAL_2.key_id)
    reload.keys.check_central_identity(T0 + DAY)


def test_keys_that_pin_only_the_root_start_a_follower_and_a_rotated_central(
    tmp_path: Path,
) -> None:
    from fedtier.protocol.files import save_public_key, save_signing_identity
    from fedtier.tiers.registry import TierKeys

    save_public_key(ROOT.verify_key, tmp_path / "root.pub")
    save_signing_identity(CENTRAL_2, tmp_path / "central.key")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "central.cert").write_bytes(certify(CENTRAL_1, T0, T0 + 30 * DAY, serial=1))
    (certs / "central-1.cert").write_bytes(certify(CENTRAL_2, T0 + DAY, T0 + 60 * DAY, serial=2))
    # A restart after the rotation: the certified new key, no [keys] central.
    keys = TierKeys.load(
        tmp_path / "central.key", [], role="regional", root="root.pub", base_dir=tmp_path,
        certificates=[certs],
    )  # fmt: skip
    assert keys.central is None
    assert keys.models.knows(CENTRAL_1.key_id)
    keys.check_central_identity(T0 + 2 * DAY)
    with pytest.raises(ConfigError, match="no certificate valid now"):
        keys.check_central_identity(T0)  # before the new key's certificate starts
    (certs / "central-1.cert").unlink()
    uncertified = TierKeys.load(
        tmp_path / "central.key", [], role="regional", root="root.pub", base_dir=tmp_path,
        certificates=[certs],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no certificate valid now"):
        uncertified.check_central_identity(T0 + 2 * DAY)
    with pytest.raises(ConfigError, match="pin the fleet root"):
        TierKeys.load(tmp_path / "central.key", [], role="edge")


def test_a_tier_config_may_pin_only_the_root(tmp_path: Path) -> None:
    from fedtier.tiers.config import load_config

    path = tmp_path / "edge.toml"
    head = (
        'fleet = "acme"\nsite = "s1"\nregion = "r1"\nidentity_key = "k.pem"\n'
        'state_dir = "state"\n[keys]\nsenders = "devices.toml"\n'
    )
    path.write_text(head + 'root = "keys/root.pub"\n')
    config = load_config("edge", path)
    assert (config.central_key, config.root_key) == ("", str(tmp_path / "keys" / "root.pub"))
    path.write_text(head)
    with pytest.raises(ConfigError, match="pin the fleet root"):
        load_config("edge", path)


def test_a_device_keeps_a_model_whose_certificate_ended_until_a_renewal_covers_it() -> None:
    import numpy as np

    from fedtier.client.model_store import ModelStore, OfferStatus
    from fedtier.protocol.layout import ModelLayout
    from fedtier.tiers.core import seal_version

    layout = ModelLayout.from_arrays({"w": np.zeros(4, np.float32)})
    sealed = seal_version(
        1, np.ones(4, np.float32), layout, identity=CENTRAL_1, fleet="acme",
        created_ms=T0 + 40 * DAY, blob_seq=1, pointer_seq=2, update_count=0,
    )  # fmt: skip
    store = ModelStore(ModelSigners(root=ROOT.verify_key), layout, "acme")
    assert store.offer_certificate(certify(CENTRAL_1, T0, T0 + 30 * DAY, serial=1)).status is (
        OfferStatus.NOTED
    )
    offer = store.offer_blob(sealed.blob)
    assert (offer.status, offer.reason) == (OfferStatus.REJECTED, "certificate_expired")
    renewed = store.offer_certificate(certify(CENTRAL_1, T0, T0 + 90 * DAY, serial=2))
    assert (renewed.status, renewed.version) == (OfferStatus.LOADED, 1)
