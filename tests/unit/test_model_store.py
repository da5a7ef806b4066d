"""The device's model store loads only what the pinned central key signed, for its layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedtier.client.model_store import ModelStore, OfferStatus
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import payload_digest, seal
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout, layout_of
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob
from tests.samples import CENTRAL, CREATED_MS, LAYOUT, sample_announcement, sample_blob

F32 = CodecSpec("f32")


def _params(version: int) -> npt.NDArray[np.float32]:
    return np.full(LAYOUT.num_params, float(version), np.float32)


def _current(store: ModelStore) -> tuple[int, npt.NDArray[np.float32]]:
    """The store's current ``(version, params)``, which the test expects to be loaded."""
    current = store.current
    assert current is not None
    return current


def _blob(
    version: int,
    params: npt.NDArray[np.float32] | None = None,
    signer: SigningIdentity = CENTRAL,
    layout: ModelLayout = LAYOUT,
    fleet: str = "acme",
    codec: CodecSpec = F32,
) -> tuple[bytes, bytes]:
    params = _params(version) if params is None else params
    msg = ModelBlob(
        fleet=fleet,
        sender=signer.key_id,
        seq=version,
        created_ms=CREATED_MS,
        version=version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=codec,
        tensors=layout,
    )
    # f32 by hand for non-finite values, which the encoder refuses.
    payload = params.astype("<f4").tobytes() if codec == F32 else encode(params, codec)
    return seal(msg, payload, signer), payload


def _pointer(version: int, blob_payload: bytes, signer: SigningIdentity = CENTRAL) -> bytes:
    msg = ModelAnnouncement(
        fleet="acme",
        sender=signer.key_id,
        seq=version,
        created_ms=CREATED_MS,
        version=version,
        layout=LAYOUT.fingerprint,
        num_params=LAYOUT.num_params,
        blob_blake3=payload_digest(blob_payload),
        blob_size=len(blob_payload),
        update_count=1,
    )
    return seal(msg, b"", signer)


def _store(cache_path: Path | None = None) -> ModelStore:
    return ModelStore(CENTRAL.verify_key, LAYOUT, "acme", cache_path=cache_path)


def test_blob_and_pointer_in_either_order() -> None:
    store = _store()
    assert store.current is None
    blob, payload = _blob(3)
    assert store.offer_pointer(_pointer(3, payload)).status is OfferStatus.NOTED
    offer = store.offer_blob(blob)
    assert offer.status is OfferStatus.LOADED
    version, params = _current(store)
    assert version == 3
    assert np.array_equal(params, _params(3))
    assert not params.flags.writeable
    blob4, payload4 = _blob(4)
    assert store.offer_blob(blob4).status is OfferStatus.LOADED
    assert store.offer_pointer(_pointer(4, payload4)).status is OfferStatus.NOTED
    assert store.version == 4
    assert not store.rejected


def test_the_shared_samples_verify() -> None:
    blob, payload = sample_blob()
    pointer, _ = sample_announcement()
    store = _store()
    assert store.offer_pointer(seal(pointer, b"", CENTRAL)).status is OfferStatus.NOTED
    assert store.offer_blob(seal(blob, payload, CENTRAL)).status is OfferStatus.LOADED


def test_model_signed_by_another_key_is_rejected_and_last_good_kept() -> None:
    store = _store()
    good, _ = _blob(1)
    store.offer_blob(good)
    impostor = SigningIdentity.from_seed(b"\x09" * 32)
    forged, payload = _blob(2, signer=impostor)
    offer = store.offer_blob(forged)
    assert offer.status is OfferStatus.REJECTED
    assert offer.reason == "unknown_sender"
    assert store.offer_pointer(_pointer(2, payload, signer=impostor)).reason == "unknown_sender"
    assert store.version == 1
    assert np.array_equal(_current(store)[1], _params(1))
    assert store.rejected["unknown_sender"] == 2


def test_tampered_blob_is_rejected() -> None:
    store = _store()
    blob, _ = _blob(1)
    tampered = bytearray(blob)
    tampered[-70] ^= 0x01  # inside the payload, before the 64-byte signature
    offer = store.offer_blob(bytes(tampered))
    assert offer.status is OfferStatus.REJECTED
    assert offer.reason in {"digest_mismatch", "bad_signature", "malformed"}
    assert store.current is None


def test_blob_whose_digest_differs_from_its_pointer_is_rejected() -> None:
    store = _store()
    store.offer_blob(_blob(1)[0])
    _, announced_payload = _blob(2)
    store.offer_pointer(_pointer(2, announced_payload))
    other_blob, _ = _blob(2, params=_params(99))
    offer = store.offer_blob(other_blob)
    assert offer.status is OfferStatus.REJECTED
    assert offer.reason == "digest_mismatch"
    assert store.version == 1
    assert store.offer_blob(_blob(2)[0]).status is OfferStatus.LOADED


def test_pointer_disagreeing_with_the_loaded_blob_is_rejected() -> None:
    store = _store()
    store.offer_blob(_blob(2)[0])
    _, other_payload = _blob(2, params=_params(7))
    offer = store.offer_pointer(_pointer(2, other_payload))
    assert offer.reason == "digest_mismatch"
    assert store.version == 2


def test_older_or_same_version_is_ignored() -> None:
    store = _store()
    store.offer_blob(_blob(5)[0])
    same = store.offer_blob(_blob(5)[0])
    older = store.offer_blob(_blob(4)[0])
    assert (same.status, same.reason) == (OfferStatus.IGNORED, "same_version")
    assert (older.status, older.reason) == (OfferStatus.IGNORED, "older_version")
    assert store.offer_pointer(_pointer(3, _blob(3)[1])).status is OfferStatus.IGNORED
    assert store.version == 5
    assert np.array_equal(_current(store)[1], _params(5))
    assert not store.rejected


def test_wrong_layout_or_fleet_is_rejected() -> None:
    store = _store()
    other_layout = layout_of([("fc.weight", (2, 4)), ("fc.bias", (3,))])
    offer = store.offer_blob(_blob(1, params=np.zeros(11, np.float32), layout=other_layout)[0])
    assert offer.reason == "layout_mismatch"
    assert store.offer_blob(_blob(1, fleet="other")[0]).reason == "wrong_fleet"
    assert store.current is None


def test_non_finite_model_is_rejected() -> None:
    store = _store()
    params = _params(1)
    params[3] = np.inf
    assert store.offer_blob(_blob(1, params=params)[0]).reason == "non_finite"
    assert store.current is None


def test_wrong_kind_on_the_blob_topic() -> None:
    store = _store()
    _, payload = _blob(1)
    assert store.offer_blob(_pointer(1, payload)).reason == "wrong_kind"
    assert store.offer_pointer(b"\x00garbage").reason == "malformed"


def test_compressed_blob_decodes() -> None:
    store = _store()
    params = np.linspace(-1, 1, LAYOUT.num_params).astype(np.float32)
    assert store.offer_blob(_blob(1, params=params, codec=CodecSpec("f16"))[0]).status == "loaded"
    assert np.allclose(_current(store)[1], params, atol=1e-3)


def test_cache_file_survives_restart_and_is_reverified(tmp_path: Path) -> None:
    cache = tmp_path / "model.blob"
    store = _store(cache_path=cache)
    store.offer_blob(_blob(6)[0])
    again = _store(cache_path=cache)
    assert again.version == 6
    assert np.array_equal(_current(again)[1], _params(6))
    corrupt = bytearray(cache.read_bytes())
    corrupt[-1] ^= 0xFF
    cache.write_bytes(bytes(corrupt))
    third = _store(cache_path=cache)
    assert third.current is None
    assert third.rejected["bad_signature"] == 1
