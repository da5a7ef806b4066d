"""The trace explorer's span database, view models, HTTP API and commands, without a browser.

The views are checked against ``tracequery.follow_update`` over an in-memory
``TraceIndex`` (another code path over the same spans) on a synthetic day of
the benchmark's generator, small enough to build in a second.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtier.cli import main as fedtier_main
from fedtier.simulations.bench.explorer import DayShape, synthetic_spans
from fedtier.tiers.explorer import (
    STAGES,
    SpanStore,
    device_view,
    explorer_server,
    instance_view,
    overview,
    refusals_view,
    search,
    update_view,
    version_view,
)
from fedtier.tiers.tracequery import SpanRecord, TraceIndex, follow_update

SHAPE = DayShape(
    devices=40,
    updates_per_device=6,
    edges=4,
    regionals=2,
    edge_flush=4,
    regional_flush=2,
    central_flush=2,
    reject_share=0.08,
    duplicate_share=0.05,
    late_share=0.1,
    quarantine_share=0.05,
    seed=3,
)


@pytest.fixture(scope="module")
def day() -> list[dict[str, Any]]:
    return list(synthetic_spans(SHAPE))


@pytest.fixture(scope="module")
def records(day: list[dict[str, Any]]) -> list[SpanRecord]:
    return [SpanRecord.from_json(obj) for obj in day]


@pytest.fixture(scope="module")
def store(records: list[SpanRecord]) -> Iterator[SpanStore]:
    with SpanStore() as db:
        db.add(records)
        yield db


@pytest.fixture(scope="module")
def truth(records: list[SpanRecord]) -> dict[str | None, Any]:
    """Model version -> update ids, by follow_update over an in-memory index."""
    index = TraceIndex(records)
    by_version: dict[int | None, set[str]] = defaultdict(set)
    for uid in index.update_ids():
        by_version[follow_update(uid, index).model_version].add(uid)
    return {"index": index, "by_version": by_version}


def _versions(records: list[SpanRecord]) -> list[int]:
    return sorted(
        int(r.attributes["fedtier.model_version"])
        for r in records
        if r.name == "central publish model"
    )


def test_the_store_keeps_a_span_once(records: list[SpanRecord]) -> None:
    with SpanStore() as db:
        assert db.add(records) == len(records)
        assert db.add(records[:50]) == 0
        assert db.count() == len(records)


def test_a_store_file_is_reopened_with_its_spans(tmp_path: Path, records: list[SpanRecord]) -> None:
    with SpanStore(tmp_path / "spans.sqlite") as db:
        db.add(records[: len(records) // 2])
    with SpanStore(tmp_path / "spans.sqlite") as db:
        assert db.add(records) == len(records) - len(records) // 2
        assert db.count() == len(records)
        assert len(db.services()) == len({r.instance for r in records})


def test_every_version_lists_the_updates_that_follow_update_finds_in_it(
    store: SpanStore, records: list[SpanRecord], truth: dict[str, Any]
) -> None:
    versions = _versions(records)
    assert len(versions) >= 5
    for version in versions[1:]:
        view = version_view(store, version)
        assert view is not None
        listed = {u["update_id"] for u in view["updates"]}
        assert listed == truth["by_version"][version], version
        assert listed, version
        tree = {uid for r in view["partials"] for e in r["children"] for uid in e["updates"]}
        assert tree == listed
        assert view["leaf_count"] == len(listed)
        assert all(u["device"] for u in view["updates"])
        assert {u["edge"] for u in view["updates"]} == set(view["edges"])
        stages = [row["stage"] for row in view["waterfall"]]
        assert stages == list(STAGES)
        assert all(r["start_ms"] <= r["end_ms"] for r in view["waterfall"])
        assert sum(view["staleness_histogram"].values()) == len(listed)
        assert view["previous"] == version - 1
        assert 0 < view["metrics"]["accuracy"] < 1  # from its evaluate model span


def test_a_version_shows_late_partials_and_what_was_refused_meanwhile(
    store: SpanStore, records: list[SpanRecord]
) -> None:
    late_ids = {
        r.attributes["fedtier.partial_id"] for r in records if r.attributes.get("fedtier.late")
    }
    assert late_ids
    shown: set[str] = set()
    refused = Counter[str]()
    for version in _versions(records)[1:]:
        view = version_view(store, version)
        assert view is not None
        shown |= {item["id"] for item in view["late"]}
        for row in view["refused"]["counts"]:
            refused[f"{row['tier']} {row['outcome']} {row['reason']}"] += row["count"]
    # Every late partial that made it into a version is flagged there.
    assert shown
    assert shown <= late_ids
    assert refused["edge rejected stale"] > 0


def test_version_zero_and_unknown_versions(store: SpanStore) -> None:
    zero = version_view(store, 0)
    assert zero is not None
    assert zero["updates"] == []
    assert zero["previous"] is None
    assert version_view(store, 10**6) is None


def test_an_update_view_is_its_path_to_the_version(store: SpanStore, truth: dict[str, Any]) -> None:
    version = max(v for v in truth["by_version"] if v is not None)
    uid = sorted(truth["by_version"][version])[0]
    view = update_view(store, uid[:10])
    assert view is not None
    assert view["update_id"] == uid
    assert view["model_version"] == version
    assert view["included"]
    assert [h["name"] for h in view["hops"]] == list(STAGES)
    assert view["device"]
    assert view["edge"] == view["hops"][1]["instance"]
    assert view["deliveries"][0]["outcome"] == "accepted"


def test_a_rejected_update_says_where_and_why(store: SpanStore, records: list[SpanRecord]) -> None:
    rejected = next(
        r
        for r in records
        if r.name == "edge process" and r.attributes.get("fedtier.outcome") == "rejected"
    )
    view = update_view(store, rejected.attributes["fedtier.update_id"])
    assert view is not None
    assert not view["included"]
    assert view["model_version"] is None
    reason = rejected.attributes["fedtier.reason"]
    assert view["ends"] == f"rejected at edge {rejected.instance}: {reason}"
    assert [h["name"] for h in view["hops"]] == ["device send", "edge process"]
    assert update_view(store, "ff" * 16) is None
    with pytest.raises(ValueError, match="not hexadecimal"):
        update_view(store, "xyz")


def test_a_device_view_lists_every_update_it_sent(
    store: SpanStore, records: list[SpanRecord], truth: dict[str, Any]
) -> None:
    device = next(r.attributes["fedtier.device"] for r in records if r.name == "device send")
    sent = {
        r.attributes["fedtier.update_id"]
        for r in records
        if r.name == "device send" and r.attributes["fedtier.device"] == device
    }
    view = device_view(store, device)
    assert view is not None
    assert {u["update_id"] for u in view["updates"]} == sent
    assert len(sent) == SHAPE.updates_per_device
    starts = [u["start_unix_ns"] for u in view["updates"]]
    assert starts == sorted(starts)
    for row in view["updates"]:
        assert row["model_version"] == follow_update(row["update_id"], truth["index"]).model_version
    assert view["included"] == sum(1 for u in view["updates"] if u["model_version"] is not None)
    assert device_view(store, "nosuchdevice") is None


def test_refusals_count_every_rejection_duplicate_and_late_partial(
    store: SpanStore, records: list[SpanRecord]
) -> None:
    expected = Counter[str]()
    for r in records:
        outcome = r.attributes.get("fedtier.outcome")
        tier = r.name.split()[0]
        if outcome in ("rejected", "duplicate"):
            reason = r.attributes.get("fedtier.reason")
            expected[f"{tier} {outcome}" + (f": {reason}" if reason else "")] += 1
        if r.attributes.get("fedtier.late"):
            expected[f"{tier} late partial"] += 1
    view = refusals_view(store)
    got = {s["key"]: s["total"] for s in view["series"]}
    assert got == dict(expected)
    assert all(sum(s["counts"]) == s["total"] for s in view["series"])
    quarantined = {s["key"] for s in view["series"] if s["quarantined"]}
    assert quarantined == {k for k in expected if k.split()[0] != "edge" and "rejected" in k}
    assert view["recent"]


def test_overview_and_instance_views(store: SpanStore, records: list[SpanRecord]) -> None:
    view = overview(store)
    assert view["spans"] == len(records)
    assert view["versions"][0]["version"] == max(_versions(records))
    edges = {i["instance"] for i in view["instances"] if i["service"] == "fedtier-edge"}
    assert len(edges) == SHAPE.edges
    edge = sorted(edges)[0]
    detail = instance_view(store, edge)
    assert detail is not None
    cut = sum(1 for r in records if r.name == "edge aggregate" and r.instance == edge)
    assert len(detail["aggregates"]) == cut
    assert instance_view(store, "nobody") is None


def test_search_finds_versions_updates_partials_devices_and_daemons(
    store: SpanStore, records: list[SpanRecord]
) -> None:
    send = next(r for r in records if r.name == "device send")
    uid = send.attributes["fedtier.update_id"]
    device = send.attributes["fedtier.device"]
    partial = next(r for r in records if r.name == "edge aggregate").attributes[
        "fedtier.partial_id"
    ]
    edge = next(r.instance for r in records if r.name == "edge process")

    def hits(q: str) -> set[tuple[str, object]]:
        return {(h["kind"], h["id"]) for h in search(store, q)["hits"]}

    assert ("update", uid) in hits(uid[:8])
    assert ("partial", partial) in hits(partial[:10])
    assert ("device", device) in hits(device[:6])
    assert ("instance", edge) in hits(edge[:5])
    assert ("version", 2) in hits("v2")
    assert hits("") == set()


def test_a_partial_found_by_search_names_the_version_that_included_it(
    store: SpanStore, truth: dict[str, Any]
) -> None:
    version = max(v for v in truth["by_version"] if v is not None)
    uid = sorted(truth["by_version"][version])[0]
    path = update_view(store, uid)
    assert path is not None
    edge_partial = path["hops"][3]["attributes"]["fedtier.partial_id"]
    regional_partial = path["hops"][6]["attributes"]["fedtier.partial_id"]
    for partial, tier in ((edge_partial, "edge"), (regional_partial, "regional")):
        (hit,) = [h for h in search(store, partial)["hits"] if h["kind"] == "partial"]
        assert (hit["tier"], hit["model_version"]) == (tier, version)
        assert hit["ends"] == f"included in model v{version}"


# -- HTTP -------------------------------------------------------------------------------


@pytest.fixture
def base_url(store: SpanStore) -> Iterator[str]:
    server = explorer_server(store, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_the_api_serves_the_views_and_says_what_is_missing(base_url: str, store: SpanStore) -> None:
    status, kind, body = _get(f"{base_url}/api/version/3")
    assert (status, kind) == (200, "application/json")
    assert json.loads(body) == json.loads(json.dumps(version_view(store, 3)))
    assert _get(f"{base_url}/api/version/999999")[0] == 404
    status, _, body = _get(f"{base_url}/api/update/nothex")
    assert status == 400
    assert "not hexadecimal" in json.loads(body)["error"]
    assert _get(f"{base_url}/api/nothing")[0] == 404


def test_pages_and_static_files_come_from_the_package(base_url: str) -> None:
    for page in ("/", "/version/3", "/update/ab", "/device/x", "/refusals", "/search?q=v1"):
        status, kind, body = _get(base_url + page)
        assert status == 200, page
        assert kind.startswith("text/html")
        assert b'<script src="/static/app.js"></script>' in body
    status, kind, body = _get(f"{base_url}/static/app.js")
    assert (status, kind.split(";")[0]) == (200, "text/javascript")
    assert b"/api/version/" in body
    assert b"http://" not in body
    assert b"https://" not in body
    assert _get(f"{base_url}/static/style.css")[0] == 200
    assert _get(f"{base_url}/static/..%2Fexplorer%2F_http.py")[0] == 404
    assert _get(f"{base_url}/nowhere/at/all")[0] == 404


# -- commands ---------------------------------------------------------------------------


def test_trace_serve_and_collect_refuse_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fedtier_main(["trace", "serve"]) == 2
    assert "exactly one of --dir" in capsys.readouterr().err
    assert fedtier_main(["trace", "serve", "--dir", str(tmp_path), "--db", "x"]) == 2
    capsys.readouterr()
    assert fedtier_main(["trace", "serve", "--dir", str(tmp_path / "no"), "--listen", ":1"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert fedtier_main(["trace", "serve", "--dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert fedtier_main(["trace", "serve", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert fedtier_main(["trace", "collect", "--dir", str(tmp_path)]) == 2
    assert "collect needs --db" in capsys.readouterr().err
    assert fedtier_main(["trace", "ab" * 8, "--dir", str(tmp_path), "--db", "x"]) == 2
    assert "--db and --listen are for trace serve|collect" in capsys.readouterr().err
    assert fedtier_main(["trace", "ab" * 8]) == 2
    assert "required: --dir" in capsys.readouterr().err


def test_bench_explorer_prints_its_figures_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    # Tiny: the command's shape, not its times (those belong in docs, not assertions).
    args = ["bench", "explorer", "--devices", "80", "--updates-per-device", "10", "--edges", "2"]
    assert fedtier_main([*args, "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["spans"] > 80 * 10 * 2
    assert result["json_lines_bytes"] > 0
    assert result["sqlite_bytes"] > 0
    assert result["model_versions"] >= 1
    assert {"overview", "version", "update", "device", "refusals"} <= set(result["timings"])
    assert all(t["median_ms"] > 0 for t in result["timings"].values())
