"""Device outbox: seq and pending updates survive reopening; resolve removes; the log exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtier.client.outbox import RESOLVED_KEEP, LogEvent, Outbox
from fedtier.protocol.errors import LocalProtocolError

UID = [bytes([i]) * 16 for i in range(1, 6)]


def test_seq_strictly_increases_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, first_seq=10) as box:
        assert [box.next_seq() for _ in range(3)] == [10, 11, 12]
    with Outbox(path, first_seq=0) as box:  # first_seq only applies to a new file
        assert box.next_seq() == 13


def test_default_first_seq_follows_the_wall_clock(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.sqlite") as box:
        assert box.next_seq() > 1_700_000_000_000


def test_pending_survives_reopen_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, first_seq=1) as box:
        box.put(UID[1], 2, b"second", now_s=20.0)
        box.put(UID[0], 1, b"first", now_s=10.0)
        assert box.mark_sent(UID[0], 11.0) == 1
        assert box.mark_sent(UID[0], 12.0) == 2
    with Outbox(path) as box:
        pending = box.pending()
        assert [(p.update_id, p.seq, p.envelope) for p in pending] == [
            (UID[0], 1, b"first"),
            (UID[1], 2, b"second"),
        ]
        assert pending[0].attempts == 2
        assert pending[0].last_sent_s == 12.0
        assert pending[1].attempts == 0
        assert pending[1].last_sent_s is None
        assert pending[1].created_s == 20.0
        assert box.get(UID[1]) == pending[1]


def test_put_twice_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        box.put(UID[0], 1, b"x")
        with pytest.raises(LocalProtocolError):
            box.put(UID[0], 2, b"y")
        with pytest.raises(LocalProtocolError):
            box.put(UID[1], 1, b"y")


def test_resolve_removes_and_remembers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as box:
        box.put(UID[0], 1, b"a")
        box.put(UID[1], 2, b"b")
        assert box.resolve(UID[0], "accepted")
        assert not box.resolve(UID[0], "duplicate")  # second receipt: nothing changes
        assert box.resolve(UID[1], "rejected", "stale")
        assert box.pending() == []
        assert box.mark_sent(UID[0]) is None
        with pytest.raises(LocalProtocolError):
            box.resolve(UID[2], "maybe")
    with Outbox(path) as box:
        assert box.pending() == []
        assert box.resolved_status(UID[0]) == "accepted"
        assert box.resolved_status(UID[1]) == "rejected"
        assert box.resolved_status(UID[2]) is None


def test_resolved_table_stays_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedtier.client.outbox.RESOLVED_KEEP", 2)
    with Outbox(tmp_path / "o.sqlite") as box:
        for i, uid in enumerate(UID):
            box.put(uid, i, b"x")
            box.resolve(uid, "accepted")
        assert [box.resolved_status(u) for u in UID] == [None, None, None, "accepted", "accepted"]
        assert len(box.log()) == len(UID)  # the log itself is never pruned
    assert RESOLVED_KEEP > 2


def test_log_records_events_and_exports_json_lines(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite") as box:
        box.put(UID[0], 5, b"a")
        box.mark_sent(UID[0], 1.0)
        box.mark_sent(UID[0], 2.0)
        box.resolve(UID[0], "duplicate", now_s=3.0)
        box.put(UID[1], 6, b"b")
        box.mark_sent(UID[1], 4.0)
        box.resolve(UID[1], "rejected", "bad_norm", now_s=5.0)
        out = tmp_path / "device-log.jsonl"
        assert box.export_log(out) == 5
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["event"], r["seq"], r["time_s"]) for r in lines] == [
        ("sent", 5, 1.0),
        ("resent", 5, 2.0),
        ("receipt_duplicate", 5, 3.0),
        ("sent", 6, 4.0),
        ("receipt_rejected", 6, 5.0),
    ]
    assert lines[0]["update_id"] == UID[0].hex()
    assert lines[4]["reason"] == "bad_norm"
    assert {e.value for e in LogEvent} >= {r["event"] for r in lines}


def test_closed_outbox_refuses_calls(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.close()
    box.close()
    with pytest.raises(LocalProtocolError):
        box.next_seq()
