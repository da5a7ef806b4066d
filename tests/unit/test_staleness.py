from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.tiers.staleness import StalenessPolicy, effective_tau


@pytest.mark.parametrize(
    ("policy", "tau", "expected"),
    [
        (StalenessPolicy(), 0, 1.0),
        (StalenessPolicy(), 3, 0.5),
        (StalenessPolicy(), 8, 1.0 / 3.0),
        (StalenessPolicy(kind="polynomial", a=1.0), 4, 0.2),
        (StalenessPolicy(kind="polynomial", a=0.5), 3, 0.5),
        (StalenessPolicy(kind="polynomial", a=0.0), 9, 1.0),
        (StalenessPolicy(kind="hinge", a=0.5, b=4), 0, 1.0),
        (StalenessPolicy(kind="hinge", a=0.5, b=4), 4, 1.0),
        (StalenessPolicy(kind="hinge", a=0.5, b=4), 6, 0.5),
        (StalenessPolicy(kind="hinge", a=2.0, b=0), 1, 1.0 / 3.0),
        (StalenessPolicy(kind="constant"), 0, 1.0),
        (StalenessPolicy(kind="constant"), 15, 1.0),
    ],
)
def test_weight_values(policy: StalenessPolicy, tau: int, expected: float) -> None:
    assert policy.weight(tau) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["fedbuff", "polynomial", "hinge", "constant"])
def test_weight_is_in_unit_interval_and_non_increasing(kind: str) -> None:
    policy = StalenessPolicy(kind=kind, a=0.7, b=3, max_staleness=64)  # type: ignore[arg-type]
    weights = [policy.weight(tau) for tau in range(65)]
    assert weights[0] == 1.0
    assert all(0.0 < w <= 1.0 for w in weights)
    assert all(later <= earlier for earlier, later in itertools.pairwise(weights))


def test_polynomial_with_half_exponent_equals_fedbuff() -> None:
    fedbuff = StalenessPolicy()
    poly = StalenessPolicy(kind="polynomial", a=0.5)
    for tau in range(20):
        assert poly.weight(tau) == pytest.approx(fedbuff.weight(tau), rel=1e-15)


def test_accepts_only_zero_to_max_staleness() -> None:
    policy = StalenessPolicy(max_staleness=16)
    assert not policy.accepts(-1)
    assert policy.accepts(0)
    assert policy.accepts(16)
    assert not policy.accepts(17)


def test_negative_tau_is_refused_by_weight() -> None:
    with pytest.raises(LocalProtocolError, match="effective_tau"):
        StalenessPolicy().weight(-1)


def test_effective_tau_clamps_updates_from_the_future() -> None:
    assert effective_tau(5, 3) == 2
    assert effective_tau(5, 5) == 0
    assert effective_tau(3, 5) == 0


@pytest.mark.parametrize(("known", "base"), [(-1, 0), (0, -1), (1.0, 0), (True, 0)])
def test_effective_tau_rejects_bad_versions(known: object, base: object) -> None:
    with pytest.raises(LocalProtocolError):
        effective_tau(known, base)  # type: ignore[arg-type]


def test_assess_reports_fresh_stale_ahead_and_rejected() -> None:
    policy = StalenessPolicy(max_staleness=4)
    fresh = policy.assess(10, 10)
    assert (fresh.tau, fresh.raw_tau, fresh.ahead, fresh.accepted, fresh.discount) == (
        0,
        0,
        False,
        True,
        1.0,
    )
    stale = policy.assess(10, 7)
    assert stale.tau == 3
    assert stale.discount == pytest.approx(0.5)
    ahead = policy.assess(10, 12)
    assert ahead.raw_tau == -2
    assert ahead.tau == 0
    assert ahead.ahead
    assert ahead.accepted
    assert ahead.discount == 1.0
    too_old = policy.assess(10, 5)
    assert too_old.tau == 5
    assert not too_old.accepted
    assert too_old.discount == 0.0


def test_an_acknowledged_input_is_never_refused_only_discounted() -> None:
    policy = StalenessPolicy(max_staleness=4)
    assert policy.assess_acknowledged(10, 7) == policy.assess(10, 7)
    assert not policy.assess(10, 7).late
    late = policy.assess_acknowledged(10, 0)
    assert (late.tau, late.accepted, late.late) == (10, True, True)
    assert late.discount == pytest.approx(1 / math.sqrt(11))
    # No delay makes the discount 0, which would drop the input's weight entirely.
    steep = StalenessPolicy(kind="polynomial", a=400.0, max_staleness=4)
    assert steep.weight(10**6) == 0.0
    assert 0.0 < steep.assess_acknowledged(10**6, 0).discount <= 1e-300


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "linear"},
        {"a": -0.1},
        {"a": math.nan},
        {"a": math.inf},
        {"a": "1"},
        {"a": True},
        {"b": -1},
        {"b": 1.5},
        {"max_staleness": -1},
        {"max_staleness": 2.0},
        {"max_staleness": True},
    ],
)
def test_invalid_parameters_raise_local_protocol_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        StalenessPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    policy = StalenessPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.a = 2.0  # type: ignore[misc]


def test_from_config_defaults_and_values() -> None:
    assert StalenessPolicy.from_config({}) == StalenessPolicy()
    policy = StalenessPolicy.from_config({"kind": "hinge", "a": 1, "b": 2, "max_staleness": 8})
    assert policy == StalenessPolicy(kind="hinge", a=1.0, b=2, max_staleness=8)
    assert isinstance(policy.a, float)


@pytest.mark.parametrize(
    ("mapping", "needle"),
    [
        ({"kinds": "fedbuff"}, "unknown key 'kinds'"),
        ({"kind": "linear"}, "staleness.kind is 'linear'"),
        ({"kind": 3}, "staleness.kind is 3"),
        ({"a": "0.5"}, "staleness.a is '0.5'"),
        ({"a": True}, "staleness.a is True"),
        ({"b": 2.5}, "staleness.b is 2.5"),
        ({"max_staleness": "16"}, "staleness.max_staleness is '16'"),
        ({"a": -1.0}, "a must be finite and >= 0"),
        ({"max_staleness": -3}, "max_staleness must be an integer >= 0"),
    ],
)
def test_from_config_errors_name_the_key_and_value(mapping: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        StalenessPolicy.from_config(mapping)


def test_from_config_uses_section_name_and_chains_cause() -> None:
    with pytest.raises(ConfigError, match=r"edge\.staleness") as info:
        StalenessPolicy.from_config({"a": -2}, section="edge.staleness")
    assert isinstance(info.value.__cause__, LocalProtocolError)
