"""``fedtier trace collect``'s OTLP/HTTP receiver: protobuf and JSON bodies, errors, round trip.

The round trip runs the tiers' own tracing set-up (``setup_tracing``) with
``OTEL_TRACES_EXPORTER=otlp,jsonl``: the SDK's OTLP exporter posts gzip'd
protobuf to the receiver while the JSON-lines exporter writes the same spans
to files, and both roads must give the explorer the same views.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from fedtier.tiers.explorer import (
    SpanStore,
    collector_server,
    decode_json,
    decode_protobuf,
    device_view,
    refusals_view,
    update_view,
    version_view,
)
from fedtier.tiers.tracequery import iter_span_file
from tests.unit.test_tracequery import U1, U3, U5, VERSION, _build_run


class Collector:
    """A receiver on a free loopback port, serving in a thread."""

    def __init__(self, store: SpanStore) -> None:
        self.store = store
        self.server = collector_server(store, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def post(
        self,
        body: bytes,
        content_type: str,
        *,
        encoding: str | None = None,
        path: str = "/v1/traces",
    ) -> tuple[int, str, bytes]:
        headers = {"Content-Type": content_type}
        if encoding:
            headers["Content-Encoding"] = encoding
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.headers["Content-Type"], reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def collector() -> Iterator[Collector]:
    with SpanStore() as store:
        running = Collector(store)
        try:
            yield running
        finally:
            running.close()


@pytest.fixture(scope="module")
def both_roads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SpanStore, SpanStore]]:
    """The same run recorded by the OTLP exporter (into a collector) and into JSON lines."""
    run = tmp_path_factory.mktemp("run")
    with SpanStore() as collected, SpanStore() as from_files:
        receiver = Collector(collected)
        try:
            with pytest.MonkeyPatch.context() as mp:
                for name in list(os.environ):
                    if name.startswith("OTEL_"):
                        mp.delenv(name)
                mp.setenv("OTEL_TRACES_EXPORTER", "otlp,jsonl")
                mp.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
                mp.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
                _build_run(run)  # each daemon's shutdown flushes both exporters
        finally:
            receiver.close()
        from_files.load_dir(run)
        yield collected, from_files


def _protobuf_body(store: SpanStore) -> bytes:
    """An export request holding every span of ``store`` (built with the proto classes)."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def value(v: Any) -> AnyValue:
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, int):
            return AnyValue(int_value=v)
        if isinstance(v, float):
            return AnyValue(double_value=v)
        if isinstance(v, list):
            out = AnyValue()
            out.array_value.values.extend(value(x) for x in v)
            return out
        return AnyValue(string_value=str(v))

    def kvs(attrs: dict[str, Any]) -> list[KeyValue]:
        return [KeyValue(key=k, value=value(v)) for k, v in attrs.items()]

    request = ExportTraceServiceRequest()
    for span in store.spans_where("1", ()):
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(kvs(dict(span.resource)))
        out = rs.scope_spans.add().spans.add()
        out.trace_id = bytes.fromhex(span.trace_id)
        out.span_id = bytes.fromhex(span.span_id)
        if span.parent_span_id:
            out.parent_span_id = bytes.fromhex(span.parent_span_id)
        out.name = span.name
        out.start_time_unix_nano = span.start_unix_ns
        out.end_time_unix_nano = span.end_unix_ns
        out.attributes.extend(kvs(dict(span.attributes)))
        for link in span.links:
            added = out.links.add()
            added.trace_id = bytes.fromhex(link.trace_id)
            added.span_id = bytes.fromhex(link.span_id)
    return bytes(request.SerializeToString())


def _otlp_json(body: bytes) -> bytes:
    """The OTLP/JSON form of a protobuf export: proto3 JSON, but ids in hex, not base64."""
    obj = MessageToDict(ExportTraceServiceRequest.FromString(body))

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (
                    base64.b64decode(v).hex()
                    if k in ("traceId", "spanId", "parentSpanId")
                    else fix(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [fix(x) for x in node]
        return node

    return json.dumps(fix(obj)).encode()


def test_the_sdk_exporter_and_the_json_lines_files_give_the_same_views(
    both_roads: tuple[SpanStore, SpanStore],
) -> None:
    collected, from_files = both_roads
    assert collected.count() == from_files.count() > 10
    for uid in (U1, U3, U5):
        assert update_view(collected, uid) == update_view(from_files, uid), uid
    view = version_view(collected, VERSION)
    assert view == version_view(from_files, VERSION)
    assert view is not None
    assert U1 in {u["update_id"] for u in view["updates"]}
    assert refusals_view(collected) == refusals_view(from_files)
    path = update_view(collected, U1)
    assert path is not None
    assert path["model_version"] == VERSION
    assert device_view(collected, "nobody") is None


def test_decoded_spans_equal_the_json_lines_records(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("OTEL_"):
                mp.delenv(name)
        _build_run(tmp_path)
    with SpanStore() as store:
        store.load_dir(tmp_path)
        body = _protobuf_body(store)
    from_files = sorted(
        (r for p in tmp_path.glob("*.jsonl") for r in iter_span_file(p) if r is not None),
        key=lambda r: r.key,
    )
    assert sorted(decode_protobuf(body), key=lambda r: r.key) == from_files
    assert sorted(decode_json(_otlp_json(body)), key=lambda r: r.key) == from_files


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_protobuf_and_json_bodies_are_stored(
    collector: Collector, both_roads: tuple[SpanStore, SpanStore], encoding: str | None
) -> None:
    body = _protobuf_body(both_roads[1])
    wire = gzip.compress(body) if encoding else body
    status, kind, reply = collector.post(wire, "application/x-protobuf", encoding=encoding)
    assert (status, kind, reply) == (200, "application/x-protobuf", b"")
    assert collector.store.count() == both_roads[1].count()
    # The same spans again, as JSON: nothing new, and a JSON reply.
    json_body = _otlp_json(body)
    wire = gzip.compress(json_body) if encoding else json_body
    status, kind, reply = collector.post(wire, "application/json", encoding=encoding)
    assert (status, kind, json.loads(reply)) == (200, "application/json", {})
    assert collector.store.count() == both_roads[1].count()
    assert version_view(collector.store, VERSION) == version_view(both_roads[1], VERSION)


@pytest.mark.parametrize(
    ("body", "content_type", "encoding", "status"),
    [
        (b"\xff\xff\xff\xff", "application/x-protobuf", None, 400),
        (b"{not json", "application/json", None, 400),
        (b'{"resourceSpans": 3}', "application/json", None, 400),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            "application/json",
            None,
            400,
        ),
        (b"plain gzip? no", "application/x-protobuf", "gzip", 400),
        (b"{}", "application/json", "br", 400),
        (b"{}", "text/plain", None, 415),
    ],
)
def test_bad_bodies_are_refused_with_the_otlp_status(
    collector: Collector, body: bytes, content_type: str, encoding: str | None, status: int
) -> None:
    got, kind, reply = collector.post(body, content_type, encoding=encoding)
    assert got == status
    if content_type == "application/json" or status == 415:
        assert json.loads(reply)["code"] == 3
        assert json.loads(reply)["message"]
    else:
        # google.rpc.Status in protobuf: field 1 (code) = 3, then the message.
        assert kind == "application/x-protobuf"
        assert reply[:2] == b"\x08\x03"
    assert collector.store.count() == 0


def test_an_empty_export_is_fine_and_other_paths_are_not(collector: Collector) -> None:
    assert collector.post(b"", "application/x-protobuf")[0] == 200
    assert collector.post(b"{}", "application/json")[0] == 200
    assert collector.post(b"{}", "application/json", path="/v1/metrics")[0] == 404
    assert collector.store.count() == 0


def _started(command: list[str], pattern: str) -> tuple[subprocess.Popen[str], str]:
    """A ``fedtier`` command that prints where it listens, and that URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fedtier", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # its first line says where it listens, or why not
    found = re.search(pattern, line)
    if found is None:
        process.kill()
        process.wait()
        process.stdout.close()
        pytest.fail(f"{command}: {line}")
    return process, found.group(1)


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    assert process.wait(timeout=10) == 0  # SIGTERM: a clean stop
    if process.stdout is not None:
        process.stdout.close()


def test_trace_serve_shows_what_trace_collect_stores_meanwhile(
    tmp_path: Path, both_roads: tuple[SpanStore, SpanStore]
) -> None:
    db = tmp_path / "spans.sqlite"
    collect, collect_url = _started(
        ["trace", "collect", "--db", str(db), "--listen", "127.0.0.1:0"],
        r"on (http://\S+)/v1/traces",
    )
    try:
        serve, url = _started(
            ["trace", "serve", "--db", str(db), "--listen", "127.0.0.1:0"], r"explorer on (\S+)/"
        )
        try:
            assert _status(f"{url}/api/update/{U1}") == 404  # nothing collected yet
            request = urllib.request.Request(
                collect_url + "/v1/traces",
                data=gzip.compress(_protobuf_body(both_roads[1])),
                headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
            )
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert reply.status == 200
            # The next request of the running explorer sees the new spans.
            with urllib.request.urlopen(f"{url}/api/update/{U1}", timeout=10) as reply:
                shown = json.loads(reply.read())
            with urllib.request.urlopen(f"{url}/api/overview", timeout=10) as reply:
                assert json.loads(reply.read())["spans"] == both_roads[1].count()
        finally:
            _stop(serve)
    finally:
        _stop(collect)
    assert shown == json.loads(json.dumps(update_view(both_roads[1], U1)))
    assert shown["model_version"] == VERSION


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
