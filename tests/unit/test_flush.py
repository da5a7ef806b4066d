from __future__ import annotations

import dataclasses
import math

import pytest

from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.tiers.flush import FlushPolicy, FlushReason


def test_reasons_are_metric_label_strings() -> None:
    assert [str(r) for r in FlushReason] == ["count", "weight", "deadline"]
    assert FlushReason("deadline") is FlushReason.DEADLINE


def test_empty_buffer_never_flushes() -> None:
    policy = FlushPolicy(max_inputs=1, min_sample_weight=1.0, max_age_s=1.0)
    assert policy.should_flush(0, 0.0, None, now_s=1e9) is None
    assert policy.should_flush(0, 100.0, 0.0, now_s=1e9) is None


def test_count_trigger() -> None:
    policy = FlushPolicy(max_inputs=3, max_age_s=None)
    assert policy.should_flush(2, 10.0, 0.0, now_s=1e6) is None
    assert policy.should_flush(3, 10.0, 0.0, now_s=0.0) is FlushReason.COUNT
    assert policy.should_flush(4, 10.0, 0.0, now_s=0.0) is FlushReason.COUNT


def test_weight_trigger() -> None:
    policy = FlushPolicy(max_inputs=100, min_sample_weight=500.0, max_age_s=None)
    assert policy.should_flush(2, 499.5, 0.0, now_s=0.0) is None
    assert policy.should_flush(2, 500.0, 0.0, now_s=0.0) is FlushReason.WEIGHT


def test_no_weight_trigger_by_default() -> None:
    assert FlushPolicy().should_flush(1, 1e12, 0.0, now_s=0.0) is None


def test_deadline_is_due_exactly_at_deadline_at() -> None:
    # trio.move_on_at(deadline) wakes when current_time() >= deadline; the check
    # that follows must see the flush as due at that very instant.
    policy = FlushPolicy(max_inputs=10, max_age_s=2.5)
    deadline = policy.deadline_at(100.0)
    assert deadline == 102.5
    assert policy.should_flush(1, 1.0, 100.0, now_s=math.nextafter(deadline, 0.0)) is None
    assert policy.should_flush(1, 1.0, 100.0, now_s=deadline) is FlushReason.DEADLINE
    assert policy.should_flush(1, 1.0, 100.0, now_s=500.0) is FlushReason.DEADLINE


def test_deadline_at_is_none_without_inputs_or_deadline() -> None:
    assert FlushPolicy().deadline_at(None) is None
    assert FlushPolicy(max_age_s=None).deadline_at(5.0) is None
    assert FlushPolicy(max_age_s=None).should_flush(1, 1.0, 0.0, now_s=1e12) is None


def test_reason_priority_is_count_then_weight_then_deadline() -> None:
    policy = FlushPolicy(max_inputs=2, min_sample_weight=10.0, max_age_s=1.0)
    assert policy.should_flush(2, 20.0, 0.0, now_s=5.0) is FlushReason.COUNT
    assert policy.should_flush(1, 20.0, 0.0, now_s=5.0) is FlushReason.WEIGHT
    assert policy.should_flush(1, 5.0, 0.0, now_s=5.0) is FlushReason.DEADLINE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_inputs": 0},
        {"max_inputs": 2.0},
        {"max_inputs": True},
        {"min_sample_weight": 0.0},
        {"min_sample_weight": -1.0},
        {"min_sample_weight": math.inf},
        {"max_age_s": 0},
        {"max_age_s": math.nan},
        {"max_age_s": "30"},
        {"max_age_s": False},
    ],
)
def test_invalid_parameters_raise_local_protocol_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        FlushPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FlushPolicy().max_inputs = 3  # type: ignore[misc]


def test_from_config_defaults_values_and_switching_off() -> None:
    assert FlushPolicy.from_config({}) == FlushPolicy()
    policy = FlushPolicy.from_config({"max_inputs": 50, "min_sample_weight": 1000, "max_age_s": 5})
    assert policy == FlushPolicy(max_inputs=50, min_sample_weight=1000.0, max_age_s=5.0)
    off = FlushPolicy.from_config({"max_age_s": False, "min_sample_weight": None})
    assert off.max_age_s is None
    assert off.min_sample_weight is None


@pytest.mark.parametrize(
    ("mapping", "needle"),
    [
        ({"max_input": 3}, "unknown key 'max_input'"),
        ({"max_inputs": 0}, "flush.max_inputs is 0"),
        ({"max_inputs": "10"}, "flush.max_inputs is '10'"),
        ({"max_inputs": 2.0}, "flush.max_inputs is 2.0"),
        ({"max_age_s": -1}, "flush.max_age_s is -1"),
        ({"max_age_s": True}, "flush.max_age_s is True"),
        ({"min_sample_weight": "lots"}, "flush.min_sample_weight is 'lots'"),
        ({"min_sample_weight": math.inf}, "flush.min_sample_weight is inf"),
    ],
)
def test_from_config_errors_name_the_key_and_value(mapping: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FlushPolicy.from_config(mapping)


def test_from_config_section_name_in_message() -> None:
    with pytest.raises(ConfigError, match=r"regional\.flush\.max_inputs"):
        FlushPolicy.from_config({"max_inputs": -1}, section="regional.flush")
