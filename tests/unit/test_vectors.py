"""The committed test vectors (tests/vectors/*.json) against this implementation.

Part of each check is an independent reading of docs/protocol.md in plain
Python (struct, no numpy, no fedtier code), the way a client in another
language would implement it.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import Any

import blake3
import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtier.protocol.codecs import CodecSpec, decode, encode
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.errors import RemoteProtocolError
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import Limits
from fedtier.tiers.core import AdmissionRules, ModelView, NothingSeen, admit_update
from fedtier.tiers.registry import KeyRegistry
from fedtier.tiers.staleness import StalenessPolicy

VECTORS = Path(__file__).parent.parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def untag(value: dict[str, Any]) -> Any:
    ((kind, inner),) = value.items()
    if kind == "bin":
        return bytes.fromhex(inner)
    if kind == "array":
        return [untag(v) for v in inner]
    if kind == "map":
        return {k: untag(v) for k, v in inner}
    return inner


# -- an independent reference decoder, written from docs/protocol.md ------------


def ref_values(raw: bytes, values: str, m: int, chunk: int | None) -> list[float]:
    if values == "f32":
        return list(struct.unpack(f"<{m}f", raw))
    if values == "f16":
        return list(struct.unpack(f"<{m}e", raw))
    assert chunk is not None
    n_chunks = math.ceil(m / chunk)
    scales = struct.unpack(f"<{n_chunks}f", raw[: 4 * n_chunks])
    qs = struct.unpack(f"<{m}b", raw[4 * n_chunks :])
    # float32 product, as the spec says: round each value to float32.
    return [
        struct.unpack("<f", struct.pack("<f", q * scales[j // chunk]))[0] for j, q in enumerate(qs)
    ]


def ref_decode(payload: bytes, codec: dict[str, Any], n: int) -> list[float]:
    values, chunk, k, index = (
        codec["values"],
        codec.get("chunk"),
        codec.get("k"),
        codec.get("index"),
    )
    if k is None:
        return ref_values(payload, values, n, chunk)
    value_bytes = {"f32": 4 * k, "f16": 2 * k}.get(values) or 4 * math.ceil(k / chunk) + k
    index_raw, value_raw = (
        payload[: len(payload) - value_bytes],
        payload[len(payload) - value_bytes :],
    )
    if index == "u32":
        indices = list(struct.unpack(f"<{k}I", index_raw))
    else:
        indices, acc, shift, prev = [], 0, 0, 0
        for byte in index_raw:
            acc |= (byte & 0x7F) << shift
            shift += 7
            if byte & 0x80 == 0:
                prev = acc if not indices else prev + acc
                indices.append(prev)
                acc, shift = 0, 0
    out = [0.0] * n
    for i, v in zip(indices, ref_values(value_raw, values, k, chunk), strict=True):
        out[i] = v
    return out


# Structure caps of docs/protocol.md section 10.1 with the default limits:
# depth, maps, arrays, objects, widest map (entries), widest array (items).
DOC_OUTER_CAPS = (1, 0, 1, 5, 0, 4)
DOC_HEADER_CAPS = (4, 3, 8193, 131_379, 21, 65_536)


def ref_structure(raw: bytes) -> tuple[int, int, int, int, int, int]:
    """Depth, maps, arrays, objects, widest map and array of one msgpack value (spec.md)."""
    stats = {"maps": 0, "arrays": 0, "objects": 0, "map": 0, "array": 0}

    def value(pos: int) -> tuple[int, int]:  # (end, depth)
        stats["objects"] += 1
        b = raw[pos]
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            return pos + 1, 0
        if 0xA0 <= b <= 0xBF:
            return pos + 1 + (b & 0x1F), 0
        fixed = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
        fixed |= {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
        if b in fixed:
            return pos + 1 + fixed[b], 0
        prefixed = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I", 0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
        if b in prefixed:
            width = struct.calcsize(prefixed[b])
            (length,) = struct.unpack_from(prefixed[b], raw, pos + 1)
            return pos + 1 + width + length, 0
        if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
            n, pos = (b & 0x0F, pos + 1) if b <= 0x8F else _counted(raw, pos, b == 0xDF)
            stats["maps"] += 1
            stats["map"] = max(stats["map"], n)
            deepest = 0
            for _ in range(n):
                pos, _depth = value(pos)  # keys are strings
                pos, depth = value(pos)
                deepest = max(deepest, depth)
            return pos, 1 + deepest
        if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
            n, pos = (b & 0x0F, pos + 1) if b <= 0x9F else _counted(raw, pos, b == 0xDD)
            stats["arrays"] += 1
            stats["array"] = max(stats["array"], n)
            deepest = 0
            for _ in range(n):
                pos, depth = value(pos)
                deepest = max(deepest, depth)
            return pos, 1 + deepest
        raise ValueError(f"no fedtier value starts with 0x{b:02x}")

    end, depth = value(0)
    assert end == len(raw)
    return (
        depth,
        stats["maps"],
        stats["arrays"],
        stats["objects"],
        stats["map"],
        stats["array"],
    )


def _counted(raw: bytes, pos: int, wide: bool) -> tuple[int, int]:
    fmt = ">I" if wide else ">H"
    return struct.unpack_from(fmt, raw, pos + 1)[0], pos + 1 + struct.calcsize(fmt)


def within(structure: tuple[int, ...], caps: tuple[int, ...]) -> bool:
    return all(s <= c for s, c in zip(structure, caps, strict=True))


# -- the vectors ----------------------------------------------------------------


@pytest.mark.parametrize("vec", load("identity.json"), ids=lambda v: v["key_id"])
def test_identity_vectors(vec: dict[str, str]) -> None:
    seed = bytes.fromhex(vec["seed"])
    ident = SigningIdentity.from_seed(seed)
    assert ident.verify_key.raw.hex() == vec["public_key"]
    assert ident.key_id == vec["key_id"]
    digest = blake3.blake3(bytes.fromhex(vec["public_key"])).digest()[:15]
    assert base64.b32encode(digest).decode().lower() == vec["key_id"]
    # Ed25519 is deterministic: the same seed and message give the same signature.
    raw_sig = Ed25519PrivateKey.from_private_bytes(seed).sign(bytes.fromhex(vec["message"]))
    assert raw_sig.hex() == vec["signature"]
    VerifyKey(ident.verify_key.raw).verify(raw_sig, bytes.fromhex(vec["message"]))


@pytest.mark.parametrize("vec", load("layout.json"), ids=lambda v: v["fingerprint"][:8])
def test_layout_vectors(vec: dict[str, Any]) -> None:
    layout = ModelLayout.from_wire(vec["tensors"])
    assert layout.num_params == vec["num_params"]
    canonical = b"fedtier-v1-layout\x00" + struct.pack(">I", len(vec["tensors"]))
    codes = {"float32": 1, "float16": 2, "bfloat16": 3, "float64": 4}
    for name, dtype, shape in vec["tensors"]:
        raw = name.encode()
        canonical += (
            struct.pack(">H", len(raw)) + raw + struct.pack(">BB", codes[dtype], len(shape))
        )
        canonical += b"".join(struct.pack(">Q", d) for d in shape)
    assert canonical.hex() == vec["canonical_bytes"] == layout.canonical_bytes.hex()
    assert blake3.blake3(canonical).digest()[:16].hex() == vec["fingerprint"]
    assert layout.fingerprint.hex() == vec["fingerprint"]


@pytest.mark.parametrize("vec", load("codecs.json"), ids=lambda v: v["name"])
def test_codec_vectors(vec: dict[str, Any]) -> None:
    wire = untag(vec["codec"])
    spec = CodecSpec.from_wire(wire, num_params=vec["num_params"])
    x = np.frombuffer(bytes.fromhex(vec["input_f32"]), dtype="<f4")
    payload = bytes.fromhex(vec["payload"])
    assert encode(x, spec).hex() == vec["payload"]
    expected = np.frombuffer(bytes.fromhex(vec["decoded_f32"]), dtype="<f4")
    np.testing.assert_array_equal(decode(payload, spec, vec["num_params"]), expected)
    np.testing.assert_array_equal(
        np.array(ref_decode(payload, wire, vec["num_params"]), dtype=np.float32), expected
    )


@pytest.mark.parametrize("vec", load("envelopes.json"), ids=lambda v: v["kind"])
def test_envelope_vectors(vec: dict[str, Any]) -> None:
    fields = {name: untag(value) for name, value in vec["header_fields"]}
    header = msgpack.packb(fields, use_bin_type=True)
    assert header.hex() == vec["header"]
    signed = b"fedtier-v1-envelope\x00" + header
    assert signed.hex() == vec["signed_bytes"]
    payload = bytes.fromhex(vec["payload"])
    assert blake3.blake3(payload).digest() == fields["payload_blake3"]
    assert fields["payload_size"] == len(payload)
    signer = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vec["signer_seed"]))
    assert signer.sign(signed).hex() == vec["signature"]
    envelope = msgpack.packb([1, header, payload, bytes.fromhex(vec["signature"])])
    assert envelope.hex() == vec["envelope"]
    ident = SigningIdentity.from_seed(bytes.fromhex(vec["signer_seed"]))
    assert ident.key_id == vec["signer_key_id"] == fields["sender"]
    assert within(ref_structure(envelope), DOC_OUTER_CAPS)
    assert within(ref_structure(header), DOC_HEADER_CAPS)
    env = open_envelope(envelope, {ident.key_id: ident.verify_key})
    assert env.message.KIND.value == vec["kind"]


def test_invalid_vectors_are_rejected_with_their_reason() -> None:
    doc = load("invalid.json")
    keys = {k: VerifyKey(bytes.fromhex(v)) for k, v in doc["keys"].items()}
    assert len(doc["cases"]) >= 10
    for case in doc["cases"]:
        with pytest.raises(RemoteProtocolError) as info:
            open_envelope(bytes.fromhex(case["envelope"]), keys)
        assert info.value.reason == case["reason"], case["case"]


def test_structure_vectors_break_a_documented_cap() -> None:
    """Each invalid vector that names a structure cap exceeds it, read independently."""
    cases = {c["case"]: bytes.fromhex(c["envelope"]) for c in load("invalid.json")["cases"]}
    _v, header, _p, _s = msgpack.unpackb(cases["header nests 5 deep"])
    assert ref_structure(header)[0] == 5 > DOC_HEADER_CAPS[0]
    _v, header, _p, _s = msgpack.unpackb(cases["header holds 4 maps"])
    assert ref_structure(header)[1] == 4 > DOC_HEADER_CAPS[1]
    _v, header, _p, _s = msgpack.unpackb(cases["header map of 22 entries"])
    assert ref_structure(header)[4] == 22 > DOC_HEADER_CAPS[4]
    assert ref_structure(cases["array in the envelope's version slot"])[0] == 2 > DOC_OUTER_CAPS[0]
    with pytest.raises(ValueError, match="0xd4"):
        ref_structure(msgpack.unpackb(cases["extension type in header"])[1])


def test_receipt_vectors_name_the_topics_device_and_echo_the_update() -> None:
    """What the edge's receipt says about bad bytes on a device's topic (section 4.2)."""
    doc = load("receipts.json")
    senders = KeyRegistry.from_keys(
        {
            f"device-{i}": VerifyKey(bytes.fromhex(raw))
            for i, raw in enumerate(doc["keys"].values())
        },
        role="device",
    )
    layout = ModelLayout.from_wire(load("layout.json")[0]["tensors"])
    rules = AdmissionRules(
        fleet="acme", limits=Limits(), staleness=StalenessPolicy(max_staleness=4)
    )
    assert {c["reason"] for c in doc["cases"]} >= {"bad_signature", "malformed"}
    for case in doc["cases"]:
        decision = admit_update(
            bytes.fromhex(case["envelope"]),
            rules=rules,
            senders=senders,
            model=ModelView(3, layout.fingerprint, layout.num_params),
            seen=NothingSeen(),
            topic_device=case["topic_device"],
        )
        receipt = case["receipt"]
        assert decision.reason == receipt["reason"] == case["reason"], case["case"]
        assert decision.sender == receipt["device"] == case["topic_device"], case["case"]
        assert (decision.input_id or bytes(16)).hex() == receipt["update_id"], case["case"]
        assert decision.seq == receipt["update_seq"], case["case"]
