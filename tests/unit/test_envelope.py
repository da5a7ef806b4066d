from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgpack
import numpy as np
import pytest

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import (
    SIGNING_CONTEXT,
    _check_structure,
    open_envelope,
    parse_envelope,
    seal,
)
from fedtier.protocol.errors import (
    DecodeError,
    DigestMismatch,
    LimitExceeded,
    LocalProtocolError,
    SignatureError,
    UnknownSender,
    UnsupportedVersion,
)
from fedtier.protocol.layout import layout_of
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits, StructureCaps
from fedtier.protocol.messages import DeviceUpdate, Kind, Message, Receipt, header_caps
from tests.samples import (
    DEVICE,
    EDGE,
    KEYS,
    SIGNERS,
    all_samples,
    sample_blob,
    sample_partial,
    sample_receipt,
    sample_update,
)


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


# -- structure caps (docs/protocol.md section 10.1) -------------------------------------

SMALL = Limits(max_ids=20, max_hist_buckets=5, max_metrics=3, max_tensors=3, max_ndim=2)
FULL_CODEC = CodecSpec("i8", chunk=4, k=2, index="u32")  # every codec key present


def structure_of(value: object) -> StructureCaps:
    """Depth, containers, objects and widest container of a decoded value, counted directly."""
    if isinstance(value, dict | list):
        items = [*value.values()] if isinstance(value, dict) else value
        inner = [structure_of(v) for v in items]
        is_map = isinstance(value, dict)
        return StructureCaps(
            max_depth=1 + max((i.max_depth for i in inner), default=0),
            max_maps=is_map + sum(i.max_maps for i in inner),
            max_arrays=(not is_map) + sum(i.max_arrays for i in inner),
            max_objects=1 + (len(value) if is_map else 0) + sum(i.max_objects for i in inner),
            max_map_len=max([len(value) if is_map else 0, *(i.max_map_len for i in inner)]),
            max_array_len=max([0 if is_map else len(value), *(i.max_array_len for i in inner)]),
        )
    return StructureCaps(0, 0, 0, 1, 0, 0)


def largest_headers(limits: Limits) -> dict[Kind, bytes]:
    """Sealed envelopes of the largest valid update, partial and model blob under ``limits``."""
    update, _ = sample_update()
    update = dataclasses.replace(
        update,
        codec=FULL_CODEC,
        metrics=tuple((f"m{i}", 0.5) for i in range(limits.max_metrics)),
    )
    partial, _ = sample_partial()
    ids = tuple(bytes([i]) * 16 for i in range(limits.max_ids))
    partial = dataclasses.replace(
        partial,
        codec=FULL_CODEC,
        staleness_hist=(1,) * limits.max_hist_buckets,
        inputs=ids,
        leaves=ids,
    )
    layout = layout_of([(f"t{i}", (2,) * limits.max_ndim) for i in range(limits.max_tensors)])
    blob, _ = sample_blob()
    blob = dataclasses.replace(
        blob,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=FULL_CODEC,
        tensors=layout,
    )
    out = {}
    for msg in (update, partial, blob):
        payload = encode(np.ones(msg.num_params, np.float32), FULL_CODEC)
        out[msg.KIND] = seal(msg, payload, SIGNERS[msg.sender])
    return out


def header_structure(envelope: bytes) -> StructureCaps:
    return structure_of(msgpack.unpackb(msgpack.unpackb(envelope)[1]))


def raw_envelope(header: bytes) -> bytes:
    return msgpack.packb([1, header, b"", bytes(64)])


def test_header_caps_are_exactly_the_largest_valid_headers() -> None:
    largest = largest_headers(SMALL)
    for kind, data in largest.items():
        assert header_structure(data) == header_caps(SMALL, frozenset({kind})), kind
        parse_envelope(data, SMALL)  # at the caps, not above them
        parse_envelope(data, SMALL, kinds=(kind,))
    for msg, payload in all_samples():
        data = seal(msg, payload, SIGNERS[msg.sender])
        within = header_structure(data).union(header_caps(SMALL, frozenset({msg.KIND})))
        assert within == header_caps(SMALL, frozenset({msg.KIND})), msg.KIND
    union = header_structure(largest[Kind.UPDATE])
    for data in largest.values():
        union = union.union(header_structure(data))
    assert header_caps(SMALL) == union


def test_default_header_caps() -> None:
    caps = header_caps(DEFAULT_LIMITS)
    assert (caps.max_depth, caps.max_maps, caps.max_arrays) == (4, 3, 8193)
    assert caps.max_objects == 2 * 65_536 + 256 + 51
    assert header_caps(DEFAULT_LIMITS, frozenset({Kind.UPDATE})).max_arrays == 0


@pytest.mark.parametrize(
    ("header", "error", "words"),
    [
        (b"\x81\xa1k" + b"\x91" * 4 + b"\x90", LimitExceeded, "nests containers 5 deep"),
        (b"\x81\xa1k" + b"\x81\xa1k" * 2 + b"\x80", LimitExceeded, "more than 3 maps"),
        (b"\x81\xa1k" + b"\xdc\x00\x10" + b"\x90" * 16, LimitExceeded, "more than 7 arrays"),
        (b"\x81\xa1k" + b"\xdc\x00\x15" + b"\x00" * 21, LimitExceeded, "array of 21 items"),
        (b"\xde\x00\x20" + b"\xa0\x00" * 32, LimitExceeded, "map of 32 entries"),
        (
            b"\x81\xa1k\x95" + (b"\xdc\x00\x14" + b"\x00" * 20) * 5,
            LimitExceeded,
            "96 msgpack objects",
        ),
        (b"\x81\xa1k\xdc\x00\x14", DecodeError, "ends inside an item"),
        (b"\x81\xa1k\xc4\x10" + bytes(15), DecodeError, "ends inside an item"),
        (b"\x81\xa1k\x00\x00", DecodeError, "1 bytes follow its end"),
        (b"\x81\xa1k\xd4\x01\x00", DecodeError, "extension type"),
        (b"\x81\xa1k\xc1", DecodeError, "reserved byte 0xc1"),
    ],
)
def test_hostile_structure_is_refused_before_it_is_built(
    header: bytes, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words) as info:
        parse_envelope(raw_envelope(header), SMALL)
    if error is DecodeError:
        assert info.type is DecodeError  # malformed, not too_large


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (msgpack.packb([[1], b"", b"", bytes(64)]), "nests containers 2 deep"),
        (msgpack.packb([1, b"", b"", bytes(64), 5]), "array of 5 items"),
        (msgpack.packb({"v": 1}), "more than 0 maps"),
    ],
)
def test_the_outer_array_holds_four_scalars(data: bytes, words: str) -> None:
    with pytest.raises(LimitExceeded, match=words):
        parse_envelope(data)


def test_a_receiver_taking_some_kinds_applies_their_caps() -> None:
    largest = largest_headers(SMALL)
    parse_envelope(largest[Kind.UPDATE], SMALL, kinds=(Kind.UPDATE,))
    with pytest.raises(LimitExceeded, match=r"map of \d+ entries; the cap is \d+"):
        parse_envelope(largest[Kind.PARTIAL], SMALL, kinds=(Kind.UPDATE,))
    receipt, payload = sample_receipt()
    with pytest.raises(DecodeError, match="receipt message arrived where update is expected"):
        open_envelope(seal(receipt, payload, EDGE), KEYS, kinds=(Kind.UPDATE,))
    env = open_envelope(largest[Kind.PARTIAL], KEYS, SMALL, kinds=(Kind.PARTIAL, Kind.UPDATE))
    assert env.message.KIND is Kind.PARTIAL


@pytest.mark.parametrize(
    "value",
    [
        [b"\xc4\xc4"] * 15 + [b"\xc4\xc4\xc4"],  # type bytes line up, the last length differs
        [b"\xc4" * 2, b"\xc4" * 3] * 8,
        [1] * 15 + [300],
        ["ab"] * 16 + [[]],
    ],
)
def test_a_run_is_skipped_in_one_step_only_when_every_head_matches(value: list[object]) -> None:
    # Exactly at its caps, so a run mistaken for uniform would misplace the walk.
    _check_structure(msgpack.packb(value), structure_of(value), "value")
