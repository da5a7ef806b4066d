"""The attack suite on a real mesh, small: every defence holds and nothing honest is lost.

Runs ``fedtier sim attack`` (its ``main``, with ``--json``) exactly as
docs/attacks.md shows the small run: brokers run as ``deploy/`` configures them
(TLS, a client certificate per device and daemon, the deployed Mosquitto
ACL), daemons, two fleet processes of
honest devices training, two attacker devices with registered keys, and a
registered edge key sending hostile partials, then an edge meeting a model
blob that fails its digest. One run (~50 s) backs every
assertion below; each could fail on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedtier.protocol.errors import Reason
from fedtier.simulations.attack import BROKER_REFUSED, EXPECTED, main

pytestmark = pytest.mark.brokers

SMALL = ["--devices", "6", "--attackers", "2", "--updates", "20", "--seed", "3"]
"""The small configuration of docs/attacks.md."""

TYPED = {r.value for r in Reason}


def answers(result: dict[str, Any], attack: str) -> dict[str, int]:
    counts = result["counts"][attack]
    assert isinstance(counts, dict)
    return counts


def test_small_attack_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([*SMALL, "--out", str(tmp_path / "out"), "--json"])
    result = json.loads(capsys.readouterr().out)
    why = json.dumps({k: result[k] for k in ("failures", "crashes", "counts", "check")}, indent=1)
    assert status == 0, why
    assert not result["failed"], why
    # The exactly-once checker over the honest devices' logs.
    check = result["check"]
    assert check["counts"]["lost"] == 0, why
    assert check["counts"]["duplicated"] == 0, why
    assert check["counts"]["unexpected"] == 0, why
    assert check["counts"]["ok"] >= 20, why
    assert result["crashes"] == [], why
    assert result["drained"], why
    # Every attack ran, and each got the answer its rule allows.
    for attack, expect in EXPECTED.items():
        got = answers(result, attack)
        for key in got:
            status_, _, reason = key.partition(":")
            if status_ == "rejected":
                assert reason in TYPED, (attack, key)
            elif status_ == BROKER_REFUSED and expect == "rejected":
                assert reason == "not_authorized", (attack, key)
            elif expect == "rejected":
                pytest.fail(f"{attack} was {key}")
    assert set(answers(result, "future_base")) == {"rejected:future_base"}
    assert set(answers(result, "future_base_max")) == {"rejected:future_base"}
    assert set(answers(result, "forged_signature")) == {"rejected:bad_signature"}
    assert set(answers(result, "replay_seq")) == {"rejected:replay"}
    # The TLS mesh's ACL refuses a publish on another device's topic at the broker.
    assert set(answers(result, "other_topic")) == {f"{BROKER_REFUSED}:not_authorized"}
    assert set(answers(result, "replay_id")) <= {"duplicate:-", "rejected:replay"}
    assert answers(result, "flood").get("rejected:rate_limited", 0) >= 1
    # Bounded attacks that were accepted kept only bounded influence.
    effects = result["effects"].values()
    inflation = [e for e in effects if e["attack"] == "weight_inflation"]
    assert all(e["weight"] <= 200 for e in inflation), inflation
    for effect in effects:
        assert effect["effective_norm"] <= 100.0 + 1e-3, effect
        assert effect["counted"] == 1 or "quarantined" in effect, effect
    scaled = [e for e in effects if e["attack"] == "scaling"]
    assert all(e["clip_scale"] < 1e-3 for e in scaled), scaled
    # A registered edge key's hostile partials: quarantined with their reasons.
    assert answers(result, "partial_repeated_inputs") == {"quarantined:malformed": 1}
    assert answers(result, "partial_leaf_counted_twice") == {"quarantined:leaf_counted_twice": 1}
    # Over the regional's weight cap on partials (update_count x max_samples).
    assert answers(result, "partial_huge_sample_count") == {"quarantined:inconsistent_partial": 2}
    # A model blob failing its digest: the edge that met it skipped it and served a later one.
    blob = result["blob"]
    assert blob["skipped"], blob
    assert blob["served_after"] > blob["tampered_version"], blob
    assert json.loads((tmp_path / "out" / "attack.json").read_text())["failed"] is False
