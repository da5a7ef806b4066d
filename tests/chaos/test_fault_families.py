"""Every fault family on a real HA mesh at once, then each family with its safety turned off.

The safe run is the ``ha`` topology (leases on every daemon; an active and a
standby regional per region and central; one edge per site; a 3-node NATS
cluster with three copies of every stream and bucket) under every family
below at once, plus the losses of a regional's and of the central's machine
and kills of NATS nodes; it must end with nothing lost, duplicated or
unexpected, and every planned fault must have hit. (Two edges per site are
not exactly-once yet: docs/chaos-results.md, "Edge pairs".) Each family then runs alone in the
``single`` topology with its safety off, and the checker must report loss or
duplication: a fault test that cannot fail proves nothing. Where a random
schedule might miss the window that the safety covers, the fault is made
deterministic (a crash point at a chosen passage, a broker that does not
autosave, edges frozen while the broker holds their updates).

Every run starts its own Mosquitto, nats-server, proxies, daemons and fleet
(``simulations.chaos.run_chaos``) and stops them all before it returns; the
whole run is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from fedtier.simulations.chaos import ChaosOptions, ChaosResult, FaultPlan, run_chaos
from fedtier.simulations.checker import render_report

pytestmark = pytest.mark.brokers


@dataclass(frozen=True)
class Family:
    name: str
    faults: FaultPlan
    # The safety this family's faults test, and what its absence must show
    # (any of these rows of the checker's report).
    unsafe: frozenset[str]
    shows: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


FAMILIES = [
    Family(
        # kill -9 of every tier at random moments, plus each tier crashing once
        # right after its acknowledgement (edge: after the receipt) and once
        # between commit and acknowledgement. A 200 ms commit window makes
        # "before the commit" a wide target for the unsafe run.
        "daemon_kill",
        FaultPlan(kill_edge=2, kill_regional=1, kill_central=1),
        frozenset({"ack_before_commit"}),
        ("lost",),
        {
            "crash_at": ",".join(
                [
                    "edge.after_receipt:1:6",
                    "edge.after_commit:1:12",
                    "regional.after_ack:1:1",
                    "regional.after_commit:1:6",
                    "central.after_ack:1:1",
                    "central.after_commit:1:6",
                ]
            ),
            "crash_once": True,
            "commit_window_ms": 200.0,
        },
    ),
    Family(
        # Mosquitto keeps acknowledged updates in memory until its next
        # autosave: with none in the run, its kill -9 loses what queued for
        # the frozen edges. Devices that keep their outbox resend.
        "mosquitto_kill",
        FaultPlan(kill_mosquitto=2),
        frozenset({"device_trust_puback"}),
        ("lost",),
        {"mosquitto_autosave_s": 3600},
    ),
    Family(
        # nats-server down for 2-3 s: edges flush meanwhile; their partials
        # must wait in the outbox until a PubAck.
        "nats_kill",
        FaultPlan(kill_nats=2, broker_down_s=(2.0, 3.0)),
        frozenset({"drop_unconfirmed_partials"}),
        ("lost",),
    ),
    Family(
        # Frozen past the MQTT keepalive and the JetStream ack wait: brokers
        # redeliver, devices resend, and the copies arrive after the originals
        # were flushed. Only dedupe in the store (no window) keeps them out.
        # Without it an update is counted twice, or, when both copies land in
        # one regional partial, the central quarantines that partial as
        # inconsistent (one leaf listed twice) and its updates never count.
        "sigstop",
        FaultPlan(stop_edge=2, stop_regional=1, stop_central=1),
        frozenset({"dedupe_open_buffer_only"}),
        ("duplicated", "lost"),
    ),
    Family(
        # Links reset, partitioned and slowed between edges and NATS and
        # between devices and Mosquitto: a partial whose PubAck never came
        # must be resent with the same id.
        "tcp_proxy",
        FaultPlan(proxy_reset=2, proxy_partition=2, proxy_delay=2),
        frozenset({"drop_unconfirmed_partials"}),
        ("lost",),
    ),
    Family(
        # Regionals and the central with max_staleness 0: every partial that
        # arrives after a newer version exists is late, more so across a
        # regional's kill -9. Its updates were acknowledged, so it must be
        # folded (discounted), not refused.
        "late_partial",
        FaultPlan(kill_regional=1),
        frozenset({"reject_late_partials"}),
        ("lost",),
        # Two regions: the other region keeps moving the central's version
        # while one regional is down or catching up, so its partials arrive
        # late. With one region, whether any partial is late depends on timing
        # alone, and a loaded machine could end the run without one.
        {"partial_max_staleness": 0, "regions": (("r1", ("s1",)), ("r2", ("s2",)))},
    ),
]


def explain(result: ChaosResult) -> str:
    lines = render_report(result.report, result.updates_in_logs) + result.summary_lines()
    return "\n".join(lines)


def options_for(family: Family, out_dir: Path) -> ChaosOptions:
    return ChaosOptions(
        out_dir=out_dir,
        devices=10,
        updates=30,
        duration_s=6.0,
        max_run_s=90.0,
        drain_timeout_s=60.0,
        seed=7,
        ack_wait_s=2.0,
        faults=family.faults,
        unsafe=family.unsafe,
        **family.options,
    )


def every_family(*, ha: bool) -> tuple[FaultPlan, dict[str, Any]]:
    """Every family's faults and options in one plan, plus the HA-only faults with ``ha``."""
    counts: dict[str, int] = {}
    options: dict[str, Any] = {}
    for family in FAMILIES:
        for kind in FaultPlan.kinds():
            counts[kind] = counts.get(kind, 0) + family.faults.count(kind)
        options.update(family.options)
    # Machine losses of every tier (each leased tier acknowledges an input once
    # upstream has it) and nodes of the cluster.
    if ha:
        counts.update(lose_edge=1, lose_regional=1, lose_central=1, kill_nats_node=2)
    plan: Any = FaultPlan  # counts by kind name
    return plan(**counts, broker_down_s=(2.0, 3.0)), options


# "single" is what most fleets run (one instance per tier, restarted on its own
# disk); "ha" adds standbys, machine losses and a 3-node NATS cluster.
TOPOLOGIES = ["single", "ha"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_every_fault_family_at_once(topology: str, tmp_path: Path) -> None:
    ha = topology == "ha"
    faults, family_options = every_family(ha=ha)
    options = ChaosOptions(
        out_dir=tmp_path / "out",
        topology=topology,
        edge_pairs=ha,  # two edges per site, one active
        devices=10,
        updates=60,
        duration_s=20.0,
        max_run_s=150.0,
        # A loaded machine stretches the ha run's takeovers: a node kill moves the
        # lease bucket's leader, and a refresh not confirmed within 0.8 x ttl_s
        # costs the lease (every instance of a tier may be standby for a while).
        drain_timeout_s=180.0 if ha else 90.0,
        lease_ttl_s=10.0,
        seed=7,
        ack_wait_s=2.0,
        faults=faults,
        **family_options,
    )
    with trio.fail_after(450):
        result = await run_chaos(options)
    why = explain(result)
    # Every planned fault hit a running target (a loss: the active instance).
    for kind in FaultPlan.kinds():
        assert result.faults[kind] == faults.count(kind), why
    for tier in ("edge", "regional", "central"):
        assert result.exits[f"{tier}:crash_point"] >= 1, why
    if ha:
        assert result.exits["edge:lost"] == 1, why
        assert result.exits["regional:lost"] == 1, why
        assert result.exits["central:lost"] == 1, why
    assert not result.failed, why
    assert result.drained, why
    assert result.report.counts["ok"] >= 40, why


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
async def test_fault_family_with_its_safety_off(family: Family, tmp_path: Path) -> None:
    options = options_for(family, tmp_path / "out")
    with trio.fail_after(240):
        result = await run_chaos(options)
    why = explain(result)
    # Every planned fault hit a running target.
    for kind in FaultPlan.kinds():
        assert result.faults[kind] == family.faults.count(kind), why
    if "crash_at" in family.options:
        for tier in ("edge", "regional", "central"):
            assert result.exits[f"{tier}:crash_point"] >= 1, why
    assert sum(result.report.counts[row] for row in family.shows) > 0, why
