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
