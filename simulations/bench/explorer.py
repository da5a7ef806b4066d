"""Benchmark: the trace explorer over a synthetic 10,000-device day of spans; imports any.

``synthetic_spans`` writes the spans a mesh would export in a day, in the exact
shapes of the real ones (``protocol.telemetry.tracing.span_to_json``: the same
names, attributes, parents, links and resources): every device sends updates
through its edge, edges cut partials by count, regionals fold edge partials,
the central folds regional partials into model versions. A small share of
updates is rejected (with the reasons an edge gives), redelivered (a
duplicate) or late, and a few partials are quarantined.

``run_explorer_bench`` loads them into a ``SpanStore`` file (timed), starts the
explorer's HTTP server on loopback, and times every page's API call and the
page shell as a browser would fetch them: the first (cold) request, then the
median and max of ``repeats`` more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fedtier.protocol.telemetry import SYSTEM_MQTT, SYSTEM_NATS, messaging_attributes
from fedtier.tiers.explorer import SpanStore, explorer_server
from fedtier.tiers.tracequery import SpanRecord

__all__ = ["DayShape", "main", "run_explorer_bench", "synthetic_spans"]

_B32: Final = "abcdefghijklmnopqrstuvwxyz234567"
_SDK: Final = {
    "telemetry.sdk.language": "python",
    "telemetry.sdk.name": "opentelemetry",
    "telemetry.sdk.version": "1.45.2",
}
_EDGE_REJECTIONS: Final = (
    ("stale", 0.5),
    ("rate_limited", 0.2),
    ("bad_signature", 0.1),
    ("norm_exceeded", 0.1),
    ("malformed", 0.05),
    ("too_large", 0.05),
)
_DAY_NS: Final = 86_400 * 10**9
_FLEET: Final = "demo"


@dataclass(frozen=True)
class DayShape:
    """How big the synthetic day is and how its mesh cuts partials."""

    devices: int = 10_000
    updates_per_device: int = 24
    edges: int = 40
    regionals: int = 4
    edge_flush: int = 16
    regional_flush: int = 5
    central_flush: int = 4
    reject_share: float = 0.01
    duplicate_share: float = 0.005
    late_share: float = 0.01
    quarantine_share: float = 0.002
    seed: int = 0
    start_unix_ns: int = 1_796_256_000 * 10**9


@dataclass
class _Buffer:
    """An open epoch at one tier: the inputs' ids and their process spans' keys."""

    ids: list[str] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)


class _Day:
    """State of the generator while it walks the day in time order."""

    def __init__(self, shape: DayShape) -> None:
        self.shape = shape
        self.rng = random.Random(shape.seed)  # noqa: S311 - synthetic data, not secrets
        self.version = 0
        self.edge_ids = [self.key() for _ in range(shape.edges)]
        self.regional_ids = [self.key() for _ in range(shape.regionals)]
        self.central_id = self.key()
        self.edge_buf = [_Buffer() for _ in range(shape.edges)]
        self.regional_buf = [_Buffer() for _ in range(shape.regionals)]
        self.central_buf = _Buffer()

    def key(self) -> str:
        return "".join(self.rng.choice(_B32) for _ in range(24))

    def hex(self, bits: int) -> str:
        return f"{self.rng.getrandbits(bits):0{bits // 4}x}"

    def ms(self, low: float, high: float) -> int:
        return int(self.rng.uniform(low, high) * 1e6)


def _resource(service: str, instance: str, tier: str) -> dict[str, Any]:
    return {**_SDK, "service.instance.id": instance, "service.name": service, "fedtier.tier": tier}


def _span(
    name: str,
    trace_id: str,
    span_id: str,
    parent: str | None,
    start: int,
    end: int,
    attributes: dict[str, Any],
    resource: dict[str, Any],
    *,
    kind: str = "INTERNAL",
    links: list[dict[str, Any]] | None = None,
    scope: str = "fedtier",
) -> dict[str, Any]:
    """One span in ``span_to_json``'s shape."""
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": parent,
        "parent_is_remote": parent is not None and not name.endswith("send"),
        "name": name,
        "kind": kind,
        "start_unix_ns": start,
        "end_unix_ns": end,
        "status": {"code": "UNSET", "description": None},
        "attributes": attributes,
        "events": [],
        "links": links or [],
        "dropped": {"attributes": 0, "events": 0, "links": 0},
        "scope": scope,
        "resource": resource,
    }


def synthetic_spans(shape: DayShape) -> Iterator[dict[str, Any]]:
    """A day of spans of a mesh of ``shape``, in the JSON-lines exporter's shapes."""
    day = _Day(shape)
    rng = day.rng
    devices = [day.key() for _ in range(shape.devices)]
    sends = sorted(
        (shape.start_unix_ns + rng.randrange(_DAY_NS), d)
        for d in range(shape.devices)
        for _ in range(shape.updates_per_device)
    )
    central_res = _resource("fedtier-central", day.central_id, "central")
    yield _span(
        "central publish model", day.hex(128), day.hex(64), None,
        shape.start_unix_ns - 10**9, shape.start_unix_ns - 10**9 + day.ms(5, 20),
        {"fedtier.model_version": 0}, central_res,
    )  # fmt: skip
    for t, d in sends:
        edge = d % shape.edges
        fleet = f"fleet-{edge}"
        uid = day.hex(128)
        trace = day.hex(128)
        send_id = day.hex(64)
        base = max(0, day.version - (1 if rng.random() < 0.2 else 0))
        topic = f"ft/{_FLEET}/site-{edge}/up/{devices[d]}"
        size = rng.randrange(20_000, 60_000)
        yield _span(
            "device send", trace, send_id, None, t, t + day.ms(2, 30),
            {"fedtier.update_id": uid, "fedtier.device": devices[d], "fedtier.tier": "device",
             "fedtier.model_version": base,
             **messaging_attributes(SYSTEM_MQTT, "send", topic, message_id=uid, body_size=size,
                                    client_id=devices[d])},
            _resource("fedtier-device", fleet, "device"), kind="PRODUCER", scope="fedtier.device",
        )  # fmt: skip
        edge_res = _resource("fedtier-edge", day.edge_ids[edge], "edge")
        t += day.ms(2, 60)
        attrs: dict[str, Any] = {
            **messaging_attributes(
                SYSTEM_MQTT, "process", topic, body_size=size, client_id=day.edge_ids[edge]
            ),
            "fedtier.update_id": uid,
            "messaging.message.id": uid,
            "fedtier.device": devices[d],
            "fedtier.staleness": day.version - base,
        }
        roll = rng.random()
        if roll < shape.reject_share:
            reason = rng.choices(
                [r for r, _ in _EDGE_REJECTIONS], [w for _, w in _EDGE_REJECTIONS]
            )[0]
            attrs |= {"fedtier.outcome": "rejected", "fedtier.reason": reason}
            yield _span("edge process", trace, day.hex(64), send_id, t, t + day.ms(1, 5),
                        attrs, edge_res, kind="CONSUMER")  # fmt: skip
            continue
        process_id = day.hex(64)
        yield _span("edge process", trace, process_id, send_id, t, t + day.ms(1, 8),
                    attrs | {"fedtier.outcome": "accepted"}, edge_res,
                    kind="CONSUMER")  # fmt: skip
        if roll < shape.reject_share + shape.duplicate_share:
            # The device did not see its receipt and sent again: the edge says duplicate.
            t2 = t + day.ms(500, 5000)
            yield _span("edge process", trace, day.hex(64), send_id, t2, t2 + day.ms(1, 3),
                        attrs | {"fedtier.outcome": "duplicate"}, edge_res,
                        kind="CONSUMER")  # fmt: skip
        buf = day.edge_buf[edge]
        buf.ids.append(uid)
        buf.links.append({"trace_id": trace, "span_id": process_id, "attributes": {}})
        if len(buf.ids) >= shape.edge_flush:
            yield from _cut_edge(day, edge, t + day.ms(1, 30))


def _cut(
    day: _Day, tier: str, instance: str, buf: _Buffer, t: int, leaves: int, subject: str
) -> tuple[list[dict[str, Any]], str, str, str, int]:
    """An aggregate and its send span; returns them, the partial id, trace, send id, time."""
    res = _resource(f"fedtier-{tier}", instance, tier)
    trace = day.hex(128)
    agg_id = day.hex(64)
    pid = day.hex(128)
    end = t + day.ms(2, 30)
    agg = _span(
        f"{tier} aggregate", trace, agg_id, None, t, end,
        {"fedtier.input_ids": list(buf.ids), "fedtier.input_count": len(buf.ids),
         "fedtier.leaf_count": leaves, "fedtier.flush_reason": "count",
         "fedtier.model_version": day.version, "fedtier.partial_id": pid},
        res, links=list(buf.links),
    )  # fmt: skip
    send_id = day.hex(64)
    t = end + day.ms(5, 60)
    size = day.rng.randrange(60_000, 120_000)
    send = _span(f"{tier} send", trace, send_id, agg_id, t, t + day.ms(3, 40),
                 {"fedtier.partial_id": pid,
                  **messaging_attributes(SYSTEM_NATS, "send", subject, message_id=pid,
                                         body_size=size)},
                 res, kind="PRODUCER")  # fmt: skip
    buf.ids.clear()
    buf.links.clear()
    return [agg, send], pid, trace, send_id, t


def _receive(
    day: _Day, tier: str, instance: str, sender: str, pid: str, send: dict[str, Any], t: int
) -> tuple[dict[str, Any], bool]:
    """A partial's process span at ``tier``, a child of its ``send``; whether it was accepted."""
    shape = day.shape
    sent = send["attributes"]
    attrs: dict[str, Any] = {
        **messaging_attributes(
            SYSTEM_NATS,
            "process",
            sent["messaging.destination.name"],
            body_size=sent["messaging.message.body.size"],
            client_id=instance,
        ),
        "messaging.message.id": pid,
        "fedtier.partial_id": pid,
        "fedtier.sender": sender,
        "fedtier.staleness": 0,
    }
    roll = day.rng.random()
    accepted = True
    if roll < shape.quarantine_share:
        attrs |= {"fedtier.outcome": "rejected", "fedtier.reason": "inconsistent_partial"}
        accepted = False
    else:
        attrs["fedtier.outcome"] = "accepted"
        if roll < shape.quarantine_share + shape.late_share:
            attrs |= {"fedtier.staleness": 3, "fedtier.late": True}
    span = _span(
        f"{tier} process", send["trace_id"], day.hex(64), send["span_id"], t, t + day.ms(1, 30),
        attrs, _resource(f"fedtier-{tier}", instance, tier), kind="CONSUMER",
    )  # fmt: skip
    return span, accepted


def _cut_edge(day: _Day, edge: int, t: int) -> Iterator[dict[str, Any]]:
    shape = day.shape
    buf = day.edge_buf[edge]
    leaves = len(buf.ids)
    region = edge % shape.regionals
    regional = day.regional_ids[region]
    to_region = f"ft.{_FLEET}.up.region.region-{region}"
    spans, pid, trace, _, t = _cut(day, "edge", day.edge_ids[edge], buf, t, leaves, to_region)
    yield from spans
    process, accepted = _receive(
        day, "regional", regional, day.edge_ids[edge], pid, spans[1], t + day.ms(2, 40)
    )
    yield process
    if not accepted:
        return
    rbuf = day.regional_buf[region]
    rbuf.ids.append(pid)
    rbuf.links.append({"trace_id": trace, "span_id": process["span_id"], "attributes": {}})
    if len(rbuf.ids) < shape.regional_flush:
        return
    t = process["end_unix_ns"] + day.ms(1, 50)
    spans, rpid, rtrace, _, t = _cut(
        day, "regional", regional, rbuf, t, leaves * shape.regional_flush, f"ft.{_FLEET}.up.central"
    )
    yield from spans
    process, accepted = _receive(
        day, "central", day.central_id, regional, rpid, spans[1], t + day.ms(2, 40)
    )
    yield process
    if not accepted:
        return
    cbuf = day.central_buf
    cbuf.ids.append(rpid)
    cbuf.links.append({"trace_id": rtrace, "span_id": process["span_id"], "attributes": {}})
    if len(cbuf.ids) < shape.central_flush:
        return
    day.version += 1
    res = _resource("fedtier-central", day.central_id, "central")
    trace = day.hex(128)
    agg_id = day.hex(64)
    t = process["end_unix_ns"] + day.ms(1, 50)
    end = t + day.ms(5, 80)
    yield _span(
        "central aggregate", trace, agg_id, None, t, end,
        {"fedtier.input_ids": list(cbuf.ids), "fedtier.input_count": len(cbuf.ids),
         "fedtier.leaf_count": leaves * shape.regional_flush * len(cbuf.ids),
         "fedtier.flush_reason": "count", "fedtier.model_version": day.version},
        res, links=list(cbuf.links),
    )  # fmt: skip
    t = end + day.ms(5, 40)
    end = t + day.ms(10, 150)
    yield _span(
        "central publish model", trace, day.hex(64), agg_id, t, end,
        {"fedtier.model_version": day.version,
         **messaging_attributes(SYSTEM_NATS, "send", f"ft.{_FLEET}.model.announce",
                                message_id=f"{_FLEET}-model-v{day.version}",
                                body_size=day.rng.randrange(250, 350), client_id=day.central_id)},
        res, kind="PRODUCER",
    )  # fmt: skip
    t = end + day.ms(20, 400)
    yield _span(
        "central evaluate model", trace, day.hex(64), agg_id, t, t + day.ms(50, 400),
        {"fedtier.model_version": day.version,
         "fedtier.metric.accuracy": round(0.5 + 0.45 * (1 - 1 / (1 + day.version / 50)), 4)},
        res,
    )  # fmt: skip
    cbuf.ids.clear()
    cbuf.links.clear()


def _time_get(url: str, repeats: int) -> dict[str, float | int]:
    times = []
    size = 0
    for _ in range(repeats):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as reply:  # noqa: S310 - loopback http
            size = len(reply.read())
        times.append((time.perf_counter() - started) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
        "bytes": size,
    }


def run_explorer_bench(
    shape: DayShape, *, repeats: int = 5, workdir: Path | None = None, jsonl: Path | None = None
) -> dict[str, Any]:
    """Generate a day of spans, load them into a span database, time every view's API.

    Args:
        shape: the synthetic day.
        repeats: timed requests per URL (after one untimed warm-up).
        workdir: where the database goes (a temporary directory when None).
        jsonl: also write the spans there as one JSON-lines file.
    """
    with tempfile.TemporaryDirectory(prefix="fedtier-explorer-bench-") as scratch:
        db = (workdir or Path(scratch)) / "spans.sqlite"
        db.unlink(missing_ok=True)
        json_bytes = 0
        count = 0
        sample: dict[str, Any] = {}
        started = time.perf_counter()
        out = jsonl.open("w") if jsonl is not None else None
        with SpanStore(db) as store:
            batch: list[SpanRecord] = []
            for obj in synthetic_spans(shape):
                line = json.dumps(obj)
                json_bytes += len(line) + 1
                if out is not None:
                    out.write(line + "\n")
                count += 1
                if obj["name"] == "edge process" and obj["attributes"]["fedtier.outcome"] == (
                    "accepted"
                ):
                    sample["update"] = obj["attributes"]["fedtier.update_id"]
                    sample["device"] = obj["attributes"]["fedtier.device"]
                    sample["edge"] = obj["resource"]["service.instance.id"]
                batch.append(SpanRecord.from_json(obj))
                if len(batch) >= 20_000:
                    store.add(batch)
                    batch.clear()
            store.add(batch)
            load_s = time.perf_counter() - started
            if out is not None:
                out.close()
            versions = store.query(
                "SELECT MAX(version) FROM spans WHERE name = 'central publish model'"
            )[0][0]
            # An update that made it into a version: one cut well before the day ends.
            early = store.query(
                "SELECT item_id, device, instance FROM spans WHERE name = 'edge process'"
                " AND outcome = 'accepted' ORDER BY start_ns LIMIT 1 OFFSET ?",
                (count // 4,),
            )
            if early:
                sample["update"], sample["device"], sample["edge"] = early[0]
            server = explorer_server(store)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                base = f"http://127.0.0.1:{server.server_address[1]}"
                urls = {
                    "page shell (index.html)": "/version/1",
                    "page script (app.js)": "/static/app.js",
                    "overview": "/api/overview",
                    "version": f"/api/version/{versions // 2}",
                    "update": f"/api/update/{sample['update']}",
                    "device": f"/api/device/{sample['device']}",
                    "instance (edge)": f"/api/instance/{sample['edge']}",
                    "refusals": "/api/refusals",
                    "search (update prefix)": f"/api/search?q={sample['update'][:8]}",
                    "search (device prefix)": f"/api/search?q={sample['device'][:6]}",
                }
                timings: dict[str, dict[str, Any]] = {}
                for label, path in urls.items():
                    # The first request is the cold one: sqlite's pages not yet
                    # cached, and the overview and refusals not yet memoised.
                    first = _time_get(base + path, 1)["median_ms"]
                    timings[label] = _time_get(base + path, repeats) | {
                        "first_ms": first,
                        "path": path,
                    }
            finally:
                server.shutdown()
                server.server_close()
                thread.join()
        db_bytes = db.stat().st_size + sum(
            p.stat().st_size for p in db.parent.glob(db.name + "-*") if p.is_file()
        )
    return {
        "shape": shape.__dict__,
        "spans": count,
        "json_lines_bytes": json_bytes,
        "sqlite_bytes": db_bytes,
        "model_versions": versions,
        "load_s": round(load_s, 1),
        "load_spans_per_s": round(count / load_s),
        "repeats": repeats,
        "timings": timings,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its result as JSON; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="fedtier bench explorer",
        description="Time the trace explorer over a synthetic day of spans; print JSON.",
    )
    parser.add_argument("--devices", type=int, default=DayShape.devices, help="devices")
    parser.add_argument(
        "--updates-per-device", type=int, default=DayShape.updates_per_device, help="in the day"
    )
    parser.add_argument("--edges", type=int, default=DayShape.edges, help="edges")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per URL")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic day")
    parser.add_argument("--workdir", type=Path, help="keep the span database here")
    parser.add_argument("--jsonl", type=Path, help="also write the spans to this file")
    args = parser.parse_args(argv)
    if min(args.devices, args.updates_per_device, args.edges, args.repeats) < 1:
        parser.error("--devices, --updates-per-device, --edges and --repeats must be >= 1")
    shape = DayShape(
        devices=args.devices,
        updates_per_device=args.updates_per_device,
        edges=args.edges,
        regionals=max(1, min(DayShape.regionals, args.edges)),
        seed=args.seed,
    )
    print(
        json.dumps(
            run_explorer_bench(shape, repeats=args.repeats, workdir=args.workdir, jsonl=args.jsonl),
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
