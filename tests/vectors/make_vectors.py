"""Writes the language-neutral test vectors in tests/vectors/*.json.

Run ``python -m tests.vectors.make_vectors``.

The vectors are committed; ``tests/unit/test_vectors.py`` checks the code
against the committed files, so regenerating them is a deliberate act that
shows up in review. Values are tagged so that any language can rebuild the
exact msgpack types: ``{"uint": 7}``, ``{"float64": 0.5}``, ``{"str": "x"}``,
``{"bin": "hex"}``, ``{"array": [...]}``, ``{"map": [[key, value], ...]}``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import SIGNING_CONTEXT, seal
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout, TensorSpec
from fedtier.protocol.messages import DeviceUpdate, Message, Receipt, ReceiptStatus
from tests.samples import DELTA, KEYS, LAYOUT, SIGNERS, all_samples

HERE = Path(__file__).parent


def tag(value: Any) -> Any:
    """Tag a decoded msgpack value with its wire type."""
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"uint": value} if value >= 0 else {"int": value}
    if isinstance(value, float):
        return {"float64": value}
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, list):
        return {"array": [tag(v) for v in value]}
    if isinstance(value, dict):
        return {"map": [[k, tag(v)] for k, v in value.items()]}
    raise TypeError(type(value))


def identity_vectors() -> list[dict[str, str]]:
    seeds = [bytes(32), bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))]
    out = []
    for seed in seeds:
        ident = SigningIdentity.from_seed(seed)
        out.append(
            {
                "seed": seed.hex(),
                "public_key": ident.verify_key.raw.hex(),
                "key_id": ident.key_id,
                "message": b"fedtier".hex(),
                "signature": ident.sign(b"fedtier").hex(),
            }
        )
    return out


def layout_vectors() -> list[dict[str, Any]]:
    layouts = [
        LAYOUT,
        ModelLayout(
            (
                TensorSpec("conv.weight", "float16", (4, 1, 3, 3)),
                TensorSpec("bn.running_mean", "float32", (4,)),
                TensorSpec("scale", "float64", ()),
                TensorSpec("emb", "bfloat16", (0, 8)),
            )
        ),
    ]
    return [
        {
            "tensors": layout.to_wire(),
            "num_params": layout.num_params,
            "canonical_bytes": layout.canonical_bytes.hex(),
            "fingerprint": layout.fingerprint.hex(),
        }
        for layout in layouts
    ]


def codec_vectors() -> list[dict[str, Any]]:
    # Deterministic encoders only: stochastic rounding depends on a PRNG that other
    # languages need not reproduce, and a decoder does not care how q was chosen.
    rng = np.random.default_rng(11)
    inputs = {
        "small": DELTA,
        "ramp40": np.linspace(-3.0, 5.0, 40, dtype=np.float32),
        "gauss64": rng.standard_normal(64).astype(np.float32),
    }
    specs = [
        ("small", CodecSpec("f32")),
        ("small", CodecSpec("f16")),
        ("small", CodecSpec("i8", chunk=4)),
        ("ramp40", CodecSpec("i8", chunk=16)),
        ("small", CodecSpec("f16", k=3, index="u32")),
        ("gauss64", CodecSpec("i8", chunk=8, k=10, index="u32")),
        ("gauss64", CodecSpec("i8", chunk=512, k=10, index="varint")),
        ("gauss64", CodecSpec("f32", k=64, index="varint")),
    ]
    out = []
    from fedtier.protocol.codecs import decode

    for name, spec in specs:
        x = inputs[name]
        payload = encode(x, spec)
        out.append(
            {
                "name": str(spec),
                "codec": tag(spec.to_wire()),
                "num_params": int(x.size),
                "input_f32": x.astype("<f4").tobytes().hex(),
                "payload": payload.hex(),
                "decoded_f32": decode(payload, spec, x.size).astype("<f4").tobytes().hex(),
            }
        )
    return out


def deferral_samples() -> list[tuple[Message, bytes]]:
    """Receipts that are not final for the device: a ``rate_limited`` one with retry_after_ms."""
    accepted = next(m for m, _ in all_samples() if isinstance(m, Receipt))
    assert isinstance(accepted, Receipt)
    limited = dataclasses.replace(
        accepted,
        seq=accepted.seq + 1,
        status=ReceiptStatus.REJECTED,
        reason="rate_limited",
        retry_after_ms=1500,
    )
    return [(limited, b"")]


def envelope_vectors() -> list[dict[str, Any]]:
    out = []
    for msg, payload in [*all_samples(), *deferral_samples()]:
        signer = SIGNERS[msg.sender]
        data = seal(msg, payload, signer)
        _version, header, body, signature = msgpack.unpackb(data)
        out.append(
            {
                "kind": msg.KIND.value,
                "signer_seed": signer.seed().hex(),
                "signer_key_id": signer.key_id,
                "header_fields": tag(msgpack.unpackb(header))["map"],
                "header": header.hex(),
                "signed_bytes": (SIGNING_CONTEXT + header).hex(),
                "payload": body.hex(),
                "signature": signature.hex(),
                "envelope": data.hex(),
            }
        )
    return out


def invalid_vectors() -> list[dict[str, Any]]:
    """Envelopes a receiver must reject, each with the reason token it should count."""
    update, payload = all_samples()[0]
    good = seal(update, payload, SIGNERS[update.sender])
    version, header, body, signature = msgpack.unpackb(good)
    fields = msgpack.unpackb(header)
    device = SIGNERS[update.sender]

    def resign(new_fields: dict[str, Any], new_body: bytes = body) -> bytes:
        h = msgpack.packb(new_fields)
        return msgpack.packb([version, h, new_body, device.sign(SIGNING_CONTEXT + h)])

    cases: list[tuple[str, str, bytes]] = [
        (
            "payload byte flipped",
            "digest_mismatch",
            msgpack.packb([version, header, bytes([body[0] ^ 1]) + body[1:], signature]),
        ),
        (
            "header byte changed",
            "bad_signature",
            msgpack.packb([version, header.replace(b"acme", b"acmf"), body, signature]),
        ),
        (
            "signed by another key",
            "bad_signature",
            msgpack.packb(
                [
                    version,
                    header,
                    body,
                    SIGNERS[next(k for k in KEYS if k != update.sender)].sign(
                        SIGNING_CONTEXT + header
                    ),
                ]
            ),
        ),
        ("version 2", "unsupported_version", msgpack.packb([2, header, body, signature])),
        ("truncated", "malformed", good[:-1]),
        ("trailing byte", "malformed", good + b"\x00"),
        ("three items", "malformed", msgpack.packb([version, header, body])),
        ("unknown field", "malformed", resign({**fields, "color": "red"})),
        ("missing field", "malformed", resign({k: v for k, v in fields.items() if k != "seq"})),
        ("bool as integer", "malformed", resign({**fields, "n_samples": True})),
        (
            "payload too short for codec",
            "malformed",
            resign({**fields, "payload_size": len(body) - 1}, body[:-1]),
        ),
        ("num_params above cap", "too_large", resign({**fields, "num_params": 2**40})),
        # Structure caps (docs/protocol.md section 10.1), refused before msgpack builds anything.
        ("header nests 5 deep", "too_large", resign({**fields, "n_samples": [[[[]]]]})),
        ("header holds 4 maps", "too_large", resign({**fields, "metrics": {"loss": {}}})),
        (
            "header map of 22 entries",
            "too_large",
            resign({**fields, **{f"x{i}": 0 for i in range(22 - len(fields))}}),
        ),
        (
            "extension type in header",
            "malformed",
            resign({**fields, "n_samples": msgpack.ExtType(1, b"x")}),
        ),
        (
            "array in the envelope's version slot",
            "too_large",
            msgpack.packb([[version], header, body, signature]),
        ),
    ]
    return [
        {"case": case, "reason": reason, "envelope": data.hex()} for case, reason, data in cases
    ]


def receipt_vectors() -> dict[str, Any]:
    """What an edge's receipt says about bytes that arrived on a device's update topic.

    docs/protocol.md section 4.2: the receipt goes to the topic's device, never
    to the sender the bytes claim, and echoes the update id and seq whenever the
    header decoded (zeros when it did not), so the device can match it.
    """
    update, payload = all_samples()[0]
    assert isinstance(update, DeviceUpdate)
    device = SIGNERS[update.sender]
    good = seal(update, payload, device)
    version, header, body, _signature = msgpack.unpackb(good)
    stranger = SigningIdentity.from_seed(bytes(range(96, 128)))
    theirs = dataclasses.replace(
        update, sender=stranger.key_id, update_id=bytes.fromhex("f0" * 16), seq=11
    )
    known_other = SIGNERS[next(k for k in KEYS if k != update.sender)]
    echoed = (update.update_id, update.seq)
    nothing = (bytes(16), 0)
    cases: list[tuple[str, str, bytes, tuple[bytes, int]]] = [
        (
            "signed by another key",
            "bad_signature",
            msgpack.packb([version, header, body, known_other.sign(SIGNING_CONTEXT + header)]),
            echoed,
        ),
        (
            "payload byte flipped",
            "digest_mismatch",
            msgpack.packb([version, header, bytes([body[0] ^ 1]) + body[1:], _signature]),
            echoed,
        ),
        (
            "another device's update on this topic",
            "malformed",
            seal(theirs, payload, stranger),
            (theirs.update_id, theirs.seq),
        ),
        ("not an envelope", "malformed", b"\x94\x01garbage", nothing),
        ("version 2", "unsupported_version", msgpack.packb([2, header, body, _signature]), nothing),
    ]
    return {
        "keys": {device.key_id: device.verify_key.raw.hex()},
        "cases": [
            {
                "case": case,
                "topic_device": device.key_id,
                "reason": reason,
                "envelope": data.hex(),
                "receipt": {
                    "device": device.key_id,
                    "status": "rejected",
                    "reason": reason,
                    "update_id": update_id.hex(),
                    "update_seq": seq,
                },
            }
            for case, reason, data, (update_id, seq) in cases
        ],
    }


def main() -> None:
    files = {
        "identity.json": identity_vectors(),
        "layout.json": layout_vectors(),
        "codecs.json": codec_vectors(),
        "envelopes.json": envelope_vectors(),
        "invalid.json": invalid_vectors(),
    }
    keys = {k: v.raw.hex() for k, v in KEYS.items()}
    files["invalid.json"] = {"keys": keys, "cases": files["invalid.json"]}  # type: ignore[assignment]
    files["receipts.json"] = receipt_vectors()  # type: ignore[assignment]
    for name, content in files.items():
        (HERE / name).write_text(json.dumps(content, indent=1) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
