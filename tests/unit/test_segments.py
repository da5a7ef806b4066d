"""The state store's segment log: references, crashes before the commit, torn tails, pruning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store import (
    InputRecord,
    OutboxEntry,
    StateStore,
    open_state_store,
    prune_segments,
)
from fedtier.tiers.store._segments import PAGE_BYTES, SegmentLog, is_ref, segment_folder

SENDER = "a" * 24


def record(i: int, *, epoch: int = 0, size: int = 100) -> InputRecord:
    return InputRecord(
        sender=SENDER,
        input_id=i.to_bytes(16, "big"),
        seq=i,
        epoch=epoch,
        envelope=bytes([i % 256]) * size,
        base_version=0,
        n_samples=1.0,
        tau=0,
        discount=1.0,
        clip_scale=1.0,
        accepted_ms=1_000 + i,
    )


def partial(pid: int, epoch: int) -> OutboxEntry:
    return OutboxEntry(
        partial_id=pid.to_bytes(16, "big"),
        epoch=epoch,
        seq=100 + pid,
        subject="ft.acme.up.region.r1",
        envelope=b"partial-%d" % pid * 20,
    )


def stored_values(path: Path, table: str = "input_envelopes") -> list[object]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute(f"SELECT envelope FROM {table}")]
    finally:
        conn.close()


def segment_files(path: Path) -> list[str]:
    return sorted(p.name for p in segment_folder(path).iterdir())


async def test_envelopes_are_in_segments_and_rows_hold_references(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
        await store.accept(record(2, size=5000))
    values = stored_values(path)
    assert len(values) == 2
    assert all(is_ref(v) for v in values)
    log = SegmentLog(segment_folder(path))
    assert sorted(log.read(str(v)) for v in values) == sorted(
        [record(1).envelope, record(2, size=5000).envelope]
    )
    async with open_state_store(path) as store:
        recovery = await store.recover()
    assert recovery.open_inputs == (record(1), record(2, size=5000))


async def test_a_batch_that_fails_before_its_commit_leaves_no_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The crash between append and commit: the bytes are in the segment, the
    # transaction that would name them rolls back, nothing acknowledges them.
    path = tmp_path / "state.sqlite"
    failed: list[BaseException] = []
    try:
        async with open_state_store(path) as store:
            await store.accept(record(1))

            def sync_fails() -> None:
                raise StoreError("disk gone (test)")

            monkeypatch.setattr(store.segments, "sync", sync_fails)
            ticket = store.submit_accept(record(2))
            try:
                await ticket.wait()
            except StoreError as exc:
                failed.append(exc)
    except* StoreError:
        pass  # the committer stops the store, as a daemon whose disk fails must stop
    assert failed, "the accept whose segment could not be synced must fail"
    assert len(stored_values(path)) == 1
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.open_inputs == (record(1),)
        assert store.input_state(SENDER, record(2).input_id) is None
        # The device resends: it is new, stored in a new segment, recovered.
        await store.accept(record(2))
    async with open_state_store(path) as store:
        assert (await store.recover()).open_inputs == (record(1), record(2))


async def test_a_torn_tail_is_never_appended_to_nor_read(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
    (first,) = segment_files(path)
    with (segment_folder(path) / first).open("ab") as torn:
        torn.write(b"FTS1\x10\x00")  # half a header: a write cut short by a crash
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.open_inputs == (record(1),)
        await store.accept(record(2))
    # Each opening appends to a new segment: the torn one keeps its tail untouched.
    assert len(segment_files(path)) == 2
    async with open_state_store(path) as store:
        assert (await store.recover()).open_inputs == (record(1), record(2))


async def test_a_missing_segment_is_reported_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
    for segment in segment_folder(path).iterdir():
        segment.unlink()
    async with open_state_store(path) as store:
        with pytest.raises(StoreError, match="is gone"):
            await store.recover()


async def test_a_reference_to_other_bytes_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
    (value,) = stored_values(path)
    segment, offset, length = str(value).split(":")[1:]
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "UPDATE input_envelopes SET envelope = ?",
            (f"seg:{segment}:{offset}:{int(length) + 1}",),
        )
    conn.close()
    async with open_state_store(path) as store:
        with pytest.raises(StoreError, match="no such record"):
            await store.recover()


async def segments_after(store: StateStore, path: Path) -> list[str]:
    await prune_segments(store)
    return segment_files(path)


async def test_a_segment_goes_once_its_inputs_are_cut_and_its_partial_acked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    # Tiny segments: every append after a 112-byte record starts a new file.
    async with open_state_store(path, segment_bytes=100) as store:
        for i in (1, 2, 3):
            await store.accept(record(i))
        assert len(segment_files(path)) == 3
        # An open input's segment stays: it is needed to refold after a crash.
        assert len(await segments_after(store, path)) == 3
        await store.flush(0, partial(9, 0), input_count=3, out_seq=1)
        # The inputs' segments went with the cut; the partial's stays until acked.
        kept = await segments_after(store, path)
        assert len(kept) == 1
        (ref,) = stored_values(path, "outbox")
        assert is_ref(ref)
        await store.accept(record(4, epoch=1))
        await store.mark_acked(partial(9, 0).partial_id)
        kept_after_ack = await segments_after(store, path)
        assert kept[0] not in kept_after_ack
        assert len(kept_after_ack) == 1  # record 4's, the open input
    async with open_state_store(path) as store:
        recovery = await store.recover()
        assert recovery.open_inputs == (record(4, epoch=1),)
        assert recovery.pending_outbox == ()


async def test_a_pending_partial_is_recovered_from_its_segment(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path, segment_bytes=100) as store:
        await store.accept(record(1))
        await store.flush(0, partial(7, 0), input_count=1, out_seq=1)
        await prune_segments(store)
    async with open_state_store(path) as store:
        recovery = await store.recover()
    assert recovery.pending_outbox == (partial(7, 0),)


async def test_an_inline_envelope_of_an_older_store_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
    conn = sqlite3.connect(path)
    with conn:
        # As a schema version 5 store holds it: the bytes in the row.
        conn.execute("UPDATE input_envelopes SET envelope = ?", (record(1).envelope,))
    conn.close()
    async with open_state_store(path) as store:
        assert (await store.recover()).open_inputs == (record(1),)


def test_each_sync_pads_to_a_page_so_the_next_batch_starts_on_a_fresh_one(
    tmp_path: Path,
) -> None:
    log = SegmentLog(tmp_path / "segments")
    log.open_sync()
    first = log.append(b"a" * 100)
    second = log.append(b"b" * 5000)  # same batch: packed right after the first
    log.sync()
    third = log.append(b"c" * 10)  # the next batch
    log.sync()
    log.sync()  # nothing new: no more padding
    log.close()
    offsets = [int(ref.split(":")[2]) for ref in (first, second, third)]
    assert offsets[0] == 0
    assert offsets[1] == offsets[0] + 12 + 100
    assert offsets[2] % PAGE_BYTES == 0
    assert offsets[2] > offsets[1]
    assert log.path_of(log.active).stat().st_size == offsets[2] + PAGE_BYTES
    assert [log.read(ref) for ref in (first, second, third)] == [
        b"a" * 100,
        b"b" * 5000,
        b"c" * 10,
    ]
