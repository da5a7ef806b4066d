"""[retention]: prune queries, the prune pass, the config table, span rotation, stream caps."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fedtier.protocol.bus.nats import StreamSpec
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.files import ConfigTable
from fedtier.protocol.telemetry.tracing import JsonLinesSpanExporter, setup_tracing
from fedtier.tiers._health import stream_bytes
from fedtier.tiers._retention import prune_once
from fedtier.tiers.config import RetentionSettings, TierKind, _retention
from fedtier.tiers.store import (
    InputRecord,
    InputState,
    OutboxEntry,
    PruneCounts,
    open_state_store,
    prune_acked_outbox,
    prune_done_inputs,
    prune_version_history,
    table_sizes,
)

SENDER = "a" * 24


def record(i: int, *, epoch: int, accepted_ms: int, leaves: tuple[bytes, ...] = ()) -> InputRecord:
    return InputRecord(
        sender=SENDER,
        input_id=i.to_bytes(16, "big"),
        seq=i,
        epoch=epoch,
        envelope=b"envelope-%d" % i,
        base_version=0,
        n_samples=1.0,
        tau=0,
        discount=1.0,
        clip_scale=1.0,
        accepted_ms=accepted_ms,
        leaves=leaves,
    )


def entry(pid: int, epoch: int) -> OutboxEntry:
    return OutboxEntry(
        partial_id=pid.to_bytes(16, "big"),
        epoch=epoch,
        seq=pid,
        subject="ft.acme.up.region.r1",
        envelope=b"partial-%d" % pid,
        trace="",
    )


def leaf(i: int, j: int) -> bytes:
    return (1000 * i + j).to_bytes(16, "big")


async def fill(path: Path) -> None:
    """Epoch 0 (inputs 1-3, accepted at 1000-1002 ms) acked upstream, so done; epoch 1
    (inputs 4-5, at 1003-1004 ms) flushed, not acked; epoch 2 (input 6) open."""
    async with open_state_store(path, in_thread=False) as store:
        for i in range(1, 7):
            epoch = 0 if i <= 3 else 1 if i <= 5 else 2
            leaves = (leaf(i, 0), leaf(i, 1))
            await store.accept(record(i, epoch=epoch, accepted_ms=999 + i, leaves=leaves))
            if i == 3:
                await store.flush(0, entry(1, 0), 3, out_seq=1)
                await store.mark_acked((1).to_bytes(16, "big"))
            if i == 5:
                await store.flush(1, entry(2, 1), 2, out_seq=2)


def run_sync(path: Path, fn, /, **kwargs):  # type: ignore[no-untyped-def]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = fn(conn, **kwargs)
        conn.execute("COMMIT")
        return result
    finally:
        conn.close()


async def test_old_version_rows_go_only_once_published_and_their_parameters_pruned(
    tmp_path: Path,
) -> None:
    path = tmp_path / "central.sqlite"
    async with open_state_store(path, in_thread=False):
        pass  # the schema
    conn = sqlite3.connect(path, isolation_level=None)
    rows = [
        # version, blob, created_ms, published
        (1, b"", 1_000, 1),  # old, parameters pruned: goes
        (2, b"", 2_000, 1),  # likewise
        (3, b"params", 3_000, 1),  # old but among keep_versions (parameters kept): stays
        (4, b"", 4_000, 0),  # never published: stays
        (5, b"", 9_000, 1),  # inside the history horizon: stays
    ]
    for version, blob, created_ms, published in rows:
        conn.execute(
            "INSERT INTO model_versions (version, blob, pointer, lineage, update_count,"
            " created_ms, published) VALUES (?, ?, x'00', x'00', 1, ?, ?)",
            (version, blob, created_ms, published),
        )
    conn.execute(
        "INSERT INTO model_metrics (version, metric, value, evaluated_ms) VALUES "
        "(1, 'accuracy', 0.5, 1), (3, 'accuracy', 0.7, 1)"
    )
    conn.close()
    assert run_sync(path, prune_version_history, created_before_ms=5_000, batch=1) == 1
    assert run_sync(path, prune_version_history, created_before_ms=5_000, batch=100) == 1
    assert run_sync(path, prune_version_history, created_before_ms=5_000, batch=100) == 0
    conn = sqlite3.connect(path)
    try:
        left = [int(r[0]) for r in conn.execute("SELECT version FROM model_versions")]
        metrics = [int(r[0]) for r in conn.execute("SELECT version FROM model_metrics")]
    finally:
        conn.close()
    assert left == [3, 4, 5]
    assert metrics == [3]


async def test_done_inputs_past_the_horizon_go_with_their_leaves_and_nothing_else(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    await fill(path)
    # Every input is older than the horizon; only the done ones (epoch 0) may go.
    counts = run_sync(path, prune_done_inputs, accepted_before_ms=10**12, batch=100)
    assert counts == PruneCounts(inputs=3, leaves=6, envelopes=0, outbox=0)
    async with open_state_store(path, in_thread=False) as store:
        assert store.input_state(SENDER, (1).to_bytes(16, "big")) is None
        assert store.input_state(SENDER, (4).to_bytes(16, "big")) is InputState.FLUSHED
        assert store.input_state(SENDER, (6).to_bytes(16, "big")) is InputState.OPEN
        # The flushed and open inputs' leaves are still counted.
        assert store.counted_leaves([leaf(1, 0), leaf(4, 0), leaf(6, 1)]) == [
            leaf(4, 0),
            leaf(6, 1),
        ]
        assert store.outbox_state((2).to_bytes(16, "big")) == "pending"
    conn = sqlite3.connect(path)
    try:
        sizes = table_sizes(conn)
    finally:
        conn.close()
    # The open input keeps its envelope; the flushed ones' went at their flush.
    assert (sizes.inputs, sizes.input_envelopes, sizes.leaves) == (3, 1, 6)


async def test_a_done_input_younger_than_the_horizon_stays_known(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    await fill(path)
    # Accepted at 1000, 1001, 1002 ms: a horizon at 1001 ms takes only the first.
    counts = run_sync(path, prune_done_inputs, accepted_before_ms=1001, batch=100)
    assert counts.inputs == 1
    async with open_state_store(path, in_thread=False) as store:
        assert store.input_state(SENDER, (1).to_bytes(16, "big")) is None
        assert store.input_state(SENDER, (2).to_bytes(16, "big")) is InputState.DONE


async def test_a_prune_deletes_at_most_one_batch_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    await fill(path)
    assert run_sync(path, prune_done_inputs, accepted_before_ms=10**12, batch=2).inputs == 2
    async with open_state_store(path, in_thread=False) as store:
        assert store.input_state(SENDER, (2).to_bytes(16, "big")) is None
        assert store.input_state(SENDER, (3).to_bytes(16, "big")) is InputState.DONE


async def test_only_acknowledged_outbox_rows_past_their_horizon_go(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    await fill(path)
    assert run_sync(path, prune_acked_outbox, acked_before_ms=0, batch=100) == 0
    assert run_sync(path, prune_acked_outbox, acked_before_ms=10**15, batch=100) == 1
    async with open_state_store(path, in_thread=False) as store:
        assert store.outbox_state((1).to_bytes(16, "big")) is None
        assert store.outbox_state((2).to_bytes(16, "big")) == "pending"


async def test_a_prune_pass_runs_through_the_committer_until_nothing_is_due(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite"
    await fill(path)
    settings = RetentionSettings(
        dedupe_horizon_s=1.0, up_stream_max_age_s=1.0, outbox_horizon_s=0.0, prune_batch=1
    )
    async with open_state_store(path, in_thread=False) as store:
        # The daemon's clock says 1_000_000 ms: everything is past a 1 s horizon.
        counts = await prune_once(
            store, settings, clock_ms=lambda: 1_000_000, wall_ms=lambda: 10**15
        )
        assert counts == PruneCounts(inputs=3, leaves=6, outbox=1)
        # Accepts still go through afterwards; nothing else is due.
        await store.accept(record(7, epoch=2, accepted_ms=1_000_000))
        again = await prune_once(store, settings, clock_ms=lambda: 1_000_000, wall_ms=lambda: 0)
        assert again == PruneCounts()
    conn = sqlite3.connect(path)
    try:
        sizes = table_sizes(conn)
    finally:
        conn.close()
    assert (sizes.inputs, sizes.leaves, sizes.outbox, sizes.input_envelopes) == (4, 6, 1, 2)


def retention_table(values: dict[str, object], kind: TierKind = "edge") -> RetentionSettings:
    settings, _ = _retention(ConfigTable(values, source="edge.toml", path="retention"), kind)
    return settings


def test_the_retention_table_is_read_and_checked() -> None:
    settings = retention_table(
        {"dedupe_horizon_s": 1_209_600, "up_stream_max_bytes": 3 << 30, "span_files_keep": 2}
    )
    assert settings.dedupe_horizon_s == 1_209_600
    assert settings.up_stream_max_bytes == 3 << 30
    assert settings.span_files_keep == 2
    assert settings.up_stream_max_age_s == RetentionSettings().up_stream_max_age_s
    # Shorter than the stream's max age: a redelivered partial would be taken again.
    with pytest.raises(ConfigError, match="dedupe_horizon_s"):
        retention_table({"dedupe_horizon_s": 3600})
    with pytest.raises(ConfigError, match="dedupe_horizon_s"):
        RetentionSettings(dedupe_horizon_s=10.0, up_stream_max_age_s=20.0)
    # keep_versions is the central's alone.
    with pytest.raises(ConfigError, match="keep_versions"):
        retention_table({"keep_versions": 3})
    central, keep = _retention(
        ConfigTable({"keep_versions": 3}, source="central.toml", path="retention"), "central"
    )
    assert keep == 3
    assert central == RetentionSettings()
    # So is the version history horizon (only the central keeps version rows).
    with pytest.raises(ConfigError, match="version_history_s"):
        retention_table({"version_history_s": 86400})
    central, _ = _retention(
        ConfigTable({"version_history_s": 86400}, source="central.toml", path="retention"),
        "central",
    )
    assert central.version_history_s == 86400


def test_a_span_file_rotates_past_its_size_and_keeps_only_the_newest(tmp_path: Path) -> None:
    handle = setup_tracing(
        "fedtier-edge",
        instance_id="e1",
        jsonl_dir=tmp_path,
        set_global=False,
        jsonl_max_bytes=2_000,
        jsonl_keep=2,
    )
    try:
        for i in range(60):
            with handle.tracer.start_as_current_span(f"span-{i}"):
                pass
            handle.force_flush()
    finally:
        handle.shutdown()
    files = sorted(p.name for p in tmp_path.iterdir())
    # The current file exists again from the first batch after a rotation.
    rotated = ["fedtier-edge-e1.1.jsonl", "fedtier-edge-e1.2.jsonl"]
    assert files in (rotated, [*rotated, "fedtier-edge-e1.jsonl"])
    # Each file is under its cap plus one batch; the newest span is in the newest file.
    for name in files:
        assert (tmp_path / name).stat().st_size < 2_000 + 1_000
    newest = tmp_path / files[-1] if len(files) == 3 else tmp_path / rotated[0]
    names = [json.loads(line)["name"] for line in newest.read_text().splitlines()]
    assert names[-1] == "span-59"
    older = [json.loads(line)["name"] for line in (tmp_path / rotated[1]).read_text().splitlines()]
    assert "span-0" not in older


def test_a_rotation_with_nothing_kept_starts_the_file_afresh(tmp_path: Path) -> None:
    exporter = JsonLinesSpanExporter(tmp_path / "x.jsonl", max_bytes=10, keep=0)
    assert exporter.rotated_path(1) == tmp_path / "x.1.jsonl"
    with pytest.raises(ValueError, match="max_bytes"):
        JsonLinesSpanExporter(tmp_path / "y.jsonl", max_bytes=0)


def test_stream_caps_are_checked() -> None:
    spec = StreamSpec("UP", ("up.>",), 3600.0, 60.0, max_bytes=1 << 20, discard="new")
    assert (spec.max_bytes, spec.discard, spec.retention) == (1 << 20, "new", "limits")
    with pytest.raises(ConfigError, match="max_bytes"):
        StreamSpec("UP", ("up.>",), 3600.0, 60.0, max_bytes=0)
    with pytest.raises(ConfigError, match="discard"):
        StreamSpec("UP", ("up.>",), 3600.0, 60.0, discard="oldest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="retention"):
        StreamSpec("UP", ("up.>",), 3600.0, 60.0, retention="work")  # type: ignore[arg-type]


def test_the_stream_probe_reads_a_streams_bytes_from_jsz() -> None:
    jsz = {
        "account_details": [
            {
                "name": "FEDTIER",
                "stream_detail": [
                    {"name": "KV_acme", "state": {"bytes": 5}},
                    {"name": "FT_ACME_UP", "state": {"messages": 3, "bytes": 1234}},
                    {"name": "NO_STATE"},
                ],
            }
        ]
    }
    assert stream_bytes(jsz, "FT_ACME_UP") == 1234
    assert stream_bytes(jsz, "NO_STATE") is None
    assert stream_bytes(jsz, "MISSING") is None
    assert stream_bytes({}, "FT_ACME_UP") is None
