"""Writes tests/vectors/certificates.json: key certificates and revocation lists from fixed seeds.

Run ``python -m tests.vectors.make_certificate_vectors``.

Ed25519 signatures and the msgpack bodies are deterministic, so the same
seeds give the same bytes; ``tests/unit/test_certificates.py`` derives them
again and compares, and checks each verification case. Every ``cases`` entry
says what a verifier that follows docs/protocol.md ("Key certificates and
revocation") must answer: ``ok``, or the reason token it refuses with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack

from fedtier.protocol.certificates import (
    CERTIFICATE_CONTEXT,
    REVOCATION_CONTEXT,
    KeyRole,
    issue_certificate,
    sign_revocations,
)
from fedtier.protocol.identity import SigningIdentity

HERE = Path(__file__).parent
ROOT_SEED = bytes(range(100, 132))
OTHER_ROOT_SEED = bytes(range(132, 164))
CENTRAL_SEEDS = (bytes(range(164, 196)), bytes(range(196, 228)))
DEVICE_SEED = bytes(range(1, 33))
T0 = 1_764_288_000_000  # 2025-11-28T00:00:00Z
DAY = 86_400_000


def _split(document: bytes) -> tuple[bytes, bytes]:
    _version, body, signature = msgpack.unpackb(document)
    return body, signature


def certificate_vectors() -> dict[str, Any]:
    root = SigningIdentity.from_seed(ROOT_SEED)
    other_root = SigningIdentity.from_seed(OTHER_ROOT_SEED)
    central_1, central_2 = (SigningIdentity.from_seed(s) for s in CENTRAL_SEEDS)
    device = SigningIdentity.from_seed(DEVICE_SEED)

    def cert(
        signer: SigningIdentity,
        subject: SigningIdentity,
        role: KeyRole,
        serial: int,
        not_before: int,
        not_after: int,
        name: str = "central",
    ) -> bytes:
        return issue_certificate(
            signer,
            subject.verify_key,
            role=role,
            name=name,
            not_before_ms=not_before,
            not_after_ms=not_after,
            serial=serial,
        )

    c1 = cert(root, central_1, KeyRole.CENTRAL, 1, T0, T0 + 30 * DAY)
    c2 = cert(root, central_2, KeyRole.CENTRAL, 2, T0 + 20 * DAY, T0 + 400 * DAY)
    wrong_role = cert(root, device, KeyRole.DEVICE, 3, T0, T0 + 400 * DAY, name="veh-0042")
    other = cert(other_root, central_1, KeyRole.CENTRAL, 1, T0, T0 + 30 * DAY)
    body, signature = _split(c1)
    tampered_body = body[:-1] + bytes([body[-1] ^ 0x01])  # not_after_ms, still a uint
    tampered = msgpack.packb([1, tampered_body, signature], use_bin_type=True)
    revocations = sign_revocations(
        root,
        fleet="acme",
        serial=7,
        issued_ms=T0 + 25 * DAY,
        next_update_ms=T0 + 32 * DAY,
        key_ids=[central_1.key_id, device.key_id],
        names=["veh-0099"],
    )
    r_body, r_signature = _split(revocations)
    c2_body, c2_signature = _split(c2)

    def case(
        name: str, data: bytes, at_ms: int, expect: str, revoked: bool = False
    ) -> dict[str, Any]:
        return {
            "name": name,
            "certificate": data.hex(),
            "role": "central",
            "at_ms": at_ms,
            "with_revocations": revoked,
            "expect": expect,
        }

    return {
        "contexts": {
            "certificate": CERTIFICATE_CONTEXT.hex(),
            "revocations": REVOCATION_CONTEXT.hex(),
        },
        "root": {
            "seed": ROOT_SEED.hex(),
            "public_key": root.verify_key.raw.hex(),
            "key_id": root.key_id,
        },
        "certificates": [
            {
                "subject_seed": seed.hex(),
                "subject_key_id": who.key_id,
                "certificate": data.hex(),
                "body": b.hex(),
                "signing_bytes": (CERTIFICATE_CONTEXT + b).hex(),
                "signature": s.hex(),
                "fields": {
                    k: (v.hex() if isinstance(v, bytes) else v)
                    for k, v in msgpack.unpackb(b).items()
                },
            }
            for seed, who, data, (b, s) in (
                (CENTRAL_SEEDS[0], central_1, c1, (body, signature)),
                (CENTRAL_SEEDS[1], central_2, c2, (c2_body, c2_signature)),
            )
        ],
        "revocations": {
            "document": revocations.hex(),
            "body": r_body.hex(),
            "signing_bytes": (REVOCATION_CONTEXT + r_body).hex(),
            "signature": r_signature.hex(),
            "fields": msgpack.unpackb(r_body),
        },
        "cases": [
            case("valid", c1, T0 + DAY, "ok"),
            case("first millisecond", c1, T0, "ok"),
            case("not yet valid", c2, T0 + DAY, "certificate_not_yet_valid"),
            case("expired (not_after is exclusive)", c1, T0 + 30 * DAY, "certificate_expired"),
            case("overlap: the new key", c2, T0 + 25 * DAY, "ok"),
            case("wrong role", wrong_role, T0 + DAY, "wrong_role"),
            case("another root", other, T0 + DAY, "unknown_sender"),
            case("tampered body", tampered, T0 + DAY, "bad_signature"),
            case("revoked", c1, T0 + DAY, "revoked", revoked=True),
            case("not named by the list", c2, T0 + 25 * DAY, "ok", revoked=True),
        ],
    }


def main() -> None:
    path = HERE / "certificates.json"
    path.write_text(json.dumps(certificate_vectors(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
