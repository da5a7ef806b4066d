"""A registered child tier cannot claim more weight than its device updates can carry."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedtier.protocol.codecs import encode
from fedtier.protocol.envelope import seal
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.protocol.messages import Tier
from fedtier.tiers.core import (
    AdmissionRules,
    ModelView,
    NothingSeen,
    Outcome,
    admit_partial,
)
from fedtier.tiers.registry import KeyRegistry
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.testing import sign_partial
from tests.unit.test_regional import EDGES, FLEET, LAYOUT, edge_buffer

SENDERS = KeyRegistry.from_keys({"edge-0": EDGES[0].verify_key}, role="edge")
MODEL = ModelView(version=0, layout=LAYOUT.fingerprint, num_params=LAYOUT.num_params)


def rules(cap: int | None) -> AdmissionRules:
    return AdmissionRules(
        fleet=FLEET,
        limits=DEFAULT_LIMITS,
        staleness=StalenessPolicy(max_staleness=4),
        accepts=(Tier.EDGE,),
        max_samples_per_update=cap,
    )


def partial_claiming(sample_count: float | None) -> bytes:
    acc = edge_buffer(7, 3)  # n_samples 3, 4 and 5: sample_count 12
    message, data = sign_partial(EDGES[0], FLEET, LAYOUT, acc)
    if sample_count is None:
        return data
    lie = replace(message, sample_count=sample_count)
    return seal(lie, encode(np.asarray(acc.numerator), lie.codec), EDGES[0])


def admit(data: bytes, cap: int | None) -> tuple[Outcome, str]:
    decision = admit_partial(
        data, rules=rules(cap), senders=SENDERS, model=MODEL, seen=NothingSeen()
    )
    return decision.outcome, decision.reason or ""


@pytest.mark.parametrize("claimed", [None, 15.0])  # honest 12; at most 3 x 5
def test_a_partial_within_the_cap_is_accepted(claimed: float | None) -> None:
    assert admit(partial_claiming(claimed), cap=5) == (Outcome.ACCEPTED, "")


@pytest.mark.parametrize("claimed", [15.5, 1e308, float(2**63)])
def test_a_partial_claiming_more_than_its_updates_can_carry_is_inconsistent(
    claimed: float,
) -> None:
    assert admit(partial_claiming(claimed), cap=5) == (Outcome.REJECTED, "inconsistent_partial")


def test_without_a_cap_the_claim_is_taken() -> None:
    assert admit(partial_claiming(1e308), cap=None) == (Outcome.ACCEPTED, "")
