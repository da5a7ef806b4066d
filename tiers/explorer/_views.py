"""The explorer's view models, built from a ``SpanStore``; no HTTP, no HTML.

Each function returns a JSON-ready dict that the page scripts draw as is, so
what a page shows is tested here without a browser. Ids are lowercase hex,
times are Unix nanoseconds plus offsets in milliseconds from the view's first
span. A view that finds nothing returns ``None`` (the HTTP layer's 404).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Final

from fedtier.protocol.telemetry import (
    ATTR_CLIP_SCALE,
    ATTR_DEVICE,
    ATTR_FLUSH_REASON,
    ATTR_INPUT_COUNT,
    ATTR_INPUT_IDS,
    ATTR_LATE,
    ATTR_LEAF_COUNT,
    ATTR_METRIC_PREFIX,
    ATTR_MODEL_VERSION,
    ATTR_OUTCOME,
    ATTR_PARTIAL_ID,
    ATTR_REASON,
    ATTR_SENDER,
    ATTR_STALENESS,
    ATTR_UPDATE_ID,
    ATTR_WEIGHT,
    span_name,
)
from fedtier.tiers.explorer._store import SpanStore
from fedtier.tiers.tracequery import SpanRecord, follow_partial, follow_update

__all__ = [
    "ATTR_CLIP_SCALE",
    "ATTR_WEIGHT",
    "STAGES",
    "device_view",
    "instance_view",
    "overview",
    "refusals_view",
    "search",
    "update_view",
    "version_view",
]


STAGES: Final = (
    "device send",
    "edge process",
    "edge aggregate",
    "edge send",
    "regional process",
    "regional aggregate",
    "regional send",
    "central process",
    "central aggregate",
    "central publish model",
)
"""Every hop of an update, in order: the rows of a version's latency waterfall."""

PUBLISH: Final = span_name("central", "publish model")
EVALUATE: Final = span_name("central", "evaluate model")
_LIST_LIMIT: Final = 200
_HEX_RE: Final = re.compile(r"[0-9a-f]{4,32}")
_VERSION_RE: Final = re.compile(r"v?(\d{1,9})")


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _attr(span: SpanRecord, name: str) -> Any:
    return span.attributes.get(name)


def _tier(span: SpanRecord) -> str:
    return span.name.split(" ", 1)[0]


def _span_json(span: SpanRecord, t0: int) -> dict[str, Any]:
    """One span as the pages show it: names, times from ``t0``, the fedtier attributes."""
    return {
        "name": span.name,
        "tier": _tier(span),
        "service": span.service,
        "instance": span.instance,
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "start_unix_ns": span.start_unix_ns,
        "offset_ms": _ms(span.start_unix_ns - t0),
        "duration_ms": _ms(span.end_unix_ns - span.start_unix_ns),
        "status": span.status,
        "attributes": {
            k: v
            for k, v in span.attributes.items()
            if k.startswith(("fedtier.", "messaging.")) and k != ATTR_INPUT_IDS
        },
    }


def _accepted_first(spans: Iterable[SpanRecord]) -> dict[str, SpanRecord]:
    """Item id -> its process span, the accepted one when it was delivered several times."""
    out: dict[str, SpanRecord] = {}
    for span in sorted(spans, key=lambda s: s.start_unix_ns):
        item = _attr(span, ATTR_UPDATE_ID) or _attr(span, ATTR_PARTIAL_ID)
        if not isinstance(item, str):
            continue
        key = item.lower()
        held = out.get(key)
        if held is None or (
            _attr(held, ATTR_OUTCOME) != "accepted" and _attr(span, ATTR_OUTCOME) == "accepted"
        ):
            out[key] = span
    return out


def _inputs(span: SpanRecord | None) -> list[str]:
    if span is None:
        return []
    ids = _attr(span, ATTR_INPUT_IDS)
    return [i.lower() for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def _publish(store: SpanStore, version: int) -> SpanRecord | None:
    found = store.spans_where(
        "s.name = ? AND s.version = ?", (PUBLISH, version), "ORDER BY s.start_ns LIMIT 1"
    )
    return found[0] if found else None


def _neighbours(store: SpanStore, version: int) -> tuple[int | None, int | None]:
    rows = store.query(
        "SELECT (SELECT MAX(version) FROM spans WHERE name = ?1 AND version < ?2),"
        " (SELECT MIN(version) FROM spans WHERE name = ?1 AND version > ?2)",
        (PUBLISH, version),
    )
    return rows[0][0], rows[0][1]


def version_view(store: SpanStore, version: int) -> dict[str, Any] | None:
    """Model ``version``: its tree of partials and updates, waterfall, late and refused inputs.

    The tree is rebuilt downwards from the publish span: central aggregate ->
    the partials it lists -> their ``central process`` spans -> the sending
    regional aggregate -> its partials -> ... -> each update's ``edge process``
    and ``device send`` spans.
    """
    publish = _publish(store, version)
    if publish is None:
        return None
    prev_version, next_version = _neighbours(store, version)
    central_agg = store.parent(publish)
    spans: list[SpanRecord] = [publish]
    if central_agg is not None:
        spans.append(central_agg)
    partials: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    sent_by: dict[str, SpanRecord] = {}

    def level(
        ids: Sequence[str], tier: str, lower: str | None
    ) -> list[tuple[str, SpanRecord | None, SpanRecord | None, SpanRecord | None]]:
        """(item, its process span at ``tier``, the send above it, the aggregate that made it)."""
        processes = _accepted_first(store.naming_any(ids, span_name(tier, "process")))
        spans.extend(processes.values())
        if lower is None:
            return [(i, processes.get(i), None, None) for i in ids]
        sends = store.parents(list(processes.values()))
        spans.extend(sends.values())
        aggregates = store.parents(list(sends.values()))
        spans.extend(aggregates.values())
        if len(aggregates) < len(sends):
            # A send span whose parent is missing: find the aggregate by its partial id.
            missing = [i for i in ids if i in processes and processes[i].key not in sends]
            for found in store.naming_any(missing, span_name(lower, "aggregate")):
                sent_by[str(_attr(found, ATTR_PARTIAL_ID)).lower()] = found
                spans.append(found)
        out: list[tuple[str, SpanRecord | None, SpanRecord | None, SpanRecord | None]] = []
        for i in ids:
            process = processes.get(i)
            send = sends.get(process.key) if process is not None else None
            agg = aggregates.get(send.key) if send is not None else sent_by.get(i)
            out.append((i, process, send, agg))
        return out

    def partial_json(
        item: str, tier: str, process: SpanRecord | None, agg: SpanRecord | None
    ) -> dict[str, Any]:
        node: dict[str, Any] = {
            "partial_id": item,
            "tier": tier,
            "instance": agg.instance if agg is not None else None,
            "received_by": process.instance if process is not None else None,
            "staleness": _attr(process, ATTR_STALENESS) if process is not None else None,
            "late": bool(_attr(process, ATTR_LATE)) if process is not None else False,
            "input_count": _attr(agg, ATTR_INPUT_COUNT) if agg is not None else None,
            "leaf_count": _attr(agg, ATTR_LEAF_COUNT) if agg is not None else None,
            "flush_reason": _attr(agg, ATTR_FLUSH_REASON) if agg is not None else None,
            "made_at_version": _attr(agg, ATTR_MODEL_VERSION) if agg is not None else None,
            "children": [],
            "updates": [],
        }
        if node["late"]:
            late.append({"kind": "partial", "id": item, "tier": tier, "at": node["received_by"]})
        return node

    regional_ids = _inputs(central_agg)
    for rid, process, _send, ragg in level(regional_ids, "central", "regional"):
        rnode = partial_json(rid, "regional", process, ragg)
        partials.append(rnode)
        for eid, eproc, _esend, eagg in level(_inputs(ragg), "regional", "edge"):
            enode = partial_json(eid, "edge", eproc, eagg)
            rnode["children"].append(enode)
            for uid, uproc, _u, _a in level(_inputs(eagg), "edge", None):
                enode["updates"].append(uid)
                updates.append({"update_id": uid, "edge": enode["instance"], "process": uproc})
    # The device send spans are the edge process spans' parents.
    device_sends = store.parents([u["process"] for u in updates if u["process"] is not None])
    spans.extend(device_sends.values())
    t0 = min(s.start_unix_ns for s in spans)
    update_rows: list[dict[str, Any]] = []
    for row in updates:
        edge_process: SpanRecord | None = row["process"]
        send = device_sends.get(edge_process.key) if edge_process is not None else None
        device = None
        if edge_process is not None:
            device = _attr(edge_process, ATTR_DEVICE)
        if device is None and send is not None:
            device = _attr(send, ATTR_DEVICE)
        update_rows.append(
            {
                "update_id": row["update_id"],
                "device": device,
                "edge": row["edge"],
                "base_version": _attr(send, ATTR_MODEL_VERSION) if send is not None else None,
                "staleness": _attr(edge_process, ATTR_STALENESS)
                if edge_process is not None
                else None,
                "weight": _attr(edge_process, ATTR_WEIGHT) if edge_process is not None else None,
                "clip_scale": _attr(edge_process, ATTR_CLIP_SCALE)
                if edge_process is not None
                else None,
                "sent_offset_ms": _ms(send.start_unix_ns - t0) if send is not None else None,
                "received_offset_ms": _ms(edge_process.start_unix_ns - t0)
                if edge_process is not None
                else None,
            }
        )
    waterfall = []
    by_stage: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        by_stage[span.name].append(span)
    for stage in STAGES:
        members = by_stage.get(stage, [])
        if not members:
            continue
        start = min(s.start_unix_ns for s in members)
        end = max(s.end_unix_ns for s in members)
        waterfall.append(
            {
                "stage": stage,
                "count": len(members),
                "start_ms": _ms(start - t0),
                "end_ms": _ms(end - t0),
                "max_duration_ms": _ms(max(s.end_unix_ns - s.start_unix_ns for s in members)),
            }
        )
    # What was refused while this version was being made: between the previous
    # publish and this one.
    since = None
    if prev_version is not None:
        prev = _publish(store, prev_version)
        since = prev.end_unix_ns if prev is not None else None
    refused = _refusals_between(store, since, publish.end_unix_ns)
    # Held-out metrics: on ``central evaluate model`` (or, from older centrals, the publish).
    evaluations = store.spans_where(
        "s.name = ? AND s.version = ?", (EVALUATE, version), "ORDER BY s.start_ns"
    )
    metrics = {
        k.removeprefix(ATTR_METRIC_PREFIX): v
        for span in (publish, *evaluations)
        for k, v in span.attributes.items()
        if k.startswith(ATTR_METRIC_PREFIX)
    }
    devices = sorted({str(r["device"]) for r in update_rows if r["device"]})
    edges = sorted({str(p["instance"]) for r in partials for p in r["children"] if p["instance"]})
    staleness = [r["staleness"] for r in update_rows if isinstance(r["staleness"], int)]
    return {
        "version": version,
        "previous": prev_version,
        "next": next_version,
        "published_unix_ns": publish.start_unix_ns,
        "t0_unix_ns": t0,
        "time_to_publish_ms": _ms(publish.end_unix_ns - t0),
        "central": publish.instance,
        "aggregate": _span_json(central_agg, t0) if central_agg is not None else None,
        "flush_reason": _attr(central_agg, ATTR_FLUSH_REASON) if central_agg else None,
        "leaf_count": _attr(central_agg, ATTR_LEAF_COUNT) if central_agg else None,
        "metrics": metrics,
        "partials": partials,
        "updates": update_rows,
        "devices": devices,
        "edges": edges,
        "staleness_histogram": dict(sorted(Counter(staleness).items())),
        "waterfall": waterfall,
        "late": late,
        "refused": refused,
    }


def _refusals_between(store: SpanStore, since: int | None, until: int) -> dict[str, Any]:
    where = "s.outcome IN ('rejected', 'duplicate') AND s.start_ns <= ?"
    params: list[Any] = [until]
    if since is not None:
        where += " AND s.start_ns > ?"
        params.append(since)
    rows = store.query(
        f"SELECT s.name, s.outcome, s.reason, COUNT(*) FROM spans s WHERE {where}"  # noqa: S608
        " GROUP BY s.name, s.outcome, s.reason ORDER BY COUNT(*) DESC",
        params,
    )
    listed = store.spans_where(where, params, f"ORDER BY s.start_ns DESC LIMIT {_LIST_LIMIT}")
    return {
        "counts": [
            {
                "tier": name.split(" ", 1)[0],
                "outcome": outcome,
                "reason": reason or "",
                "quarantined": _quarantined(name, outcome),
                "count": n,
            }
            for name, outcome, reason, n in rows
        ],
        "recent": [_refusal_json(span) for span in listed],
    }


def _quarantined(name: str, outcome: str | None) -> bool:
    """A refused partial is kept in the tier's quarantine; a refused update is only receipted."""
    return outcome == "rejected" and not name.startswith("edge ")


def _refusal_json(span: SpanRecord) -> dict[str, Any]:
    item = _attr(span, ATTR_UPDATE_ID) or _attr(span, ATTR_PARTIAL_ID)
    return {
        "start_unix_ns": span.start_unix_ns,
        "tier": _tier(span),
        "instance": span.instance,
        "outcome": _attr(span, ATTR_OUTCOME),
        "reason": _attr(span, ATTR_REASON) or "",
        "quarantined": _quarantined(span.name, _attr(span, ATTR_OUTCOME)),
        "kind": "update" if _attr(span, ATTR_UPDATE_ID) else "partial",
        "id": item.lower() if isinstance(item, str) else None,
        "device": _attr(span, ATTR_DEVICE),
        "sender": _attr(span, ATTR_SENDER),
    }


def update_view(store: SpanStore, update_id: str) -> dict[str, Any] | None:
    """One update's path through every tier to the version that included it, or where it stopped.

    Raises:
        ValueError: ``update_id`` is not hex or is an ambiguous prefix.
    """
    path = follow_update(update_id, store)
    if not path.found:
        return None
    wanted = path.update_id
    t0 = path.hops[0].start_unix_ns
    hops = []
    for hop in path.hops:
        hops.append(
            {
                "name": hop.name,
                "tier": hop.name.split(" ", 1)[0],
                "service": hop.service,
                "instance": hop.instance,
                "trace_id": hop.trace_id,
                "span_id": hop.span_id,
                "offset_ms": _ms(hop.start_unix_ns - t0),
                "duration_ms": _ms(hop.end_unix_ns - hop.start_unix_ns),
                "attributes": {k: v for k, v in hop.attributes.items() if k != ATTR_INPUT_IDS},
            }
        )
    # Every delivery of the update, the ones off the winning path too
    # (a redelivery counted as a duplicate, a rejection before a retry).
    deliveries = [
        _refusal_json(span) | {"offset_ms": _ms(span.start_unix_ns - t0)}
        for span in sorted(store.naming(wanted, "edge process"), key=lambda s: s.start_unix_ns)
    ]
    device = next(
        (h.attributes.get(ATTR_DEVICE) for h in path.hops if ATTR_DEVICE in h.attributes), None
    )
    edge = next((h.instance for h in path.hops if h.name == "edge process"), None)
    return {
        "update_id": wanted,
        "device": device,
        "edge": edge,
        "model_version": path.model_version,
        "ends": path.ends,
        "included": path.model_version is not None,
        "start_unix_ns": t0,
        "total_ms": _ms(path.hops[-1].end_unix_ns - t0),
        "hops": hops,
        "deliveries": deliveries,
    }


def device_view(store: SpanStore, device: str, limit: int = _LIST_LIMIT) -> dict[str, Any] | None:
    """One device's updates over time: when, on which base, how each edge took it, which version."""
    wanted = device.strip().lower()
    spans = store.spans_where(
        "s.device = ? AND +s.name IN ('device send', 'edge process')",
        (wanted,),
        f"ORDER BY s.start_ns DESC LIMIT {limit * 4}",
    )
    if not spans:
        return None
    by_update: dict[str, dict[str, SpanRecord]] = defaultdict(dict)
    for span in spans:
        uid = _attr(span, ATTR_UPDATE_ID)
        if isinstance(uid, str):
            by_update[uid.lower()].setdefault(span.name, span)
    rows: list[dict[str, Any]] = []
    for uid, named in by_update.items():
        send = named.get("device send")
        process = named.get("edge process")
        first = send or process
        assert first is not None
        path = follow_update(uid, store)
        rows.append(
            {
                "update_id": uid,
                "start_unix_ns": first.start_unix_ns,
                "base_version": _attr(send, ATTR_MODEL_VERSION) if send is not None else None,
                "edge": process.instance if process is not None else None,
                "outcome": _attr(process, ATTR_OUTCOME) if process is not None else None,
                "reason": (_attr(process, ATTR_REASON) or "") if process is not None else "",
                "staleness": _attr(process, ATTR_STALENESS) if process is not None else None,
                "model_version": path.model_version,
                "ends": path.ends,
            }
        )
    rows.sort(key=lambda r: int(r["start_unix_ns"]))
    rows = rows[-limit:]
    outcomes = Counter(
        r["outcome"] if r["outcome"] != "rejected" else f"rejected: {r['reason']}" for r in rows
    )
    return {
        "device": wanted,
        "updates": rows,
        "count": len(rows),
        "included": sum(1 for r in rows if r["model_version"] is not None),
        "outcomes": dict(outcomes.most_common()),
        "edges": sorted({r["edge"] for r in rows if r["edge"]}),
    }


def refusals_view(store: SpanStore, buckets: int = 48) -> dict[str, Any]:
    """Rejections, duplicates, quarantined partials and late partials by reason over time."""
    return store.cached(f"refusals/{buckets}", lambda: _refusals(store, buckets))


def _refusals(store: SpanStore, buckets: int) -> dict[str, Any]:
    # Two subqueries: each is one step down the start_ns index, where one
    # MIN and MAX together would scan it.
    bounds = store.query(
        "SELECT (SELECT MIN(start_ns) FROM spans), (SELECT MAX(start_ns) FROM spans)"
    )[0]
    lo, hi = (bounds[0] or 0), (bounds[1] or 0)
    width = max(1, (hi - lo) // max(1, buckets) + 1)
    rows = store.query(
        "SELECT name, outcome, COALESCE(reason, ''), (start_ns - ?) / ?, COUNT(*) FROM spans"
        " WHERE outcome IN ('rejected', 'duplicate') GROUP BY 1, 2, 3, 4",
        (lo, width),
    )
    late_rows = store.query(
        "SELECT name, (start_ns - ?) / ?, COUNT(*) FROM spans WHERE late = 1 GROUP BY 1, 2",
        (lo, width),
    )
    series: dict[str, list[int]] = {}
    totals: Counter[str] = Counter()
    info: dict[str, dict[str, Any]] = {}
    for name, outcome, reason, bucket, n in rows:
        tier = name.split(" ", 1)[0]
        key = f"{tier} {outcome}" + (f": {reason}" if reason else "")
        series.setdefault(key, [0] * buckets)[min(int(bucket), buckets - 1)] += n
        totals[key] += n
        info[key] = {
            "tier": tier,
            "outcome": outcome,
            "reason": reason,
            "quarantined": _quarantined(name, outcome),
        }
    for name, bucket, n in late_rows:
        tier = name.split(" ", 1)[0]
        key = f"{tier} late partial"
        series.setdefault(key, [0] * buckets)[min(int(bucket), buckets - 1)] += n
        totals[key] += n
        info[key] = {"tier": tier, "outcome": "late", "reason": "", "quarantined": False}
    recent = store.spans_where(
        "s.outcome IN ('rejected', 'duplicate')",
        (),
        f"ORDER BY s.start_ns DESC LIMIT {_LIST_LIMIT}",
    )
    return {
        "start_unix_ns": lo,
        "bucket_ns": width,
        "buckets": buckets,
        "series": [
            info[key] | {"key": key, "total": totals[key], "counts": series[key]}
            for key, _ in totals.most_common()
        ],
        "recent": [_refusal_json(span) for span in recent],
    }


def instance_view(
    store: SpanStore, instance: str, limit: int = _LIST_LIMIT
) -> dict[str, Any] | None:
    """One daemon (an edge, a regional, the central): its recent partials and refusals."""
    wanted = instance.strip()
    aggregates = store.spans_where(
        "s.instance = ? AND s.name LIKE '% aggregate'",
        (wanted,),
        f"ORDER BY s.start_ns DESC LIMIT {limit}",
    )
    counts = store.query(
        "SELECT name, COALESCE(outcome, ''), COALESCE(reason, ''), COUNT(*) FROM spans"
        " WHERE instance = ? GROUP BY 1, 2, 3 ORDER BY 4 DESC",
        (wanted,),
    )
    if not aggregates and not counts:
        return None
    service = store.query("SELECT service FROM spans WHERE instance = ? LIMIT 1", (wanted,))
    return {
        "instance": wanted,
        "service": service[0][0] if service else "",
        "counts": [
            {"name": name, "outcome": outcome, "reason": reason, "count": n}
            for name, outcome, reason, n in counts
        ],
        "aggregates": [
            {
                "start_unix_ns": agg.start_unix_ns,
                "partial_id": _attr(agg, ATTR_PARTIAL_ID),
                "input_count": _attr(agg, ATTR_INPUT_COUNT),
                "leaf_count": _attr(agg, ATTR_LEAF_COUNT),
                "flush_reason": _attr(agg, ATTR_FLUSH_REASON),
                "model_version": _attr(agg, ATTR_MODEL_VERSION),
                "duration_ms": _ms(agg.end_unix_ns - agg.start_unix_ns),
            }
            for agg in aggregates
        ],
    }


def overview(store: SpanStore, limit: int = 50) -> dict[str, Any]:
    """The run at a glance: span counts, the newest versions, every daemon, refusal totals."""
    return store.cached(f"overview/{limit}", lambda: _overview(store, limit))


def _overview(store: SpanStore, limit: int) -> dict[str, Any]:
    per_name = dict(store.query("SELECT name, COUNT(*) FROM spans GROUP BY name ORDER BY name"))
    publishes = store.spans_where(
        "s.name = ?", (PUBLISH,), f"ORDER BY s.version DESC LIMIT {limit}"
    )
    services = store.services()
    counted = store.query("SELECT instance, COUNT(*) FROM spans GROUP BY instance")
    instances = sorted(
        (services.get(instance, ""), instance, n)
        for instance, n in counted
        if services.get(instance) != "fedtier-device"
    )
    refused = store.query(
        "SELECT name, outcome, COALESCE(reason, ''), COUNT(*) FROM spans"
        " WHERE outcome IN ('rejected', 'duplicate') GROUP BY 1, 2, 3 ORDER BY 4 DESC"
    )
    versions = []
    aggs = store.parents(publishes)
    for pub in publishes:
        agg = aggs.get(pub.key)
        versions.append(
            {
                "version": _attr(pub, ATTR_MODEL_VERSION),
                "published_unix_ns": pub.start_unix_ns,
                "leaf_count": _attr(agg, ATTR_LEAF_COUNT) if agg is not None else None,
                "input_count": _attr(agg, ATTR_INPUT_COUNT) if agg is not None else None,
                "flush_reason": _attr(agg, ATTR_FLUSH_REASON) if agg is not None else None,
            }
        )
    return {
        "spans": sum(per_name.values()),
        "spans_per_name": per_name,
        "versions": versions,
        "instances": [
            {"service": service, "instance": instance, "spans": n}
            for service, instance, n in instances
        ],
        "refused": [
            {
                "tier": name.split(" ", 1)[0],
                "outcome": outcome,
                "reason": reason,
                "quarantined": _quarantined(name, outcome),
                "count": n,
            }
            for name, outcome, reason, n in refused
        ],
    }


_RECEIVER_OF: Final = {"regional": "edge", "central": "regional"}


def _cut_by(names: set[str]) -> str:
    """The tier that cut a partial, from the names of the spans that carry its id."""
    for name in sorted(names):
        tier, _, action = name.partition(" ")
        if action in ("aggregate", "send"):
            return tier
    for name in sorted(names):
        tier, _, action = name.partition(" ")
        if action == "process" and tier in _RECEIVER_OF:
            return _RECEIVER_OF[tier]
    return "?"


def _prefix_range(prefix: str) -> tuple[str, str]:
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def search(store: SpanStore, query: str, limit: int = 20) -> dict[str, Any]:
    """Hits for ``query``: a version number, an update or partial id prefix, a device, a daemon."""
    q = query.strip().lower()
    hits: list[dict[str, Any]] = []
    if not q:
        return {"query": query, "hits": hits}
    version = _VERSION_RE.fullmatch(q)
    if version is not None and _publish(store, int(version.group(1))) is not None:
        hits.append({"kind": "version", "id": int(version.group(1))})
    if _HEX_RE.fullmatch(q):
        lo, hi = _prefix_range(q)
        rows = store.query(
            "SELECT item_id, GROUP_CONCAT(DISTINCT name) FROM spans"
            " WHERE item_id >= ? AND item_id < ? GROUP BY item_id LIMIT ?",
            (lo, hi, limit),
        )
        for item, joined in rows:
            names = set(joined.split(","))
            is_update = bool(names & {"device send", "edge process"})
            hit: dict[str, Any] = {"kind": "update" if is_update else "partial", "id": item}
            if not is_update:
                hit["tier"] = _cut_by(names)
                if hit["tier"] in ("edge", "regional"):
                    included, ends = follow_partial(item, hit["tier"], store)
                    hit |= {"model_version": included, "ends": ends}
            hits.append(hit)
    lo, hi = _prefix_range(q)
    for (device,) in store.query(
        "SELECT DISTINCT device FROM spans WHERE device >= ? AND device < ? LIMIT ?",
        (lo, hi, limit),
    ):
        hits.append({"kind": "device", "id": device})
    wanted = query.strip()
    for instance, service in sorted(store.services().items()):
        if instance.startswith(wanted) and service != "fedtier-device":
            hits.append({"kind": "instance", "id": instance, "service": service})
    return {"query": query, "hits": hits[: limit * 4]}
