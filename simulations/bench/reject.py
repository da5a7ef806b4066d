"""Benchmark: the cost of refusing the worst envelopes within the size caps; imports any.

Each case is an envelope within ``Limits`` (default caps) built to be as costly
as possible to parse: millions of empty containers, deep nesting, arrays
declared far longer than their bytes, a flood of scalars, mixed encodings that
defeat the parser's fast path, and the largest valid headers for comparison.
For each, ``parse_envelope`` is timed (median and max of ``repeats`` runs after
one warm-up, in milliseconds) and its peak traced memory measured in a separate
run (tracemalloc slows what it traces); ``edge`` times it as an edge's
admission calls it, taking updates only (``kinds``), so under an update's
structure caps. Beside it, ``unguarded`` is msgpack with per-container caps
only (what ``parse_envelope`` ran before the structure caps), measured once,
and ``baseline`` is ``msgpack.unpackb`` of the largest valid partial header,
measured in the same run: on a shared, noisy machine read ``vs_baseline``
rather than absolute times.

``admission`` times what else the edge does with one envelope on its event loop
(verify the signature and payload digest, check the payload; derive a
partial's id): the cost there grows with a valid payload, not with hostile
structure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import parse_envelope, seal
from fedtier.protocol.errors import LocalProtocolError, RemoteProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout, TensorSpec, layout_of
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits
from fedtier.protocol.messages import (
    DeviceUpdate,
    Kind,
    ModelBlob,
    PartialAggregate,
    Tier,
    header_caps,
)
from fedtier.tiers.aggregate import partial_id
from fedtier.tiers.core import check_payload

__all__ = ["main", "run_reject_bench"]

_IDENTITY = SigningIdentity.from_seed(bytes(32))
_MIB = 1024 * 1024
# msgpack-python refuses to nest deeper than this; the deepest pre-sizing attack.
_MSGPACK_MAX_DEPTH = 1024
_OUTER_TREE_LEVELS = 11  # 4**11 empty arrays, 5.3 MiB: the unguarded parse takes seconds


@dataclass(frozen=True)
class _Case:
    what: str
    envelope: bytes
    stage: str  # "header" or "envelope": which msgpack call the unguarded parser made


def _array_head(n: int) -> bytes:
    return b"\xdc" + n.to_bytes(2, "big") if n < 0x10000 else b"\xdd" + n.to_bytes(4, "big")


def _raw_envelope(header: bytes, payload: bytes = b"") -> bytes:
    # parse_envelope checks no signature: 64 zero bytes stand in for one.
    return bytes(msgpack.packb([1, header, payload, bytes(64)], use_bin_type=True))


def _filled(limits: Limits, item: bytes) -> bytes:
    """``{"inputs": [[item x 65535] x k]}`` with as many items as fit in the header cap."""
    per_array = 65535
    row = _array_head(per_array) + item * per_array
    k = (limits.max_header_bytes - 16) // len(row)
    return b"\x81\xa6inputs" + _array_head(k) + row * k


def _max_partial(limits: Limits) -> tuple[PartialAggregate, bytes]:
    rng = np.random.default_rng(0)
    ids = tuple(sorted(rng.bytes(16) for _ in range(limits.max_ids)))
    layout = layout_of([("w", (4,))])
    message = PartialAggregate(
        fleet="bench",
        sender=_IDENTITY.key_id,
        seq=1,
        created_ms=0,
        partial_id=partial_id(_IDENTITY.key_id, ids),
        tier=Tier.EDGE,
        known_version=0,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=CodecSpec("f32"),
        sample_count=1.0,
        weight_sum=1.0,
        update_count=len(ids),
        staleness_hist=(len(ids),) + (0,) * (limits.max_hist_buckets - 1),
        min_base_version=0,
        max_base_version=0,
        inputs=ids,
        leaves=ids,
    )
    return message, seal(message, bytes(16), _IDENTITY)


def _mixed_ids_header(ids: list[bytes]) -> bytes:
    """The ids alternating bin 16 and bin 8: valid, but no run of items encoded alike."""
    parts = [_array_head(len(ids))]
    for i, one in enumerate(ids):
        parts.append((b"\xc4\x10" if i % 2 else b"\xc5\x00\x10") + one)
    return b"".join(parts)


def _max_model_blob(limits: Limits) -> bytes:
    """A model blob of ``max_tensors`` tensors of ``max_ndim`` dims, names filling the header."""
    per_entry = limits.max_header_bytes // limits.max_tensors
    name_len = min(1024, per_entry - 48)
    tensors = tuple(
        TensorSpec(f"{i:05d}".ljust(name_len, "t"), "float32", (1,) * limits.max_ndim)
        for i in range(limits.max_tensors)
    )
    layout = ModelLayout(tensors)
    message = ModelBlob(
        fleet="bench",
        sender=_IDENTITY.key_id,
        seq=1,
        created_ms=0,
        version=1,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=CodecSpec("f32"),
        tensors=layout,
    )
    return seal(message, bytes(4 * layout.num_params), _IDENTITY)


def _outer_tree(levels: int) -> bytes:
    node = b"\x90"
    for _ in range(levels):
        node = b"\x94" + node * 4
    return node


def build_cases(limits: Limits = DEFAULT_LIMITS) -> dict[str, _Case]:
    """The envelopes of the benchmark, by name; each within ``limits``' byte caps."""
    _message, partial = _max_partial(limits)
    version, header, payload, signature = msgpack.unpackb(partial)
    fields = msgpack.unpackb(header)
    mixed_fields = b"".join(
        msgpack.packb(k) + (_mixed_ids_header(v) if k in ("inputs", "leaves") else msgpack.packb(v))
        for k, v in fields.items()
    )
    mixed = bytes([0xDE]) + len(fields).to_bytes(2, "big") + mixed_fields
    # Empty bin 32 and str 32 in turn (the walk's slowest items, no run encoded
    # alike) in the two longest arrays the caps allow: walked item by item, then
    # built by msgpack, then refused by the schema.
    caps = header_caps(limits)
    per_array = min(caps.max_array_len, (caps.max_objects - 5) // 2)
    alternating = (b"\xc6\x00\x00\x00\x00\xdb\x00\x00\x00\x00" * per_array)[: 5 * per_array]
    heterogeneous = (
        b"\x82\xa6inputs"
        + _array_head(per_array)
        + alternating
        + b"\xa6leaves"
        + _array_head(per_array)
        + alternating
    )
    cases = {
        "nested_empty_arrays": _Case(
            "~4 M empty arrays in arrays of 65,535 (the reported attack)",
            _raw_envelope(_filled(limits, b"\x90")),
            "header",
        ),
        "nested_empty_maps": _Case(
            "~4 M empty maps in arrays of 65,535", _raw_envelope(_filled(limits, b"\x80")), "header"
        ),
        "deep_nesting": _Case(
            "arrays nested as deep as the header's bytes allow",
            _raw_envelope(b"\x91" * (limits.max_header_bytes - 1) + b"\x90"),
            "header",
        ),
        "presized_arrays": _Case(
            f"{_MSGPACK_MAX_DEPTH} nested arrays each declaring 65,535 items, 3 KiB of bytes",
            _raw_envelope(_array_head(65535) * _MSGPACK_MAX_DEPTH),
            "header",
        ),
        "scalar_flood": _Case(
            "~4 M one-byte integers in arrays of 65,535",
            _raw_envelope(_filled(limits, b"\x01")),
            "header",
        ),
        "longest_strings": _Case(
            "strings of 1,024 characters filling the header",
            _raw_envelope(
                _array_head((limits.max_header_bytes - 8) // 1027)
                + (b"\xda\x04\x00" + b"s" * 1024) * ((limits.max_header_bytes - 8) // 1027)
            ),
            "header",
        ),
        "widest_map": _Case(
            "one map of 65,535 entries",
            _raw_envelope(b"\xde\xff\xff" + b"\xa0\x00" * 65535),
            "header",
        ),
        "mixed_scalars_at_object_cap": _Case(
            f"two arrays of {per_array:,} empty bins and strings in turn (32-bit lengths)",
            _raw_envelope(heterogeneous),
            "header",
        ),
        "outer_tree": _Case(
            f"the envelope itself a 4-ary tree of 4**{_OUTER_TREE_LEVELS} empty arrays",
            _outer_tree(_OUTER_TREE_LEVELS),
            "envelope",
        ),
        "largest_partial": _Case(
            f"valid: a partial listing {limits.max_ids:,} inputs and leaves", partial, "header"
        ),
        "largest_partial_mixed_encoding": _Case(
            "valid: the same partial, ids alternating bin 8 and bin 16",
            bytes(msgpack.packb([version, mixed, payload, signature])),
            "header",
        ),
        "largest_model_blob": _Case(
            f"valid: a model blob of {limits.max_tensors:,} tensors of {limits.max_ndim} dims",
            _max_model_blob(limits),
            "header",
        ),
    }
    for name, case in cases.items():
        if len(case.envelope) > limits.max_envelope_bytes:
            raise LocalProtocolError(f"case {name} is above the envelope cap")
    return cases


def _unguarded(case: _Case, limits: Limits) -> object:
    """Parse as before the structure caps: msgpack with per-container caps only."""
    if case.stage == "envelope":
        return msgpack.unpackb(
            case.envelope,
            max_bin_len=len(case.envelope),
            max_array_len=4,
            max_map_len=0,
            max_str_len=0,
            max_ext_len=0,
        )
    header = msgpack.unpackb(case.envelope)[1]
    return msgpack.unpackb(
        header,
        raw=False,
        strict_map_key=True,
        max_ext_len=0,
        object_pairs_hook=dict,
        max_bin_len=32,
        max_array_len=max(limits.max_ids, limits.max_tensors, limits.max_hist_buckets),
        max_map_len=64,
        max_str_len=max(limits.max_str_chars, 1024),
    )


def _outcome(run: Callable[[], object]) -> str:
    try:
        run()
    except RemoteProtocolError as exc:
        return f"rejected: {exc.reason} ({str(exc)[:100]})"
    except Exception as exc:  # msgpack's own errors, in the unguarded runs
        return f"rejected: {type(exc).__name__} ({str(exc)[:100]})"
    return "accepted"


def _times_ms(run: Callable[[], object], repeats: int) -> list[float]:
    _outcome(run)  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        _outcome(run)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def _peak_mib(run: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _outcome(run)
        return round(tracemalloc.get_traced_memory()[1] / _MIB, 3)
    finally:
        tracemalloc.stop()


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(samples), 3),
        "max_ms": round(max(samples), 3),
    }


def _admission(limits: Limits, repeats: int, num_params: int) -> dict[str, object]:
    """What else one envelope costs on the event loop: crypto and the payload check."""
    rng = np.random.default_rng(0)
    delta = rng.standard_normal(num_params, dtype=np.float32) * np.float32(1e-3)
    layout = layout_of([("delta", (num_params,))])
    spec = CodecSpec("f32")
    update = DeviceUpdate(
        fleet="bench",
        sender=_IDENTITY.key_id,
        seq=1,
        created_ms=0,
        update_id=bytes(16),
        base_version=0,
        layout=layout.fingerprint,
        num_params=num_params,
        n_samples=1,
        codec=spec,
    )
    data = seal(update, encode(delta, spec), _IDENTITY)
    envelope = parse_envelope(data, limits)
    key = _IDENTITY.verify_key
    stages = {
        "parse_envelope": lambda: parse_envelope(data, limits),
        "verify (Ed25519 + BLAKE3 of the payload)": lambda: envelope.verify(key),
        "check_payload (finite, norm, clip)": lambda: check_payload(
            memoryview(envelope.payload), spec, num_params, max_norm=100.0, norm_policy="clip"
        ),
    }
    message, partial = _max_partial(limits)
    parsed = parse_envelope(partial, limits)
    partial_stages = {
        "parse_envelope": lambda: parse_envelope(partial, limits),
        "verify (Ed25519 + BLAKE3 of the payload)": lambda: parsed.verify(key),
        "partial_id (sort and hash the inputs)": lambda: partial_id(message.sender, message.inputs),
    }
    return {
        "largest_update": {
            "what": f"an f32 update of {num_params:,} parameters",
            "envelope_bytes": len(data),
            "stages": {k: _summary(_times_ms(v, repeats)) for k, v in stages.items()},
        },
        "largest_partial": {
            "what": f"a partial listing {limits.max_ids:,} inputs and leaves",
            "envelope_bytes": len(partial),
            "stages": {k: _summary(_times_ms(v, repeats)) for k, v in partial_stages.items()},
        },
    }


def run_reject_bench(
    repeats: int = 5,
    *,
    unguarded: bool = True,
    admission_params: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, object]:
    """Time and trace ``parse_envelope`` on every case of :func:`build_cases`.

    Args:
        repeats: timed runs per case (median and max reported).
        unguarded: also run msgpack with per-container caps only, once per case
            (the nested-container cases take seconds and hundreds of MiB).
        admission_params: parameters of the update in ``admission`` (default
            ``limits.max_params``, the largest valid one).
        limits: the caps the cases are built for and parsed with.

    Returns:
        A JSON-serializable dict: versions and CPU count, the header's structure
        caps, ``baseline`` (``msgpack.unpackb`` of the largest valid partial
        header), ``cases`` (per case: ``what``, sizes, ``outcome``, ``median_ms``,
        ``max_ms``, ``peak_mib``, ``vs_baseline``, ``edge`` and ``unguarded``)
        and ``admission``.
    """
    if repeats < 1:
        raise LocalProtocolError(f"repeats must be >= 1, got {repeats}")
    cases = build_cases(limits)
    baseline_header = msgpack.unpackb(cases["largest_partial"].envelope)[1]
    baseline = _summary(_times_ms(lambda: msgpack.unpackb(baseline_header), repeats))
    out: dict[str, object] = {}
    for name, case in cases.items():
        data = case.envelope

        def parse(data: bytes = data) -> object:
            return parse_envelope(data, limits)

        samples = _times_ms(parse, repeats)
        row: dict[str, object] = {
            "what": case.what,
            "envelope_bytes": len(data),
            "header_bytes": len(msgpack.unpackb(data)[1]) if case.stage == "header" else None,
            "outcome": _outcome(parse),
            **_summary(samples),
            "peak_mib": _peak_mib(parse),
            "vs_baseline": round(statistics.median(samples) / baseline["median_ms"], 3),
        }

        def as_edge(data: bytes = data) -> object:
            return parse_envelope(data, limits, kinds=(Kind.UPDATE,))

        row["edge"] = {"outcome": _outcome(as_edge), **_summary(_times_ms(as_edge, repeats))}
        if unguarded:

            def old(case: _Case = case) -> object:
                return _unguarded(case, limits)

            start = time.perf_counter_ns()
            outcome = _outcome(old)
            row["unguarded"] = {
                "outcome": outcome,
                "ms": round((time.perf_counter_ns() - start) / 1e6, 3),
                "peak_mib": _peak_mib(old),
            }
        out[name] = row
    caps = header_caps(limits)
    return {
        "python": platform.python_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "repeats": repeats,
        "header_caps": {
            "max_depth": caps.max_depth,
            "max_maps": caps.max_maps,
            "max_arrays": caps.max_arrays,
            "max_objects": caps.max_objects,
            "max_map_len": caps.max_map_len,
            "max_array_len": caps.max_array_len,
        },
        "baseline": {
            "what": "msgpack.unpackb of the largest valid partial header",
            "header_bytes": len(baseline_header),
            **baseline,
        },
        "cases": out,
        "admission": _admission(limits, repeats, admission_params or limits.max_params),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its result as JSON; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="fedtier bench reject",
        description="Time refusing the worst envelopes within the size caps; print JSON.",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument(
        "--no-unguarded",
        dest="unguarded",
        action="store_false",
        help="skip the msgpack-only runs (seconds each for the nested cases)",
    )
    parser.add_argument(
        "--params",
        type=int,
        default=None,
        help="parameters of the update timed in 'admission' (default: max_params)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.params is not None and args.params < 1):
        parser.error("--repeats and --params must be at least 1")
    result = run_reject_bench(
        repeats=args.repeats, unguarded=args.unguarded, admission_params=args.params
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
