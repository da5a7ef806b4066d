"""The status snapshot: codec, rates, health, rendering, the [status] table and the publisher."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgpack
import pytest
import trio

from fedtier.protocol.errors import ConfigError, DecodeError, PublishError, UnsupportedVersion
from fedtier.protocol.names import NatsSubjects
from fedtier.tiers._status import (
    MAX_ERRORS,
    SCHEMA,
    ErrorLog,
    ErrorNote,
    RateWindow,
    StatusPublisher,
    StatusSnapshot,
    decode_snapshot,
    encode_snapshot,
    publish_status,
    status_key_of,
)
from fedtier.tiers.config import StatusSettings, load_config, load_nats_settings
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.statuscmd import (
    health_of,
    render_table,
    row_cells,
    rows_from_entries,
    to_json,
)
from fedtier.tiers.store import QuarantineUsage

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DAEMON_ID = "a" * 24
NOW_MS = 1_800_000_000_000


def snapshot(**changes: Any) -> StatusSnapshot:
    values: dict[str, Any] = {
        "tier": "edge",
        "daemon_id": DAEMON_ID,
        "instance": "host:1",
        "fleet": "f1",
        "region": "eu-west",
        "site": "plant-3",
        "model_version": 7,
        "epoch": 3,
        "buffer_inputs": 4,
        "buffer_updates": 4,
        "flush_max_inputs": 10,
        "buffer_age_s": 1.5,
        "accepted_per_s": 2.5,
        "rejected_per_s": 0.5,
        "rejected_per_s_by_reason": {"bad_signature": 0.5},
        "rate_window_s": 30.0,
        "totals": {"accepted": 75, "rejected": 15},
        "quarantine_inputs": 2,
        "quarantine_bytes": 4096,
        "quarantine_by_reason": {"unknown_sender": 2},
        "outbox_depth": 1,
        "outbox_oldest_s": 4.0,
        "errors": (ErrorNote(NOW_MS - 3000, "fedtier.edge", "store is slow"),),
        "error_count": 1,
        "started_ms": NOW_MS - 60_000,
        "at_ms": NOW_MS - 1000,
        "interval_s": 2.0,
    }
    values.update(changes)
    return StatusSnapshot(**values)


# -- codec -------------------------------------------------------------------------------


def test_snapshot_round_trips_through_msgpack() -> None:
    original = snapshot()
    decoded = decode_snapshot(encode_snapshot(original))
    assert decoded == original
    assert decoded.uptime_s == 59.0
    assert decoded.schema == SCHEMA


def test_decoder_ignores_unknown_fields_and_defaults_missing_ones() -> None:
    data = {"schema": 1, "tier": "central", "daemon_id": DAEMON_ID, "at_ms": 5, "future": [1]}
    decoded = decode_snapshot(msgpack.packb(data))
    assert (decoded.tier, decoded.at_ms, decoded.outbox_depth, decoded.errors) == (
        "central",
        5,
        0,
        (),
    )


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"\xc1", DecodeError, "not msgpack"),
        (msgpack.packb([1, 2]), DecodeError, "lacks"),
        (msgpack.packb({"schema": 1, "tier": "edge"}), DecodeError, "lacks"),
        (
            msgpack.packb({"schema": 0, "tier": "edge", "daemon_id": "x", "at_ms": 1}),
            DecodeError,
            "positive",
        ),
        (
            msgpack.packb({"schema": SCHEMA + 1, "tier": "edge", "daemon_id": "x", "at_ms": 1}),
            UnsupportedVersion,
            "newer",
        ),
        (
            msgpack.packb(
                {"schema": 1, "tier": "edge", "daemon_id": "x", "at_ms": 1, "errors": [{"x": 1}]}
            ),
            DecodeError,
            "malformed",
        ),
    ],
)
def test_decoder_refuses_what_is_no_snapshot(
    data: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        decode_snapshot(data)


def test_status_keys_carry_tier_region_and_id() -> None:
    assert status_key_of("edge", "eu-west", DAEMON_ID) == f"edge.eu-west.{DAEMON_ID}"
    assert status_key_of("regional", "eu-west", DAEMON_ID) == f"regional.eu-west.{DAEMON_ID}"
    assert status_key_of("central", None, DAEMON_ID) == f"central.{DAEMON_ID}"
    assert NatsSubjects("f1").status_bucket() == "ft_f1_status"
    with pytest.raises(ValueError, match="key id"):
        status_key_of("edge", "eu-west", "not.an.id")


# -- rates -------------------------------------------------------------------------------


def test_rates_are_per_second_over_the_window() -> None:
    window = RateWindow(10.0)
    counts: Counter[tuple[str, str]] = Counter()
    assert window.observe(0.0, counts).accepted_per_s == 0.0  # one sample: no rate yet
    counts[("accepted", "")] += 20
    counts[("rejected", "bad_signature")] += 4
    counts[("rejected", "stale")] += 2
    counts[("duplicate", "")] += 7
    rates = window.observe(2.0, counts)
    assert rates.window_s == 2.0
    assert rates.accepted_per_s == 10.0
    assert rates.rejected_per_s == 3.0
    assert rates.rejected_by_reason == {"bad_signature": 2.0, "stale": 1.0}
    # Quiet for 20 s: the burst leaves the window, the rates fall to zero.
    for t in range(4, 24, 2):
        rates = window.observe(float(t), counts)
    assert rates.accepted_per_s == 0.0
    assert rates.rejected_by_reason == {}
    assert 10.0 <= rates.window_s <= 12.0


def test_a_steady_rate_is_measured_over_a_full_window() -> None:
    window = RateWindow(5.0)
    counts: Counter[tuple[str, str]] = Counter()
    rates = None
    for t in range(30):
        counts[("accepted", "")] += 3  # 3 per second
        rates = window.observe(float(t), counts)
    assert rates is not None
    assert rates.accepted_per_s == pytest.approx(3.0)
    assert rates.window_s == 5.0


def test_rate_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        RateWindow(0.0)


# -- health and rendering --------------------------------------------------------------------


def test_health_marks_stale_stopped_and_starting() -> None:
    assert health_of(snapshot(), NOW_MS) == "ok"
    assert health_of(snapshot(at_ms=NOW_MS - 6001), NOW_MS) == "stale"  # > 3 x 2 s
    assert health_of(snapshot(at_ms=NOW_MS - 5999), NOW_MS) == "ok"
    assert health_of(snapshot(state="stopped"), NOW_MS) == "stopped"
    assert health_of(snapshot(state="starting"), NOW_MS) == "starting"


def test_rows_sort_by_tier_and_add_missing_and_unreadable_ones() -> None:
    central = snapshot(tier="central", region=None, site=None, daemon_id="c" * 24)
    entries = [
        (f"edge.eu-west.{DAEMON_ID}", encode_snapshot(snapshot())),
        ("edge.eu-west.broken", b"\xc1"),
        (f"central.{'c' * 24}", encode_snapshot(central)),
    ]
    rows = rows_from_entries(entries, NOW_MS, expect={"regional": 1, "edge": 2})
    assert [(r.key.split(".")[0], r.health) for r in rows] == [
        ("central", "ok"),
        ("regional", "missing"),
        ("edge", "unreadable"),  # there, so the two expected edges are
        ("edge", "ok"),
    ]
    assert rows[2].problem is not None
    assert "not msgpack" in rows[2].problem
    assert rows[1].problem == "--expect regional=1: only 0 regional daemons publish"


def test_table_shows_every_column_and_a_summary() -> None:
    rows = rows_from_entries(
        [
            ("k1", encode_snapshot(snapshot())),
            ("k2", encode_snapshot(snapshot(daemon_id="b" * 24, at_ms=NOW_MS - 60_000))),
        ],
        NOW_MS,
    )
    text = render_table(rows, "f1")
    header, first, second = text.splitlines()[:3]
    assert header.split() == [
        "TIER",
        "NAME",
        "HEALTH",
        "AGE",
        "VERSION",
        "BUFFER",
        "ACC/S",
        "REJ/S",
        "QUARANTINE",
        "OUTBOX",
        "ERRORS",
        "UPTIME",
    ]
    assert "eu-west/plant-3/aaaaaaaa" in first
    assert "v7" in first
    assert "4/10" in first
    assert "bad_signature" in first
    assert "2 4.0KiB" in first
    assert "store is slow" in first
    assert "stale" in second
    assert "60s" in second
    assert text.splitlines()[-1] == "fleet f1: 2 daemons, 1 not ok (stale)"


def test_health_says_how_long_an_instance_has_been_active_and_what_it_took_over() -> None:
    since = NOW_MS - 1000 - 180_000
    rows = rows_from_entries(
        [
            ("k1", encode_snapshot(snapshot(active_since_ms=since, lease_tenures=1))),
            (
                "k2",
                encode_snapshot(
                    snapshot(
                        tier="central",
                        daemon_id="c" * 24,
                        region=None,
                        site=None,
                        active_since_ms=since,
                        took_over_version=17,
                    )
                ),
            ),
            ("k3", encode_snapshot(snapshot(daemon_id="b" * 24, state="standby"))),
        ],
        NOW_MS,
    )
    cells = {row.key: row_cells(row)[2] for row in rows}
    assert cells == {
        "k1": "ok, active 3m",
        "k2": "ok, took over at v17 3m ago",
        "k3": "standby",
    }


def test_json_document_lists_daemons_with_health() -> None:
    rows = rows_from_entries([("k1", encode_snapshot(snapshot()))], NOW_MS)
    document = json.loads(to_json(rows, "f1", NOW_MS))
    assert document["ok"] is True
    (daemon,) = document["daemons"]
    assert daemon["health"] == "ok"
    assert daemon["age_s"] == 1.0
    assert daemon["model_version"] == 7
    assert daemon["errors"] == [
        {"at_ms": NOW_MS - 3000, "logger": "fedtier.edge", "message": "store is slow"}
    ]
    assert json.loads(to_json([], "f1", NOW_MS))["ok"] is False


def test_rich_table_marks_unhealthy_rows() -> None:
    from rich.console import Console

    from fedtier.tiers.statuscmd import _rich_table

    rows = rows_from_entries(
        [
            ("k1", encode_snapshot(snapshot())),
            ("k2", encode_snapshot(snapshot(daemon_id="b" * 24, state="stopped"))),
        ],
        NOW_MS,
    )
    console = Console(width=200, record=True, force_terminal=True)
    console.print(_rich_table(rows, "f1"))
    styled = console.export_text(styles=True)
    assert "eu-west/plant-3/aaaaaaaa" in styled
    assert "fleet f1: 2 daemons, 1 not ok (stopped)" in styled
    (stopped_line,) = [
        line for line in styled.splitlines() if "stopped" in line and "b" * 8 in line
    ]
    assert "\x1b[31m" in stopped_line  # the stopped row is red


# -- config ----------------------------------------------------------------------------------


def test_examples_configure_the_status_and_defaults_hold(tmp_path: Path) -> None:
    for kind in ("edge", "regional", "central"):
        config = load_config(kind, DEPLOY / f"{kind}.example.toml")
        assert config.status == StatusSettings(True, 2.0, 30.0)
        local = load_config(kind, DEPLOY / "local" / f"{kind}.toml")
        assert local.status.interval_s == 2.0
    fleet, nats = load_nats_settings(DEPLOY / "edge.example.toml")
    assert fleet == "acme"
    assert nats.servers


def test_bad_status_values_are_named(tmp_path: Path) -> None:
    text = (
        (DEPLOY / "local" / "edge.toml").read_text().replace("interval_s = 2.0", "interval_s = 0")
    )
    path = tmp_path / "edge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"status\.interval_s"):
        load_config("edge", path)
    bad = tmp_path / "status.toml"
    bad.write_text('fleet = "Bad Fleet"\n')
    with pytest.raises(ConfigError, match=r"status\.toml"):
        load_nats_settings(bad)


# -- the publisher -----------------------------------------------------------------------------


class FakeBucket:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.fail = False

    async def put(self, key: str, value: bytes) -> int:
        if self.fail:
            raise PublishError("the NATS server refused it")
        self.values[key] = value
        return len(self.values)


class FakeBus:
    def __init__(self) -> None:
        self.bucket = FakeBucket()
        self.opened: list[tuple[str, float | None]] = []

    async def kv_bucket(
        self, name: str, *, history: int = 1, max_age_s: float | None = None
    ) -> FakeBucket:
        self.opened.append((name, max_age_s))
        return self.bucket


def fake_daemon(clock: list[int]) -> Any:
    config = SimpleNamespace(
        fleet="f1",
        region="eu-west",
        site="plant-3",
        flush=FlushPolicy(max_inputs=10),
        status=StatusSettings(interval_s=0.5, rate_window_s=10.0),
    )
    ready = trio.Event()
    daemon = SimpleNamespace(
        tier="edge",
        key_id=DAEMON_ID,
        config=config,
        clock_ms=lambda: clock[0],
        counts=Counter(),
        ready=ready,
        known_version=3,
    )
    # No buffer, upstream or store yet: a starting daemon raises for them.
    return daemon


async def test_publisher_describes_a_starting_daemon_and_survives_failures() -> None:
    clock = [NOW_MS]
    daemon = fake_daemon(clock)
    bus = FakeBus()
    publisher = StatusPublisher(cast(Any, daemon), bus)
    assert await publisher.publish_once()
    key = f"edge.eu-west.{DAEMON_ID}"
    first = decode_snapshot(bus.bucket.values[key])
    assert (first.state, first.model_version, first.buffer_inputs, first.outbox_depth) == (
        "starting",
        3,
        0,
        0,
    )
    assert (first.region, first.site, first.flush_max_inputs) == ("eu-west", "plant-3", 10)
    assert bus.opened == [("ft_f1_status", 3600.0)]

    # The broker refuses: counted, never raised, and said in the next snapshot.
    bus.bucket.fail = True
    assert not await publisher.publish_once()
    assert not await publisher.publish_once()
    bus.bucket.fail = False
    daemon.ready.set()
    daemon.counts[("accepted", "")] += 5
    clock[0] += 2000
    assert await publisher.publish_once()
    latest = decode_snapshot(bus.bucket.values[key])
    assert (latest.state, latest.status_failures, latest.totals) == ("serving", 2, {"accepted": 5})
    assert latest.at_ms == NOW_MS + 2000


async def test_snapshot_reads_buffer_quarantine_outbox_and_rates_of_a_serving_daemon() -> None:
    clock = [NOW_MS]
    daemon = fake_daemon(clock)
    daemon.ready.set()
    now = trio.current_time()
    daemon.buffer = SimpleNamespace(
        epoch=12,
        accumulator=SimpleNamespace(input_count=6, update_count=9),
        oldest_at=now - 4.0,
    )
    usage = QuarantineUsage()
    usage.add("dev1", "unknown_sender", 300)
    usage.add("dev2", "unknown_sender", 200)
    daemon.store = SimpleNamespace(quarantine_usage=usage)
    daemon.upstream = SimpleNamespace(outstanding=2, oldest_age_s=lambda: 7.5)
    publisher = StatusPublisher(cast(Any, daemon), FakeBus())
    publisher.snapshot()
    daemon.counts[("accepted", "")] += 10
    daemon.counts[("rejected", "stale")] += 4
    daemon.counts[("duplicate", "")] += 1
    taken = publisher.snapshot()
    assert (taken.epoch, taken.buffer_inputs, taken.buffer_updates) == (12, 6, 9)
    assert taken.buffer_age_s is not None
    assert taken.buffer_age_s >= 4.0
    assert (taken.quarantine_inputs, taken.quarantine_bytes) == (2, 500)
    assert taken.quarantine_by_reason == {"unknown_sender": 2}
    assert (taken.outbox_depth, taken.outbox_oldest_s) == (2, 7.5)
    assert taken.totals == {"accepted": 10, "rejected": 4, "duplicate": 1}
    daemon.upstream = SimpleNamespace(outstanding=0, oldest_age_s=lambda: 0.0)
    assert publisher.snapshot().outbox_oldest_s is None
    assert (taken.active_since_ms, taken.lease_tenures, taken.took_over_version) == (None, 0, None)
    held = trio.Event()
    held.set()
    holder = SimpleNamespace(since_ms=NOW_MS - 5000)
    daemon.lease = SimpleNamespace(held=held, holder=holder, tenures=2)
    daemon.took_over_at = 4
    leased = publisher.snapshot()
    assert (leased.active_since_ms, leased.lease_tenures) == (NOW_MS - 5000, 2)
    assert leased.took_over_version == 4
    daemon.lease = SimpleNamespace(held=trio.Event(), holder=holder, tenures=2)
    assert publisher.snapshot().active_since_ms is None  # standby again


def test_started_ms_is_this_process_start() -> None:
    import time

    from fedtier.tiers._status import _process_start_ms

    started = _process_start_ms()
    assert started <= time.time_ns() // 1_000_000
    assert started > time.time_ns() // 1_000_000 - 86_400_000  # the test run began today


async def test_publish_status_keeps_the_last_errors_and_says_stopped() -> None:
    clock = [NOW_MS]
    daemon = fake_daemon(clock)
    daemon.ready.set()
    bus = FakeBus()
    async with publish_status(cast(Any, daemon), bus) as publisher:
        assert publisher is not None
        for n in range(MAX_ERRORS + 2):
            logging.getLogger("fedtier.edge").error("failure %d", n)
        logging.getLogger("fedtier.edge").warning("only a warning")
        with trio.fail_after(5):
            while publisher.published < 2:
                await trio.sleep(0.01)
    final = decode_snapshot(bus.bucket.values[publisher.key])
    assert final.state == "stopped"
    assert final.error_count == MAX_ERRORS + 2
    assert [note.message for note in final.errors] == [
        f"failure {n}" for n in range(2, MAX_ERRORS + 2)
    ]
    assert publisher.errors not in logging.getLogger("fedtier").handlers


async def test_publish_status_hands_on_the_blocks_error_unwrapped() -> None:
    daemon = fake_daemon([NOW_MS])
    cause = KeyError("the cause")
    with pytest.raises(ConfigError, match="boom") as raised:
        async with publish_status(cast(Any, daemon), FakeBus()):
            raise ConfigError("boom") from cause
    assert raised.value.__cause__ is cause


async def test_disabled_status_publishes_nothing() -> None:
    daemon = fake_daemon([NOW_MS])
    daemon.config.status = StatusSettings(enabled=False)
    bus = FakeBus()
    async with publish_status(cast(Any, daemon), bus) as publisher:
        assert publisher is None
    assert bus.opened == []


def test_error_log_cuts_long_messages() -> None:
    log = ErrorLog()
    record = logging.makeLogRecord({"name": "fedtier.x", "msg": "y" * 1000, "levelno": 40})
    log.emit(record)
    assert len(log.notes[0].message) == 240
