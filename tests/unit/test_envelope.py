from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgpack
import pytest

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import SIGNING_CONTEXT, open_envelope, parse_envelope, seal
from fedtier.protocol.errors import (
    DecodeError,
    DigestMismatch,
    LimitExceeded,
    LocalProtocolError,
    SignatureError,
    UnknownSender,
    UnsupportedVersion,
)
from fedtier.protocol.limits import Limits
from fedtier.protocol.messages import DeviceUpdate, Message, Receipt
from tests.samples import DEVICE, EDGE, KEYS, SIGNERS, all_samples, sample_receipt, sample_update


@pytest.mark.parametrize("sample", all_samples(), ids=lambda s: s[0].KIND.value)
def test_every_kind_round_trips(sample: tuple[Message, bytes]) -> None:
    msg, payload = sample
    data = seal(msg, payload, SIGNERS[msg.sender])
    env = open_envelope(data, KEYS)
    assert env.message == msg
    assert env.payload == payload


def test_seal_refuses_a_foreign_signer_and_a_misfit_payload() -> None:
    msg, payload = sample_update()
    with pytest.raises(LocalProtocolError, match="signed by"):
        seal(msg, payload, EDGE)
    with pytest.raises(LocalProtocolError, match="payload"):
        seal(msg, payload + b"\x00", DEVICE)
    receipt, _ = sample_receipt()
    with pytest.raises(LocalProtocolError, match="no payload"):
        seal(receipt, b"x", EDGE)


def test_unknown_sender_bad_signature_and_digest_are_told_apart() -> None:
    msg, payload = sample_update()
    data = seal(msg, payload, DEVICE)
    with pytest.raises(UnknownSender, match=DEVICE.key_id) as info:
        open_envelope(data, {})
    assert info.value.reason == "unknown_sender"

    version, header, body, sig = msgpack.unpackb(data)
    forged = msgpack.packb([version, header, body, EDGE.sign(SIGNING_CONTEXT + header)])
    with pytest.raises(SignatureError) as sig_info:
        open_envelope(forged, KEYS)
    assert sig_info.value.reason == "bad_signature"

    flipped = bytes([body[0] ^ 1]) + body[1:]
    swapped = msgpack.packb([version, header, flipped, sig])
    with pytest.raises(DigestMismatch):
        open_envelope(swapped, KEYS)


def test_limits_are_checked_before_parsing() -> None:
    msg, payload = sample_update()
    data = seal(msg, payload, DEVICE)
    with pytest.raises(LimitExceeded, match="cap"):
        parse_envelope(data, Limits(max_envelope_bytes=len(data) - 1))
    with pytest.raises(LimitExceeded):
        parse_envelope(data, Limits(max_header_bytes=32))
    with pytest.raises(LimitExceeded, match="num_params"):
        parse_envelope(data, Limits(max_params=5))


def _reheader(data: bytes, edit: Callable[[dict[str, object]], object]) -> bytes:
    version, header, body, _sig = msgpack.unpackb(data)
    fields = msgpack.unpackb(header)
    edit(fields)
    new_header = msgpack.packb(fields)
    return msgpack.packb([version, new_header, body, DEVICE.sign(SIGNING_CONTEXT + new_header)])


@pytest.mark.parametrize(
    ("edit", "error", "words"),
    [
        (lambda h: h.pop("seq"), DecodeError, "lacks field 'seq'"),
        (lambda h: h.update(extra=1), DecodeError, "unknown field 'extra'"),
        (lambda h: h.update(seq=True), DecodeError, "'seq'"),
        (lambda h: h.update(seq=-1), DecodeError, "'seq'"),
        (lambda h: h.update(kind="bogus"), DecodeError, "not a known message kind"),
        (lambda h: h.update(fleet="No/Good"), DecodeError, "fleet"),
        (lambda h: h.update(update_id=b"short"), DecodeError, "16 bytes"),
        (lambda h: h.update(n_samples=0), DecodeError, "n_samples"),
        (lambda h: h.update(codec={"values": "f64"}), DecodeError, "codec"),
        (lambda h: h.update(num_params=11), DecodeError, "needs a"),
        (lambda h: h.update(payload_size=1), DecodeError, "payload_size"),
        (lambda h: h.update(metrics={"loss": float("nan")}), DecodeError, "finite"),
        (lambda h: h.update(metrics={f"m{i}": 1.0 for i in range(17)}), LimitExceeded, "cap"),
    ],
)
def test_each_malformed_header_gets_a_typed_error_naming_the_field(
    edit: Callable[[dict[str, object]], object], error: type[Exception], words: str
) -> None:
    msg, payload = sample_update()
    data = _reheader(seal(msg, payload, DEVICE), edit)
    with pytest.raises(error, match=words):
        open_envelope(data, KEYS)


def test_outer_structure_errors() -> None:
    msg, payload = sample_update()
    _v, header, body, sig = msgpack.unpackb(seal(msg, payload, DEVICE))
    with pytest.raises(UnsupportedVersion, match="version 2"):
        parse_envelope(msgpack.packb([2, header, body, sig]))
    with pytest.raises(DecodeError, match="4 items"):
        parse_envelope(msgpack.packb([1, header, body]))
    with pytest.raises(DecodeError, match="64 bytes"):
        parse_envelope(msgpack.packb([1, header, body, sig[:10]]))
    with pytest.raises(DecodeError, match="msgpack"):
        parse_envelope(seal(msg, payload, DEVICE)[:-3])
    with pytest.raises(DecodeError, match="msgpack"):
        parse_envelope(seal(msg, payload, DEVICE) + b"\x00")
    with pytest.raises(DecodeError):
        parse_envelope(msgpack.packb(msgpack.ExtType(1, b"x")))


def test_duplicate_header_keys_are_refused() -> None:
    msg, payload = sample_update()
    _v, header, body, _sig = msgpack.unpackb(seal(msg, payload, DEVICE))
    fields = msgpack.unpackb(header)
    # Hand-build a map with "seq" twice: msgpack-python keeps the last one, another parser
    # might keep the first; a signed header must not be readable two ways.
    pairs = [*fields.items(), ("seq", 99)]
    raw = bytes([0xDE]) + len(pairs).to_bytes(2, "big")
    raw += b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)
    data = msgpack.packb([1, raw, body, DEVICE.sign(SIGNING_CONTEXT + raw)])
    with pytest.raises(DecodeError, match="repeats a key"):
        parse_envelope(data)


def test_local_construction_runs_the_same_checks() -> None:
    msg, _ = sample_update()
    with pytest.raises(LocalProtocolError, match="n_samples"):
        dataclasses.replace(msg, n_samples=0)
    with pytest.raises(LocalProtocolError, match="sender"):
        dataclasses.replace(msg, sender="nobody")
    with pytest.raises(LocalProtocolError, match="codec"):
        dataclasses.replace(msg, codec=CodecSpec("f16", k=20, index="u32"))
    receipt, _ = sample_receipt()
    with pytest.raises(LocalProtocolError, match="status"):
        dataclasses.replace(receipt, status="maybe")  # type: ignore[arg-type]
    assert isinstance(msg, DeviceUpdate)
    assert isinstance(receipt, Receipt)


def test_verify_with_the_wrong_key_is_a_local_error() -> None:
    msg, payload = sample_update()
    env = parse_envelope(seal(msg, payload, DEVICE))
    with pytest.raises(LocalProtocolError, match="with the key of"):
        env.verify(EDGE.verify_key)
