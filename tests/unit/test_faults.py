"""Crash points and unsafe switches (tiers.faults), and what they do inside an edge daemon."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from fedtier.protocol.bus import MemoryBus
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.messages import Receipt, ReceiptStatus
from fedtier.tiers import faults
from fedtier.tiers.flush import FlushPolicy
from tests.unit.test_edge import (
    DEVICES,
    REGION,
    SUBJECTS,
    DownBus,
    Phone,
    Site,
    delta,
    make_config,
    next_receipt,
    receive_partial,
    send_and_receipt,
    stored_update_ids,
)


class Crashed(Exception):
    """Stands in for os._exit: the daemon's task dies where the crash point is."""


@pytest.fixture(autouse=True)
def disarmed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def crash(point: str) -> None:
        raise Crashed(point)

    monkeypatch.setattr(faults, "_crash", crash)
    faults.configure()
    yield
    faults.configure()


def test_unarmed_points_do_nothing() -> None:
    faults.crash_point("edge.after_commit")


def test_a_point_fires_after_its_skipped_passages() -> None:
    faults.configure(crash_at="edge.after_commit:1:2, regional.after_ack:0")
    faults.crash_point("edge.after_commit")
    faults.crash_point("edge.after_commit")
    for _ in range(100):
        faults.crash_point("regional.after_ack")  # probability 0
        faults.crash_point("edge.after_ack")  # not armed
    with pytest.raises(Crashed, match=r"edge\.after_commit"):
        faults.crash_point("edge.after_commit")


@pytest.mark.parametrize(
    ("crash_at", "unsafe", "message"),
    [
        ("edge.after_lunch:1", "", "moment in"),
        ("hub.after_commit:1", "", "tier in"),
        ("edge.after_commit", "", "POINT:PROBABILITY"),
        ("edge.after_commit:2", "", "probability must be in"),
        ("edge.after_commit:x", "", "bad number"),
        ("", "ack_after_lunch", "the switches are"),
    ],
)
def test_bad_settings_are_named_and_change_nothing(
    crash_at: str, unsafe: str, message: str
) -> None:
    faults.configure(unsafe="ack_before_commit")
    with pytest.raises(ConfigError, match=message):
        faults.configure(crash_at=crash_at, unsafe=unsafe)
    assert faults.unsafe("ack_before_commit")


def test_environment_settings_come_with_warnings() -> None:
    warnings = faults.configure_from_environment(
        {
            faults.CRASH_ENV: "central.before_publish:0.5:3",
            faults.UNSAFE_ENV: "drop_unconfirmed_partials,ack_before_commit",
        }
    )
    assert faults.unsafe_switches() == {"drop_unconfirmed_partials", "ack_before_commit"}
    assert len(warnings) == 3
    assert all("UNSAFE" in w for w in warnings[:2])
    assert "central.before_publish" in warnings[2]
    assert faults.configure_from_environment({}) == []
    assert not faults.unsafe("ack_before_commit")


# -- inside an edge ----------------------------------------------------------------------


async def run_until_crash(site: Site, data: bytes) -> Receipt | None:
    """Run an edge, send ``data`` from device 0 until the edge crashes; the receipt, if one came."""
    phone = Phone(site, DEVICES[0])
    async with phone.receipts() as receipts:
        with pytest.RaisesGroup(Crashed, flatten_subgroups=True):
            async with trio.open_nursery() as nursery:
                await nursery.start(site.daemon().serve)
                await phone.send(data)
                await trio.sleep_forever()
        with trio.move_on_after(1):
            return await next_receipt(receipts)
    return None


async def test_crash_between_commit_and_ack_loses_nothing(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path))
    await site.publish_model(0)
    message, data = DEVICES[0].update(delta(1))
    faults.configure(crash_at="edge.after_commit:1")
    assert await run_until_crash(site, data) is None
    assert message.update_id in stored_update_ids(site.config.store_path)

    faults.configure()
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        assert list(edge.buffer.accumulator.input_ids) == [message.update_id]
        # The device resends (no receipt came): a duplicate, folded once.
        again = await send_and_receipt(Phone(site, DEVICES[0]), data)
        assert again.status is ReceiptStatus.DUPLICATE
        assert edge.buffer.accumulator.input_count == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "ack_before_commit"])
async def test_a_receipt_means_stored_unless_ack_before_commit(
    unsafe: bool, tmp_path: Path, autojump_clock: MockClock
) -> None:
    # A long commit window: the receipt would have to wait 10 s for the commit.
    site = Site(tmp_path, make_config(tmp_path, commit_window_s=10.0))
    await site.publish_model(0)
    message, data = DEVICES[0].update(delta(1))
    faults.configure(crash_at="edge.after_receipt:1", unsafe="ack_before_commit" if unsafe else "")
    receipt = await run_until_crash(site, data)
    assert receipt is not None
    assert receipt.status is ReceiptStatus.ACCEPTED
    # Unsafe, the device holds an "accepted" receipt for an update the edge lost.
    assert (message.update_id in stored_update_ids(site.config.store_path)) is not unsafe


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "dedupe_open_buffer_only"])
async def test_a_copy_after_the_flush_is_a_duplicate_unless_dedupe_is_windowed(
    unsafe: bool, tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=2, max_age_s=None)))
    await site.publish_model(0)
    a, a_data = DEVICES[0].update(delta(1))
    b, b_data = DEVICES[1].update(delta(2))
    c, c_data = DEVICES[1].update(delta(3))
    faults.configure(unsafe="dedupe_open_buffer_only" if unsafe else "")
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon()
            await nursery.start(edge.serve)
            phone_a, phone_b = Phone(site, DEVICES[0]), Phone(site, DEVICES[1])
            await send_and_receipt(phone_a, a_data)
            await send_and_receipt(phone_b, b_data)
            first, _, _ = await receive_partial(partials)
            # A late copy of A (a resend whose receipt was lost) arrives after the flush.
            late = await send_and_receipt(phone_a, a_data)
            await send_and_receipt(phone_b, c_data)
            if unsafe:
                assert late.status is ReceiptStatus.ACCEPTED
                second, _, _ = await receive_partial(partials)
                # A leaves in two partials: upstream counts it twice.
                assert list(first.inputs) == [a.update_id, b.update_id]
                assert list(second.inputs) == [a.update_id, c.update_id]
            else:
                assert late.status is ReceiptStatus.DUPLICATE
                assert list(edge.buffer.accumulator.input_ids) == [c.update_id]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "drop_unconfirmed_partials"])
async def test_a_partial_without_puback_is_kept_unless_dropped(
    unsafe: bool, tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None)))
    await site.publish_model(0)
    _message, data = DEVICES[0].update(delta(5))
    faults.configure(unsafe="drop_unconfirmed_partials" if unsafe else "")
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        edge.nats = DownBus()
        await nursery.start(edge.serve)
        await send_and_receipt(Phone(site, DEVICES[0]), data)
        await trio.sleep(3)
        (pid,) = [bytes(p) for p in outbox_ids(site)]
        assert edge.store.outbox_state(pid) == ("acked" if unsafe else "pending")
        assert edge.upstream.dropped == (1 if unsafe else 0)
        nursery.cancel_scope.cancel()


def outbox_ids(site: Site) -> list[bytes]:
    conn = sqlite3.connect(site.config.store_path)
    try:
        return [bytes(row[0]) for row in conn.execute("SELECT partial_id FROM outbox")]
    finally:
        conn.close()
