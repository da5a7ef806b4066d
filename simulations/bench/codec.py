"""Codec benchmark: size, encode and fold time, error per codec; imports numpy and protocol only.

Times are medians of ``repeats`` runs after one warm-up, in milliseconds, and
come with a raw float32 baseline measured in the same run: on a shared, noisy
machine read ``decode_fold_vs_baseline`` rather than absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from fedtier.protocol.codecs import CodecSpec, decode, encode, fold_into, relative_l2_error
from fedtier.protocol.envelope import seal
from fedtier.protocol.errors import LocalProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.messages import DeviceUpdate

__all__ = ["CODEC_NAMES", "main", "run_codec_bench"]

CODEC_NAMES: tuple[str, ...] = (
    "f32",
    "f16",
    "i8",
    "top10%+f16",
    "top1%+f16",
    "top1%+i8",
    "top1%+i8+varint",
)
_FOLD_WEIGHT = 0.5


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-touch page faults and caches are not what we measure
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - start)
    return round(statistics.median(samples) / 1e6, 4)


def _envelope_size(spec: CodecSpec, payload: bytes, num_params: int) -> int:
    """Size of the signed update envelope carrying ``payload``: what crosses the wire."""
    identity = SigningIdentity.from_seed(bytes(32))
    message = DeviceUpdate(
        fleet="bench",
        sender=identity.key_id,
        seq=1,
        created_ms=0,
        update_id=bytes(16),
        base_version=0,
        layout=layout_of([("delta", (num_params,))]).fingerprint,
        num_params=num_params,
        n_samples=1,
        codec=spec,
    )
    return len(seal(message, payload, identity))


def run_codec_bench(
    num_params: int = 1_000_000, repeats: int = 5, seed: int = 0
) -> dict[str, object]:
    """Measure every codec in :data:`CODEC_NAMES` on one synthetic delta.

    Args:
        num_params: length of the delta.
        repeats: timed runs per measurement (the median is reported).
        seed: seed of the synthetic normal float32 delta.

    Returns:
        A JSON-serializable dict: ``num_params``, ``repeats``, ``seed``, versions,
        ``baseline`` (``fold_ms`` of ``acc += w * x`` and ``tobytes_ms`` of the raw
        float32 vector) and ``codecs``, one entry per codec name with ``spec``,
        ``payload_bytes``, ``wire_bytes`` (the whole signed update envelope as an MQTT
        payload carries it), ``encode_ms``, ``decode_fold_ms``, ``decode_fold_vs_baseline``
        and ``rel_l2_error``.
    """
    if num_params < 1 or repeats < 1:
        raise LocalProtocolError(f"num_params {num_params} and repeats {repeats} must be >= 1")
    rng = np.random.Generator(np.random.PCG64(seed))
    # Scaled like a real delta (small, signed); the scale does not change the ratios.
    delta = rng.standard_normal(num_params, dtype=np.float32) * np.float32(1e-3)
    acc = np.zeros(num_params, np.float32)
    weight = np.float32(_FOLD_WEIGHT)

    def raw_fold() -> None:
        acc.__iadd__(weight * delta)

    baseline_fold_ms = _median_ms(raw_fold, repeats)
    baseline = {
        "fold_ms": baseline_fold_ms,
        "tobytes_ms": _median_ms(delta.tobytes, repeats),
        "wire_bytes": delta.nbytes,
    }
    codecs: dict[str, object] = {}
    for name in CODEC_NAMES:
        spec = CodecSpec.parse(name, num_params=num_params)
        payload = encode(delta, spec)
        fold_ms = _median_ms(partial(fold_into, acc, payload, spec, _FOLD_WEIGHT), repeats)
        codecs[name] = {
            "spec": str(spec),
            "payload_bytes": len(payload),
            "wire_bytes": _envelope_size(spec, payload, num_params),
            "encode_ms": _median_ms(partial(encode, delta, spec), repeats),
            "decode_fold_ms": fold_ms,
            "decode_fold_vs_baseline": round(fold_ms / baseline_fold_ms, 3)
            if baseline_fold_ms
            else None,
            "rel_l2_error": relative_l2_error(delta, decode(payload, spec, num_params)),
        }
    return {
        "num_params": num_params,
        "repeats": repeats,
        "seed": seed,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "baseline": baseline,
        "codecs": codecs,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its result as JSON; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.codec", description="Benchmark the update codecs."
    )
    parser.add_argument("--params", type=int, default=1_000_000, help="delta length")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic delta")
    args = parser.parse_args(argv)
    if args.params < 1 or args.repeats < 1:
        parser.error("--params and --repeats must be >= 1")
    result = run_codec_bench(num_params=args.params, repeats=args.repeats, seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
