from __future__ import annotations

import pytest

from fedtier.protocol.bus import subject_matches
from fedtier.protocol.errors import LocalProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.names import MqttTopics, NatsSubjects, check_token

DEVICE = SigningIdentity.from_seed(bytes(32)).key_id


def test_mqtt_topics_match_the_edge_filter() -> None:
    t = MqttTopics("acme", "plant-7")
    assert t.update(DEVICE) == f"ft/acme/plant-7/up/{DEVICE}"
    assert subject_matches(t.updates_filter(), t.update(DEVICE), "mqtt")
    assert not subject_matches(t.updates_filter(), t.receipt(DEVICE), "mqtt")
    assert t.device_of(t.update(DEVICE)) == DEVICE
    assert t.device_of(t.receipt(DEVICE)) is None
    assert t.device_of("ft/acme/plant-7/up/not-a-key") is None


def test_nats_subjects_are_covered_by_their_streams() -> None:
    s = NatsSubjects("acme")
    _name, up_filter = s.up_stream()
    assert subject_matches(up_filter, s.to_region("eu-west"), "nats")
    assert subject_matches(up_filter, s.to_central(), "nats")
    _name, model_filter = s.model_stream()
    assert subject_matches(model_filter, s.model_announce(), "nats")
    assert not subject_matches(up_filter, s.model_announce(), "nats")
    assert s.blob_object(12) == "v12"


@pytest.mark.parametrize(
    "bad", ["", "Upper", "a/b", "a.b", "+", "#", "*", ">", "x" * 65, "-x", "a b"]
)
def test_bad_tokens_are_refused(bad: str) -> None:
    with pytest.raises(LocalProtocolError, match="invalid"):
        check_token("site", bad)


def test_device_ids_must_be_key_ids() -> None:
    with pytest.raises(LocalProtocolError, match="key id"):
        MqttTopics("acme", "s1").update("#")


@pytest.mark.parametrize(
    ("pattern", "subject", "flavor", "expected"),
    [
        ("a/+/c", "a/b/c", "mqtt", True),
        ("a/+/c", "a/b/d", "mqtt", False),
        ("a/#", "a", "mqtt", True),
        ("a/#", "a/b/c", "mqtt", True),
        ("a.*.c", "a.b.c", "nats", True),
        ("a.>", "a", "nats", False),
        ("a.>", "a.b.c", "nats", True),
        ("a.b", "a.b.c", "nats", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, flavor: str, expected: bool) -> None:
    assert subject_matches(pattern, subject, flavor) is expected  # type: ignore[arg-type]
