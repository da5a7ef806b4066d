"""Error feedback: nothing the codec drops is lost for good, and the residual stays bounded."""

from __future__ import annotations

import numpy as np
import pytest

from fedtier.client.error_feedback import ErrorFeedback
from fedtier.protocol.codecs import CodecSpec, decode, encode
from fedtier.protocol.errors import LocalProtocolError

N = 1_000
ROUNDS = 300


@pytest.mark.parametrize("name", ["top50+f32", "top50+i8", "top50+f16+varint", "top10+i8"])
def test_sent_tracks_true_and_the_residual_stays_bounded(name: str) -> None:
    spec = CodecSpec.parse(name)
    feedback = ErrorFeedback(N)
    rng = np.random.default_rng(1)
    true_sum = np.zeros(N, np.float64)
    sent_sum = np.zeros(N, np.float64)
    without_feedback = np.zeros(N, np.float64)
    norms = []
    for _ in range(ROUNDS):
        delta = rng.standard_normal(N, dtype=np.float32)
        sent = decode(feedback.encode(delta, spec), spec, N)
        true_sum += delta
        sent_sum += sent
        without_feedback += delta - decode(encode(delta, spec), spec, N)
        norms.append(float(np.linalg.norm(feedback.residual)))
        # The invariant holds after every round, not only at the end.
        np.testing.assert_allclose(true_sum - sent_sum, feedback.residual, rtol=0, atol=1e-4)
    # Bounded: saturates early (about 58 for 5 %, 132 for 1 %, per-round delta
    # norm ~32) and does not grow; without feedback the loss is a random walk.
    third = ROUNDS // 3
    assert max(norms[-third:]) <= 1.2 * max(norms[:third])
    assert spec.k is not None
    assert max(norms) < 5 * np.sqrt(N) * (50 / spec.k) ** 0.5
    assert np.linalg.norm(without_feedback) > 4 * norms[-1]


def test_lossless_codec_leaves_no_residual() -> None:
    feedback = ErrorFeedback(4)
    delta = np.array([1.0, -2.0, 3.5, 0.0], np.float32)
    payload = feedback.encode(delta, CodecSpec("f32"))
    assert payload == encode(delta, CodecSpec("f32"))
    assert not feedback.residual.any()


def test_dropped_entries_are_sent_in_a_later_round() -> None:
    spec = CodecSpec("f32", k=1, index="u32")
    feedback = ErrorFeedback(3)
    first = decode(feedback.encode(np.array([3.0, 2.0, 0.0], np.float32), spec), spec, 3)
    assert first.tolist() == [3.0, 0.0, 0.0]
    assert feedback.residual.tolist() == [0.0, 2.0, 0.0]
    second = decode(feedback.encode(np.array([0.0, 1.0, 0.5], np.float32), spec), spec, 3)
    assert second.tolist() == [0.0, 3.0, 0.0]
    assert feedback.residual.tolist() == [0.0, 0.0, 0.5]


def test_i8_residual_is_within_half_a_step() -> None:
    feedback = ErrorFeedback(512)
    delta = np.random.default_rng(2).standard_normal(512, dtype=np.float32)
    payload = feedback.encode(delta, CodecSpec("i8", chunk=512))
    scale = float(np.frombuffer(payload, "<f4", 1)[0])
    assert np.abs(feedback.residual).max() <= scale * 0.5001


def test_reset_and_read_only_residual() -> None:
    feedback = ErrorFeedback(3)
    feedback.encode(np.array([3.0, 2.0, 1.0], np.float32), CodecSpec("f32", k=1, index="u32"))
    residual = feedback.residual
    with pytest.raises(ValueError, match="read-only"):
        residual[0] = 1.0
    feedback.reset()
    assert not feedback.residual.any()
    assert feedback.num_params == 3


def test_a_failed_encode_keeps_the_residual() -> None:
    feedback = ErrorFeedback(2)
    feedback.encode(np.array([3.0, 2.0], np.float32), CodecSpec("f32", k=1, index="u32"))
    with pytest.raises(LocalProtocolError, match="65504"):
        feedback.encode(np.array([1e6, 0.0], np.float32), CodecSpec("f16"))
    assert feedback.residual.tolist() == [0.0, 2.0]


@pytest.mark.parametrize(
    "delta",
    [np.zeros(4, np.float32), np.zeros(3, np.float64), np.zeros((3, 1), np.float32)],
    ids=["length", "dtype", "shape"],
)
def test_wrong_delta_is_refused(delta: np.ndarray) -> None:
    with pytest.raises(LocalProtocolError, match="1-D float32 array of 3 values"):
        ErrorFeedback(3).encode(delta, CodecSpec("f32"))


def test_num_params_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError, match="num_params is 0"):
        ErrorFeedback(0)
