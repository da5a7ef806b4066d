from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store import (
    InputRecord,
    InputState,
    ModelVersionRecord,
    OutboxEntry,
    StateStore,
    TargetRecord,
    drop_quarantined,
    open_state_store,
    open_store_exclusively,
    read_latest_version,
    read_lineage,
    read_quarantine,
    read_quarantine_dropped,
    read_stored_version,
    read_stored_versions,
    read_target_reached,
    release_quarantined,
)
from fedtier.tiers.store._schema import SCHEMA_VERSION
from fedtier.tiers.store._segments import SegmentLog, is_ref, segment_folder

SENDER = "a" * 24
OTHER = "b" * 24


def record(i: int, *, epoch: int = 0, sender: str = SENDER, seq: int | None = None) -> InputRecord:
    return InputRecord(
        sender=sender,
        input_id=i.to_bytes(16, "big"),
        seq=i if seq is None else seq,
        epoch=epoch,
        envelope=b"envelope-%d" % i,
        base_version=3,
        n_samples=10.0 + i,
        tau=1,
        discount=0.5,
        clip_scale=1.0,
        accepted_ms=1_000 + i,
        trace=f"trace-{i}",
    )


def outbox(pid: int, epoch: int) -> OutboxEntry:
    return OutboxEntry(
        partial_id=pid.to_bytes(16, "big"),
        epoch=epoch,
        seq=100 + pid,
        subject="ft.acme.up.region.r1",
        envelope=b"partial-%d" % pid,
        trace="parent",
    )


async def test_grouped_commit_is_durable_and_grouped(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path, commit_window_s=0.005) as store:
        async with trio.open_nursery() as nursery:
            for i in range(1, 41):
                nursery.start_soon(store.accept, record(i))
        # 40 concurrent accepts share a handful of transactions, not 40 fsyncs.
        assert store.commits < 10
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert sorted(r.input_id for r in recovery.open_inputs) == [
            i.to_bytes(16, "big") for i in range(1, 41)
        ]
        assert recovery.open_inputs[0].envelope.startswith(b"envelope-")
        assert recovery.high_water == {SENDER: 40}


async def test_input_is_pending_until_its_commit(tmp_path: Path) -> None:
    async with open_state_store(tmp_path / "s.sqlite", commit_window_s=0.01) as store:
        ticket = store.submit_accept(record(1))
        assert store.input_state(SENDER, record(1).input_id) is InputState.PENDING
        assert store.pending_ticket(SENDER, record(1).input_id) is ticket
        assert store.high_water(SENDER) == 1
        durable_before = ticket.durable
        await ticket.wait()
        assert not durable_before
        assert ticket.durable
        assert store.input_state(SENDER, record(1).input_id) is InputState.OPEN
        assert store.pending_ticket(SENDER, record(1).input_id) is None


async def test_recover_rebuilds_the_open_buffer_in_fold_order(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        for i in (1, 2, 3):
            store.submit_accept(record(i, epoch=0))
        await store.flush(0, outbox(7, 0), input_count=3, out_seq=107)
        for i in (5, 4):
            store.submit_accept(record(i, epoch=1))
        await store.accept(record(6, epoch=1))
    async with open_state_store(path) as store:
        recovery = await store.recover()
    assert recovery.open_epoch == 1
    assert [r.input_id[-1] for r in recovery.open_inputs] == [5, 4, 6]
    assert recovery.open_inputs[0] == record(5, epoch=1)
    assert [e.partial_id for e in recovery.pending_outbox] == [outbox(7, 0).partial_id]
    assert recovery.pending_outbox[0] == outbox(7, 0)
    assert recovery.out_seq == 107


async def test_outbox_is_kept_until_acked_then_bytes_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        store.submit_accept(record(1))
        await store.flush(0, outbox(9, 0), input_count=1, out_seq=1)
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert len(recovery.pending_outbox) == 1
        assert store.outbox_state(outbox(9, 0).partial_id) == "pending"
        assert store.input_state(SENDER, record(1).input_id) is InputState.FLUSHED
        await store.mark_acked(outbox(9, 0).partial_id)
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.pending_outbox == ()
        assert store.outbox_state(outbox(9, 0).partial_id) == "acked"
        assert store.input_state(SENDER, record(1).input_id) is InputState.DONE
    with sqlite3.connect(path) as conn:
        (envelopes,) = conn.execute("SELECT count(*) FROM input_envelopes").fetchone()
        (outbox_bytes,) = conn.execute("SELECT envelope FROM outbox").fetchone()
    conn.close()
    assert envelopes == 0
    assert outbox_bytes is None


def stored_envelopes(path: Path) -> list[bytes]:
    """The envelopes ``input_envelopes`` names, read from the segment log (or inline)."""
    log = SegmentLog(segment_folder(path))
    conn = sqlite3.connect(path)
    try:
        values = [row[0] for row in conn.execute("SELECT envelope FROM input_envelopes")]
    finally:
        conn.close()
    return [log.read(v) if is_ref(v) else bytes(v) for v in values]


async def test_an_inputs_envelope_is_kept_while_open_and_deleted_at_its_flush(
    tmp_path: Path,
) -> None:
    # The partial in the outbox carries what a flushed input contributed, so its
    # envelope is no longer needed; an open input's is, to refold it.
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
        await store.accept(record(2))
        assert sorted(stored_envelopes(path)) == [b"envelope-1", b"envelope-2"]
        await store.flush(0, outbox(9, 0), input_count=2, out_seq=1)
        await store.accept(record(3, epoch=1))
        await store.flush(1, None, input_count=1, out_seq=1)
        await store.accept(record(4, epoch=2))
        assert stored_envelopes(path) == [b"envelope-4"]
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.open_inputs == (record(4, epoch=2),)
        assert store.input_state(SENDER, record(1).input_id) is InputState.FLUSHED
        assert store.input_state(SENDER, record(3).input_id) is InputState.DONE


async def test_a_missing_envelope_of_an_open_input_is_reported_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
        await store.accept(record(2))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "DELETE FROM input_envelopes WHERE pos = (SELECT pos FROM inputs WHERE input_id = ?)",
            (record(2).input_id,),
        )
    conn.close()
    async with open_state_store(path) as store:
        with pytest.raises(StoreError, match="envelopes of only 1"):
            await store.recover()


# Schema version 1 (fedtier before envelopes moved to their own table), verbatim.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB
);
CREATE TABLE IF NOT EXISTS inputs (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    input_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'flushed', 'done')),
    partial_id BLOB,
    version INTEGER,
    envelope BLOB,
    base_version INTEGER NOT NULL,
    n_samples REAL NOT NULL,
    tau INTEGER NOT NULL,
    discount REAL NOT NULL,
    clip_scale REAL NOT NULL,
    accepted_ms INTEGER NOT NULL,
    trace TEXT NOT NULL DEFAULT '',
    UNIQUE (sender, input_id)
);
CREATE INDEX IF NOT EXISTS inputs_by_epoch ON inputs (epoch, status);
CREATE INDEX IF NOT EXISTS inputs_by_partial ON inputs (partial_id);
CREATE INDEX IF NOT EXISTS inputs_by_sender_seq ON inputs (sender, seq);
CREATE TABLE IF NOT EXISTS senders (
    sender TEXT PRIMARY KEY,
    hwm INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    partial_id BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    subject TEXT NOT NULL,
    envelope BLOB,
    trace TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('pending', 'acked')),
    created_ms INTEGER NOT NULL,
    acked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY,
    blob BLOB NOT NULL,
    pointer BLOB NOT NULL,
    lineage BLOB NOT NULL,
    update_count INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS optimizer_state (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL
);
"""


def make_v1_store(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    rows = [
        # flushed into partial 9 (pending upstream), open in epoch 1, done
        (1, 0, "flushed", (9).to_bytes(16, "big"), b"envelope-1"),
        (2, 1, "open", None, b"envelope-2"),
        (3, 1, "open", None, b"envelope-3"),
        (4, 0, "done", (8).to_bytes(16, "big"), None),
    ]
    for i, epoch, status, partial, envelope in rows:
        r = record(i, epoch=epoch)
        conn.execute(
            "INSERT INTO inputs (sender, input_id, seq, epoch, status, partial_id, envelope,"
            " base_version, n_samples, tau, discount, clip_scale, accepted_ms, trace)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.sender,
                r.input_id,
                r.seq,
                epoch,
                status,
                partial,
                envelope,
                r.base_version,
                r.n_samples,
                r.tau,
                r.discount,
                r.clip_scale,
                r.accepted_ms,
                r.trace,
            ),
        )
    conn.execute("INSERT INTO senders (sender, hwm) VALUES (?, 4)", (SENDER,))
    conn.execute(
        "INSERT INTO outbox (partial_id, epoch, seq, subject, envelope, trace, state,"
        " created_ms) VALUES (?, 0, 109, 'ft.acme.up.region.r1', ?, 'parent', 'pending', 1)",
        ((9).to_bytes(16, "big"), b"partial-9"),
    )
    conn.execute("INSERT INTO meta (key, value) VALUES ('open_epoch', 1), ('out_seq', 109)")
    conn.execute("PRAGMA user_version = 1")
    conn.close()


async def test_a_version_1_store_is_migrated_without_losing_an_input(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    make_v1_store(path)
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.open_epoch == 1
        assert recovery.open_inputs == (record(2, epoch=1), record(3, epoch=1))
        assert [e.envelope for e in recovery.pending_outbox] == [b"partial-9"]
        assert recovery.high_water == {SENDER: 4}
        assert store.input_state(SENDER, record(1).input_id) is InputState.FLUSHED
        assert store.input_state(SENDER, record(4).input_id) is InputState.DONE
        # The migrated store works like a new one: the open epoch flushes.
        await store.flush(1, outbox(10, 1), input_count=2, out_seq=110)
        await store.accept(record(5, epoch=2))
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (inline,) = conn.execute(
            "SELECT count(*) FROM inputs WHERE envelope IS NOT NULL"
        ).fetchone()
    finally:
        conn.close()
    assert version == SCHEMA_VERSION
    assert inline == 0
    assert stored_envelopes(path) == [b"envelope-5"]
    async with open_state_store(path) as store:
        assert (await store.recover()).open_inputs == (record(5, epoch=2),)


def make_v2_store(path: Path) -> None:
    """A schema version 2 store (before metrics and rollbacks): v1's tables, envelopes apart."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        V1_SCHEMA.replace("    envelope BLOB,\n    base_version", "    base_version")
    )
    conn.executescript(
        "CREATE TABLE IF NOT EXISTS input_envelopes (pos INTEGER PRIMARY KEY,"
        " envelope BLOB NOT NULL);"
    )
    conn.execute(
        "INSERT INTO inputs (sender, input_id, seq, epoch, status, base_version, n_samples,"
        " tau, discount, clip_scale, accepted_ms, trace)"
        " VALUES (?, ?, 1, 1, 'open', 3, 11.0, 1, 0.5, 1.0, 1001, 'trace-1')",
        (SENDER, (1).to_bytes(16, "big")),
    )
    conn.execute("INSERT INTO input_envelopes (pos, envelope) VALUES (1, ?)", (b"envelope-1",))
    for version in (0, 1):
        conn.execute(
            "INSERT INTO model_versions (version, blob, pointer, lineage, update_count,"
            " created_ms, published) VALUES (?, ?, ?, ?, ?, ?, 1)",
            (version, b"blob%d" % version, b"ptr%d" % version, b"\x07" * 16 * version, version, 5),
        )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('open_epoch', 1), ('out_seq', 9),"
        " ('known_version', 1)"
    )
    conn.execute("PRAGMA user_version = 2")
    conn.close()


async def test_a_version_2_store_is_migrated_and_records_metrics(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    make_v2_store(path)
    # Read before the central migrates it: no metrics, no rollbacks, nothing lost.
    before = read_stored_versions(path)
    assert [(v.version, dict(v.metrics), v.rollback_of) for v in before] == [
        (0, {}, None),
        (1, {}, None),
    ]
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.open_epoch == 1
        assert [r.input_id for r in recovery.open_inputs] == [(1).to_bytes(16, "big")]
        assert recovery.latest_version is not None
        assert recovery.latest_version.version == 1
        assert store.lineage(1) == [b"\x07" * 16]
        assert store.model_metrics(1) == {}
        await store.submit_metrics(1, {"accuracy": 0.75, "loss": 0.5}, evaluated_ms=77).wait()
        assert store.model_metrics(1) == {"accuracy": 0.75, "loss": 0.5}
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        columns = {row[1] for row in conn.execute("PRAGMA table_info(model_versions)")}
    finally:
        conn.close()
    assert version == SCHEMA_VERSION == 7
    assert "rollback_of" in columns
    after = read_stored_version(path, 1)
    assert after.metrics == {"accuracy": 0.75, "loss": 0.5}
    assert after.evaluated_ms == 77
    assert after.rollback_of is None
    assert after.record.blob == b"blob1"


async def test_metrics_and_the_reached_target_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.submit_version(
            ModelVersionRecord(0, b"blob0", b"ptr0", (), 0, 1),
            epoch=None,
            input_count=0,
            optimizer_state={},
            out_seq=5,
        ).wait()
        with pytest.raises(StoreError, match="not storable"):
            store.submit_metrics(0, {"loss": float("nan")}, evaluated_ms=1)
        await store.submit_metrics(0, {"r2": 0.1}, evaluated_ms=1).wait()
        await store.submit_metrics(0, {"r2": 0.5, "mse": 2.0}, evaluated_ms=2).wait()
        target = TargetRecord(0, "r2", 0.5, 0.4, 3)
        await store.submit_target_reached(target).wait()
    async with open_state_store(path) as store:
        assert store.model_metrics(0) == {"mse": 2.0, "r2": 0.5}  # the second run replaced it
        assert store.target_reached() == target
        await store.submit_target_reached(None).wait()
        assert store.target_reached() is None
    assert read_target_reached(path) is None
    latest = read_latest_version(path)
    assert latest is not None
    assert latest.version == 0
    assert latest.metrics == {"mse": 2.0, "r2": 0.5}


async def test_an_offline_write_needs_the_store_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with pytest.raises(StoreError, match="does not exist"):
        with open_store_exclusively(path):
            pass
    async with open_state_store(path) as store:
        await store.submit_version(
            ModelVersionRecord(0, b"blob0", b"ptr0", (), 0, 1),
            epoch=None,
            input_count=0,
            optimizer_state={"m": np.zeros(2, np.float32)},
            out_seq=5,
        ).wait()
        # While a daemon has the store open, an offline writer is refused at once.
        with pytest.raises(StoreError, match="stop the central first"):
            with open_store_exclusively(path):
                pass
        # Read-only readers are fine meanwhile.
        assert [v.version for v in read_stored_versions(path)] == [0]
    with open_store_exclusively(path) as admin:
        latest = admin.latest_version()
        assert latest is not None
        assert admin.out_seq() == 5
        with pytest.raises(StoreError, match="does not follow"):
            admin.add_rollback_version(
                ModelVersionRecord(5, b"blob5", b"ptr5", (), 0, 2), rollback_of=0, out_seq=6
            )
        admin.add_rollback_version(
            ModelVersionRecord(1, b"blob1", b"ptr1", (), 0, 2), rollback_of=0, out_seq=6
        )
        # The daemon cannot open the store while the offline writer holds it.
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            sqlite3.connect(path, timeout=0).execute("SELECT count(*) FROM meta").fetchone()
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.latest_version is not None
        assert recovery.latest_version.version == 1
        assert recovery.unpublished_versions == (0, 1)
        assert recovery.model_pointer == b"ptr1"
        assert recovery.out_seq == 6
        assert recovery.optimizer_state == {}  # cleared: a rollback starts the optimizer afresh
    assert read_stored_version(path, 1).rollback_of == 0


async def test_dedupe_of_received_ids_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1, sender=OTHER))
        await store.flush(0, None, input_count=1, out_seq=1)
    async with open_state_store(path) as store:
        assert store.input_state(OTHER, record(1).input_id) is InputState.DONE
        assert store.input_state(SENDER, record(1).input_id) is None
        assert store.input_state(OTHER, record(2).input_id) is None


async def test_high_water_marks_survive_reopen_and_never_go_down(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        store.submit_accept(record(1, seq=50))
        store.submit_accept(record(2, seq=40))
        await store.accept(record(3, sender=OTHER, seq=7))
        assert store.high_water(SENDER) == 50
    async with open_state_store(path) as store:
        assert store.high_water(SENDER) == 50
        assert store.high_water(OTHER) == 7
        assert store.high_water("c" * 24) is None
        assert (await store.recover()).high_water == {SENDER: 50, OTHER: 7}


async def test_unawaited_writes_are_dropped_at_close_like_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path, commit_window_s=10.0) as store:
        ticket = store.submit_accept(record(1))
    with pytest.raises(StoreError):
        await ticket.wait()
    async with open_state_store(path) as store:
        assert (await store.recover()).open_inputs == ()
        assert store.high_water(SENDER) is None


async def test_flush_naming_the_wrong_inputs_fails_the_commit(tmp_path: Path) -> None:
    # Both the committer and the waiting caller fail with it.
    with pytest.RaisesGroup(StoreError, StoreError, flatten_subgroups=True):
        async with open_state_store(tmp_path / "s.sqlite") as store:
            store.submit_accept(record(1))
            await store.flush(0, outbox(1, 0), input_count=2, out_seq=1)
    # The transaction rolled back as a whole.
    async with open_state_store(tmp_path / "s.sqlite") as store:
        recovery = await store.recover()
        assert recovery.open_inputs == ()
        assert recovery.pending_outbox == ()


async def test_model_versions_lineage_and_optimizer_state(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    leaves = (b"\x01" * 16, b"\x02" * 16)
    async with open_state_store(path) as store:
        await store.submit_version(
            ModelVersionRecord(0, b"blob0", b"ptr0", (), 0, 1),
            epoch=None,
            input_count=0,
            optimizer_state={},
            out_seq=5,
        ).wait()
        store.submit_accept(record(1))
        store.submit_accept(record(2))
        m = np.arange(4, dtype=np.float32)
        await store.submit_version(
            ModelVersionRecord(1, b"blob1", b"ptr1", leaves, 2, 2),
            epoch=0,
            input_count=2,
            optimizer_state={"m": m, "steps": np.array(1, dtype=np.int64)},
            out_seq=6,
        ).wait()
        await store.submit_published(0).wait()
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.latest_version is not None
        assert recovery.latest_version.version == 1
        assert recovery.latest_version.blob == b"blob1"
        assert recovery.unpublished_versions == (1,)
        assert recovery.open_epoch == 1
        assert recovery.open_inputs == ()
        assert recovery.known_version == 1
        assert recovery.model_pointer == b"ptr1"
        np.testing.assert_array_equal(recovery.optimizer_state["m"], np.arange(4))
        assert recovery.optimizer_state["m"].dtype == np.float32
        assert int(recovery.optimizer_state["steps"]) == 1
        assert store.lineage(1) == list(leaves)
        assert store.lineage(0) == []
        with pytest.raises(StoreError):
            store.lineage(2)
    assert read_lineage(path, 1) == list(leaves)
    with pytest.raises(StoreError, match="v7"):
        read_lineage(path, 7)


async def test_leaves_of_accepted_partials_are_indexed_pending_and_durable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    carried = (b"\x0a" * 16, b"\x0b" * 16)
    async with open_state_store(path) as store:
        await store.recover()
        ticket = store.submit_accept(replace(record(1), leaves=carried))
        # Pending (not yet committed) leaves count already: two partials in one
        # commit window must not both get through.
        assert sorted(store.counted_leaves([b"\x0b" * 16, b"\x0c" * 16])) == [b"\x0b" * 16]
        await ticket.wait()
        assert store.counted_leaves([b"\x0c" * 16]) == []
    async with open_state_store(path) as store:
        await store.recover()
        assert sorted(store.counted_leaves([*carried, b"\x0c" * 16])) == list(carried)
        # An epoch that goes to the quarantine takes its leaves out of the index,
        # so the partial is not refused as "counted twice" when it is re-admitted.
        recovery = await store.recover()
        await store.submit_quarantine_epoch(
            recovery.open_epoch, reason="non_finite", detail="overflow", input_count=1, out_seq=9
        ).wait()
        assert store.counted_leaves(list(carried)) == []


async def test_a_version_4_central_store_gets_its_lineage_indexed(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    leaves = (b"\x01" * 16, b"\x02" * 16)
    async with open_state_store(path) as store:
        await store.recover()
        store.submit_accept(record(1))
        await store.submit_version(
            ModelVersionRecord(1, b"blob1", b"ptr1", leaves, 2, 2),
            epoch=0,
            input_count=1,
            optimizer_state={},
            out_seq=6,
        ).wait()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TABLE leaves")  # as a version 4 store had it
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    async with open_state_store(path) as store:
        await store.recover()
        assert sorted(store.counted_leaves([*leaves, b"\x03" * 16])) == list(leaves)
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    assert version == SCHEMA_VERSION == 7


async def test_other_schema_versions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        async with open_state_store(path):
            pass


async def test_a_version_3_store_is_migrated_to_an_empty_quarantine(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    make_v2_store(path)
    async with open_state_store(path):
        pass  # now version 4; take it back to a version 3 store: no quarantine table
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TABLE quarantine")
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with pytest.raises(StoreError, match="before the quarantine"):
        read_quarantine(path)
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert [r.input_id for r in recovery.open_inputs] == [(1).to_bytes(16, "big")]
        assert store.quarantine_usage.count == 0
        qid, ticket = store.submit_quarantine(
            sender="edge-1",
            input_id=b"\x05" * 16,
            subject="ft.acme.up.region.r1",
            reason="unknown_sender",
            retry="any",
            detail="from unregistered sender edge-1",
            envelope=b"bytes-1",
            received_ms=5,
        )
        await ticket.wait()
        assert store.quarantine_usage.by_sender == {"edge-1": (1, 7)}
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    assert version == SCHEMA_VERSION == 7
    (row,) = read_quarantine(path)
    assert (row.qid, row.sender, row.reason, row.envelope) == (
        qid,
        "edge-1",
        "unknown_sender",
        b"bytes-1",
    )


async def quarantine_input_1(store: StateStore, *, detail: str = "") -> int:
    """Quarantine ``record(1)``'s input as from an unknown sender; returns its row id."""
    qid, ticket = store.submit_quarantine(
        sender=SENDER,
        input_id=record(1).input_id,
        subject="s",
        reason="unknown_sender",
        retry="any",
        detail=detail,
        envelope=b"envelope-1",
        received_ms=1,
    )
    await ticket.wait()
    return qid


async def test_a_readmitted_quarantine_row_leaves_in_the_accepts_commit(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.recover()
        qid = await quarantine_input_1(store)
        (row,) = store.quarantined_for_readmission(after_cut_only=False)
        assert row.qid == qid
        assert store.quarantined_for_readmission(after_cut_only=True) == []
        store.unquarantine_op(qid)
        await store.submit_accept(record(1), quarantine_id=qid).wait()
        assert store.quarantine_usage.count == 0
        assert store.input_state(SENDER, record(1).input_id) is InputState.OPEN
    assert read_quarantine(path) == []
    # An epoch that cannot be cut goes to the quarantine, input rows and all.
    async with open_state_store(path) as store:
        recovery = await store.recover()
        await store.submit_quarantine_epoch(
            recovery.open_epoch, reason="non_finite", detail="overflow", input_count=1, out_seq=9
        ).wait()
        assert store.input_state(SENDER, record(1).input_id) is None
        assert (await store.recover()).open_inputs == ()
    (row,) = read_quarantine(path)
    assert (row.retry, row.input_id, row.envelope) == ("cut", record(1).input_id, b"envelope-1")
    assert release_quarantined(path, [row.qid, 999]) == 1
    assert read_quarantine(path, row.qid)[0].released
    assert drop_quarantined(path, [row.qid]) == 1
    assert read_quarantine(path) == []
    assert read_quarantine_dropped(path) == 1


async def test_a_forgotten_input_from_the_quarantine_goes_back_to_it(tmp_path: Path) -> None:
    # A leased regional that takes the lease forgets its open epoch and its pending
    # partials without intents; an input among them that came from the quarantine
    # was acknowledged, so it goes back there (nothing would redeliver it).
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.recover()
        qid = await quarantine_input_1(store, detail="why")
        store.unquarantine_op(qid)
        await store.submit_accept(record(1), quarantine_id=qid).wait()
        await store.submit_accept(record(2)).wait()
        await store.submit_flush(0, outbox(7, 0), 2, 1).wait()
        await store.submit_accept(record(3, epoch=1)).wait()
        assert read_quarantine(path) == []
        await store.submit_forget_unforwarded(1, [outbox(7, 0).partial_id]).wait()
        for i in (1, 2, 3):
            assert store.input_state(SENDER, record(i).input_id) is None
        recovery = await store.recover()
        assert (recovery.open_inputs, recovery.pending_outbox) == ((), ())
        (row,) = store.quarantined_for_readmission(after_cut_only=False)
        assert (row.qid, row.reason, row.detail, row.envelope) == (
            qid,
            "unknown_sender",
            "why",
            b"envelope-1",
        )
        # Re-admitted again and acknowledged upstream: the row is gone for good.
        store.unquarantine_op(qid)
        await store.submit_accept(record(1, epoch=1), quarantine_id=qid).wait()
        await store.submit_flush(1, outbox(8, 1), 1, 2).wait()
        await store.submit_acked(outbox(8, 1).partial_id).wait()
    assert read_quarantine(path) == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM quarantine_folded").fetchone() == (0,)
