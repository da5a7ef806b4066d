"""Recovery of the open buffer streams its envelopes: one read per record taken, none up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store import InputRecord, open_state_store
from fedtier.tiers.store._segments import SegmentLog, segment_folder

SENDER = "b" * 24


def record(i: int, *, size: int = 1000) -> InputRecord:
    return InputRecord(
        sender=SENDER,
        input_id=i.to_bytes(16, "big"),
        seq=i,
        epoch=0,
        envelope=bytes([i]) * size,
        base_version=0,
        n_samples=1.0,
        tau=0,
        discount=1.0,
        clip_scale=1.0,
        accepted_ms=1_000 + i,
    )


async def test_recover_reads_no_envelope_and_each_is_read_when_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        for i in (1, 2, 3):
            await store.accept(record(i, size=1000 * i))
    reads: list[int] = []
    real_read = SegmentLog.read

    def counting_read(self: SegmentLog, ref: str) -> bytes:
        data = real_read(self, ref)
        reads.append(len(data))
        return data

    monkeypatch.setattr(SegmentLog, "read", counting_read)
    async with open_state_store(path) as store:
        recovery = await store.recover()
        # Counted and checked, not loaded.
        assert len(recovery.open_inputs) == 3
        assert reads == []
        taken = iter(recovery.open_inputs)
        first = next(taken)
        assert first == record(1, size=1000)
        assert reads == [1000]  # only the envelope of the record taken
        assert [r.input_id[-1] for r in taken] == [2, 3]
        assert reads == [1000, 2000, 3000]
        # Compares as the tuple of its records, in fold order.
        assert recovery.open_inputs == tuple(record(i, size=1000 * i) for i in (1, 2, 3))


async def test_a_segment_lost_before_recovery_still_fails_the_recovery(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    async with open_state_store(path) as store:
        await store.accept(record(1))
    (segment,) = segment_folder(path).iterdir()
    # The record's header stays, its bytes are cut: reading only the header must notice.
    segment.write_bytes(segment.read_bytes()[:100])
    async with open_state_store(path) as store:
        with pytest.raises(StoreError, match="ends early"):
            await store.recover()
