"""The device's outbox log under a retention horizon: bounded, and whole without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtier.client.outbox import LOG_PRUNE_EVERY, LogEvent, Outbox
from fedtier.protocol.errors import LocalProtocolError


def send_and_resolve(outbox: Outbox, i: int, now_s: float) -> None:
    update_id = i.to_bytes(16, "big")
    outbox.put(update_id, i, b"envelope", now_s=now_s)
    outbox.mark_sent(update_id, now_s=now_s)
    assert outbox.resolve(update_id, "accepted", now_s=now_s)


def test_the_log_is_pruned_past_its_horizon_and_keeps_the_recent_rows(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite", first_seq=1, log_horizon_s=100.0) as outbox:
        for i in range(3 * LOG_PRUNE_EVERY):
            send_and_resolve(outbox, i, now_s=float(i))  # one update a second
        log = outbox.log()
    # Two rows an update; every LOG_PRUNE_EVERY receipts the rows older than 100 s go.
    assert len(log) <= 2 * (100 + LOG_PRUNE_EVERY)
    assert log[-1].event is LogEvent.RECEIPT_ACCEPTED
    assert log[-1].seq == 3 * LOG_PRUNE_EVERY - 1
    assert min(entry.time_s for entry in log) >= 3 * LOG_PRUNE_EVERY - 1 - 100 - LOG_PRUNE_EVERY


def test_without_a_horizon_the_log_stays_whole(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite", first_seq=1) as outbox:
        for i in range(LOG_PRUNE_EVERY + 5):
            send_and_resolve(outbox, i, now_s=float(i))
        assert len(outbox.log()) == 2 * (LOG_PRUNE_EVERY + 5)
        # An explicit prune takes exactly the rows before the bound.
        assert outbox.prune_log(10.0) == 20
        assert outbox.log()[0].time_s == 10.0
        assert outbox.prune_log(0.0) == 0


def test_a_negative_horizon_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LocalProtocolError, match="log_horizon_s"):
        Outbox(tmp_path / "outbox.sqlite", log_horizon_s=-1.0)
