"""Sample signed messages of every kind, shared by unit, property and vector tests."""

from __future__ import annotations

import numpy as np

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.messages import (
    DeviceUpdate,
    Message,
    ModelAnnouncement,
    ModelBlob,
    PartialAggregate,
    Receipt,
    ReceiptStatus,
    Tier,
)

DEVICE = SigningIdentity.from_seed(bytes(range(32)))
EDGE = SigningIdentity.from_seed(bytes(range(32, 64)))
CENTRAL = SigningIdentity.from_seed(bytes(range(64, 96)))
LAYOUT = layout_of([("fc.weight", (2, 4)), ("fc.bias", (2,))])
DELTA = np.array([0.5, -0.25, 1.0, 0.0, -1.5, 0.125, 2.0, -0.75, 0.01, -0.02], dtype=np.float32)
CREATED_MS = 1_764_288_000_000


def sample_update(codec: CodecSpec | None = None, seq: int = 7) -> tuple[DeviceUpdate, bytes]:
    spec = codec or CodecSpec("i8", chunk=4)
    msg = DeviceUpdate(
        fleet="acme",
        sender=DEVICE.key_id,
        seq=seq,
        created_ms=CREATED_MS,
        update_id=bytes.fromhex("00112233445566778899aabbccddeeff"),
        base_version=3,
        layout=LAYOUT.fingerprint,
        num_params=LAYOUT.num_params,
        n_samples=120,
        codec=spec,
        metrics=(("loss", 0.6931),),
    )
    return msg, encode(DELTA, spec)


def sample_receipt() -> tuple[Receipt, bytes]:
    return (
        Receipt(
            fleet="acme",
            sender=EDGE.key_id,
            seq=1,
            created_ms=CREATED_MS + 5,
            update_id=bytes.fromhex("00112233445566778899aabbccddeeff"),
            device=DEVICE.key_id,
            update_seq=7,
            status=ReceiptStatus.ACCEPTED,
            reason="",
            model_version=4,
        ),
        b"",
    )


def sample_partial() -> tuple[PartialAggregate, bytes]:
    spec = CodecSpec("f32")
    return (
        PartialAggregate(
            fleet="acme",
            sender=EDGE.key_id,
            seq=2,
            created_ms=CREATED_MS + 10,
            partial_id=bytes(range(16)),
            tier=Tier.EDGE,
            known_version=4,
            layout=LAYOUT.fingerprint,
            num_params=LAYOUT.num_params,
            codec=spec,
            sample_count=120.0,
            weight_sum=60.0,
            update_count=1,
            staleness_hist=(0, 1),
            min_base_version=3,
            max_base_version=3,
            inputs=(bytes.fromhex("00112233445566778899aabbccddeeff"),),
            leaves=(bytes.fromhex("00112233445566778899aabbccddeeff"),),
        ),
        encode(DELTA * 60.0, spec),
    )


def sample_blob() -> tuple[ModelBlob, bytes]:
    spec = CodecSpec("f32")
    params = np.linspace(-1, 1, LAYOUT.num_params, dtype=np.float32)
    return (
        ModelBlob(
            fleet="acme",
            sender=CENTRAL.key_id,
            seq=5,
            created_ms=CREATED_MS + 20,
            version=5,
            layout=LAYOUT.fingerprint,
            num_params=LAYOUT.num_params,
            codec=spec,
            tensors=LAYOUT,
        ),
        encode(params, spec),
    )


def sample_announcement() -> tuple[ModelAnnouncement, bytes]:
    from fedtier.protocol.envelope import payload_digest

    _blob, blob_payload = sample_blob()
    return (
        ModelAnnouncement(
            fleet="acme",
            sender=CENTRAL.key_id,
            seq=5,
            created_ms=CREATED_MS + 21,
            version=5,
            layout=LAYOUT.fingerprint,
            num_params=LAYOUT.num_params,
            blob_blake3=payload_digest(blob_payload),
            blob_size=len(blob_payload),
            update_count=12,
        ),
        b"",
    )


SIGNERS = {DEVICE.key_id: DEVICE, EDGE.key_id: EDGE, CENTRAL.key_id: CENTRAL}
KEYS = {k: v.verify_key for k, v in SIGNERS.items()}


def all_samples() -> list[tuple[Message, bytes]]:
    return [
        sample_update(),
        sample_receipt(),
        sample_partial(),
        sample_announcement(),
        sample_blob(),
    ]
