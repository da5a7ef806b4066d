"""The dedupe floor: a device update resent after the prune deleted its row is a replay."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np

from fedtier.protocol.errors import Reason
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.tiers.core import (
    AdmissionRules,
    Decision,
    ModelView,
    Outcome,
    admit_update,
)
from fedtier.tiers.registry import KeyRegistry
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.store import (
    InputRecord,
    OutboxEntry,
    StateStore,
    open_state_store,
    prune_done_inputs,
)
from fedtier.tiers.store._schema import SCHEMA_VERSION
from fedtier.tiers.testing import SimDevice
from fedtier.tiers.tier import StoreLedger, TierDaemon

FLEET = "acme"
LAYOUT = layout_of([("w", (4,))])
DEVICE = SimDevice(SigningIdentity.from_seed(b"\x31" * 32), FLEET, LAYOUT)
SENDERS = KeyRegistry.from_keys({"d0": DEVICE.identity.verify_key}, role="device")
# A quiet fleet: the model never moved, so staleness refuses nothing.
MODEL = ModelView(version=0, layout=LAYOUT.fingerprint, num_params=LAYOUT.num_params)
RULES = AdmissionRules(
    fleet=FLEET, limits=DEFAULT_LIMITS, staleness=StalenessPolicy(max_staleness=4), max_norm=100.0
)
SENDER = DEVICE.key_id


def admit(store: StateStore, data: bytes) -> Decision:
    """Admission as an edge runs it: the daemon's ledger over its store (no unsafe switch)."""
    daemon = SimpleNamespace(store=store, _unsafe_dedupe_open_buffer_only=False)
    ledger = StoreLedger(cast("TierDaemon", daemon))
    return admit_update(data, rules=RULES, senders=SENDERS, model=MODEL, seen=ledger)


def record(decision: Decision, *, epoch: int, accepted_ms: int) -> InputRecord:
    accepted = decision.accepted
    assert accepted is not None
    return InputRecord(
        sender=accepted.sender,
        input_id=accepted.input_id,
        seq=accepted.seq,
        epoch=epoch,
        envelope=b"envelope-%d" % accepted.seq,
        base_version=0,
        n_samples=1.0,
        tau=0,
        discount=1.0,
        clip_scale=1.0,
        accepted_ms=accepted_ms,
    )


async def finish_epoch(store: StateStore, epoch: int, count: int) -> None:
    """Flush ``epoch`` and acknowledge its partial upstream, so its inputs are done."""
    pid = (100 + epoch).to_bytes(16, "big")
    entry = OutboxEntry(pid, epoch, epoch + 1, "ft.acme.up.region.r1", b"partial", "")
    await store.flush(epoch, entry, count, out_seq=epoch + 1)
    await store.mark_acked(pid)


def prune(path: Path, *, batch: int = 100) -> int:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        counts = prune_done_inputs(conn, accepted_before_ms=10**12, batch=batch)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return counts.inputs


def update(seq: int) -> bytes:
    return DEVICE.update(np.full(4, 0.1, np.float32), base_version=0, seq=seq)[1]


async def test_a_pruned_update_resent_is_a_replay_and_a_new_one_is_accepted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    first, second = update(1), update(2)
    async with open_state_store(path, in_thread=False) as store:
        for i, data in enumerate((first, second)):
            decision = admit(store, data)
            assert decision.outcome is Outcome.ACCEPTED
            await store.accept(record(decision, epoch=0, accepted_ms=1000 + i))
        await finish_epoch(store, 0, 2)
        assert admit(store, first).outcome is Outcome.DUPLICATE  # known before the prune
        assert store.seq_floor(SENDER) is None
    assert prune(path) == 2
    # Reopened: the floor is in the store, not in memory, so it survives a restart.
    async with open_state_store(path, in_thread=False) as store:
        assert store.seq_floor(SENDER) == 2
        for data in (first, second):
            resent = admit(store, data)
            assert resent.outcome is Outcome.REJECTED
            assert resent.reason is Reason.REPLAY
            assert resent.accepted is None
        fresh = admit(store, update(3))
        assert fresh.outcome is Outcome.ACCEPTED
        await store.accept(record(fresh, epoch=1, accepted_ms=2000))
        assert admit(store, update(3)).reason is Reason.REPLAY  # seq 3 now taken by an input
        assert store.high_water(SENDER) == 3


async def test_the_floor_only_moves_up(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path, in_thread=False) as store:
        # Seq 5 arrives first, then seq 3 (a resend of an update lost on the way).
        for i, seq in enumerate((5, 3)):
            decision = admit(store, update(seq))
            assert decision.outcome is Outcome.ACCEPTED
            await store.accept(record(decision, epoch=0, accepted_ms=1000 + i))
        await finish_epoch(store, 0, 2)
    # Oldest first: seq 5 goes in the first batch, seq 3 in the second.
    assert prune(path, batch=1) == 1
    async with open_state_store(path, in_thread=False) as store:
        assert store.seq_floor(SENDER) == 5
    assert prune(path, batch=1) == 1
    async with open_state_store(path, in_thread=False) as store:
        assert store.seq_floor(SENDER) == 5
        assert store.seq_taken(SENDER, 4)  # never seen, but below the floor
        assert not store.seq_taken(SENDER, 6)
        assert admit(store, update(6)).outcome is Outcome.ACCEPTED


async def test_a_version_6_store_is_migrated_with_no_floor(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path, in_thread=False) as store:
        decision = admit(store, update(1))
        await store.accept(record(decision, epoch=0, accepted_ms=1000))
        await finish_epoch(store, 0, 1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("ALTER TABLE senders DROP COLUMN pruned_seq")  # as version 6 had it
    conn.execute("PRAGMA user_version = 6")
    conn.close()
    async with open_state_store(path, in_thread=False) as store:
        assert store.high_water(SENDER) == 1
        assert store.seq_floor(SENDER) is None
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    assert version == SCHEMA_VERSION == 7
    # The migrated store records a floor at its first prune.
    assert prune(path) == 1
    async with open_state_store(path, in_thread=False) as store:
        assert store.seq_floor(SENDER) == 1
