"""The hostile inputs themselves, as bytes: signed updates with bad numbers and broken envelopes.

Pure functions of an identity, a sequence number, a model version and a
layout; no bus, no trio, no clock other than ``created_ms``. Each builder
returns the envelope bytes an attacker publishes; ``_run`` decides where and
when, and ``_verdict`` what the edge's answer must be.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Final

import msgpack
import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import PROTOCOL_VERSION, seal
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import DeviceUpdate, PartialAggregate, Tier

__all__ = [
    "HONEST_NORM",
    "INT64_MAX",
    "broken_signature",
    "deep_header",
    "garbage",
    "honest_delta",
    "oversized_header",
    "signed_partial",
    "signed_update",
    "wide_header",
]

INT64_MAX: Final = 2**63 - 1
HONEST_NORM: Final = 1.0
"""L2 norm of the attackers' "honest-looking" delta (the fleet's honest deltas are ~0.5-1)."""
_SIGNATURE_BYTES: Final = 64


def honest_delta(layout: ModelLayout, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """A random delta of norm ``HONEST_NORM``: what one honest training step looks like in size."""
    delta = rng.standard_normal(layout.num_params)
    delta *= HONEST_NORM / float(np.linalg.norm(delta))
    return delta.astype(np.float32)


def signed_update(
    identity: SigningIdentity,
    *,
    fleet: str,
    layout: ModelLayout,
    delta: npt.NDArray[np.float32],
    seq: int,
    base_version: int,
    n_samples: int = 32,
    update_id: bytes | None = None,
) -> tuple[bytes, bytes]:
    """A well-formed update signed by ``identity``; returns ``(update_id, envelope)``."""
    uid = update_id if update_id is not None else os.urandom(16)
    message = DeviceUpdate(
        fleet=fleet,
        sender=identity.key_id,
        seq=seq,
        created_ms=int(time.time() * 1000),
        update_id=uid,
        base_version=base_version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        n_samples=n_samples,
        codec=CodecSpec("f32"),
    )
    return uid, seal(message, encode(delta, CodecSpec("f32")), identity)


def broken_signature(envelope: bytes) -> bytes:
    """The envelope with the last bit of its signature flipped (the envelope's last byte)."""
    return envelope[:-1] + bytes([envelope[-1] ^ 0x01])


def garbage(rng: np.random.Generator, size: int = 200) -> bytes:
    """Random bytes: not msgpack, or not an envelope."""
    return rng.bytes(size)


def _envelope(header: bytes) -> bytes:
    return msgpack.packb(
        [PROTOCOL_VERSION, header, b"", b"\x00" * _SIGNATURE_BYTES], use_bin_type=True
    )


def oversized_header(limit: int) -> bytes:
    """An envelope whose header is one byte over ``limit`` (the decoder's ``max_header_bytes``)."""
    return _envelope(b"\x90" * (limit + 1))


def deep_header(depth: int = 100_000) -> bytes:
    """A header of ``depth`` nested one-element arrays: the decoder's nesting limit refuses it."""
    return _envelope(b"\x91" * depth + b"\xc0")


def wide_header(count: int) -> bytes:
    """A header that is one array of ``count`` empty arrays (the issue's 4 MiB case)."""
    return _envelope(b"\xdd" + struct.pack(">I", count) + b"\x90" * count)


def signed_partial(
    identity: SigningIdentity,
    *,
    fleet: str,
    layout: ModelLayout,
    seq: int,
    version: int,
    inputs: tuple[bytes, ...],
    leaves: tuple[bytes, ...],
    partial_id: bytes,
    sample_count: float = 32.0,
) -> bytes:
    """An edge's partial signed by ``identity``, with a zero numerator and the given lists.

    The caller chooses ``partial_id``: the derived one for a partial whose other
    fields are the attack, any other for one whose inputs cannot derive an id.
    """
    message = PartialAggregate(
        fleet=fleet,
        sender=identity.key_id,
        seq=seq,
        created_ms=int(time.time() * 1000),
        partial_id=partial_id,
        tier=Tier.EDGE,
        known_version=version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=CodecSpec("f32"),
        sample_count=sample_count,
        weight_sum=sample_count,
        update_count=len(leaves),
        staleness_hist=(len(leaves),),
        min_base_version=version,
        max_base_version=version,
        inputs=inputs,
        leaves=leaves,
    )
    zeros = np.zeros(layout.num_params, dtype=np.float32)
    return seal(message, encode(zeros, CodecSpec("f32")), identity)
