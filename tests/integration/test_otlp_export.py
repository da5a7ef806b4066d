"""`fedtier demo` with an OTLP endpoint: spans reach a plain OTLP/HTTP receiver, files stay.

The receiver here is written in the test on purpose (``http.server`` and the
``opentelemetry.proto`` messages the OTLP exporter depends on), not fedtier's,
so the test shows what any backend (Jaeger, Tempo, a collector) gets. From the
received spans alone it rebuilds one accepted update's chain, following only
parent ids and span links: device send -> edge process -> edge aggregate ->
edge send -> regional process -> regional aggregate -> regional send ->
central process -> central aggregate -> central publish model.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from fedtier.protocol.telemetry import (
    ATTR_INPUT_IDS,
    ATTR_MODEL_VERSION,
    ATTR_OUTCOME,
    ATTR_PARTIAL_ID,
    ATTR_UPDATE_ID,
    MESSAGING_CLIENT_ID,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_BODY_SIZE,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
)

pytestmark = pytest.mark.brokers

_CHAIN = [
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
]


@dataclass(frozen=True)
class _Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]
    service: str


def _value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, field) if field is not None else None


class _Receiver(BaseHTTPRequestHandler):
    """Decodes each ``POST /v1/traces`` body as an ``ExportTraceServiceRequest``."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        spans: list[_Span] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        _Span(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links),
                            service=str(resource.get("service.name", "")),
                        )
                    )
        server: Any = self.server
        with server.lock:
            server.paths.append(self.path)
            server.spans.extend(spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Any]:
    server: Any = HTTPServer(("127.0.0.1", 0), _Receiver)
    server.lock = threading.Lock()
    server.paths = []
    server.spans = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _chain_of(send: _Span, spans: list[_Span]) -> list[_Span] | None:
    """The chain from a device send to its model publication, by parents and links only."""
    by_id = {(s.trace_id, s.span_id): s for s in spans}
    children: dict[tuple[str, str], list[_Span]] = {}
    linked_from: dict[tuple[str, str], list[_Span]] = {}
    for s in spans:
        if s.parent_span_id:
            children.setdefault((s.trace_id, s.parent_span_id), []).append(s)
        for link in s.links:
            linked_from.setdefault(link, []).append(s)

    def child(parent: _Span, name: str) -> _Span | None:
        return next(
            (s for s in children.get((parent.trace_id, parent.span_id), []) if s.name == name),
            None,
        )

    def linker(target: _Span, name: str) -> _Span | None:
        return next(
            (s for s in linked_from.get((target.trace_id, target.span_id), []) if s.name == name),
            None,
        )

    chain = [send]
    for name in _CHAIN[1:]:
        last = chain[-1]
        # An aggregate is a new root linked to its inputs; everything else is a child.
        found = linker(last, name) if name.endswith("aggregate") else child(last, name)
        if found is None:
            return None
        chain.append(found)
    assert all((s.trace_id, s.span_id) in by_id for s in chain)
    return chain


async def test_demo_exports_every_tier_over_otlp_and_keeps_its_files(
    tmp_path: Path, receiver: Any
) -> None:
    out = tmp_path / "demo-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.server_port}"
    command = [
        sys.executable,
        "-m",
        "fedtier",
        "demo",
        # Long enough for a version made during training, not only at shutdown.
        "--duration-s",
        "12",
        "--devices",
        "4",
        "--quiet",
        "--out",
        str(out),
    ]
    # A deadline, not a wait: seven daemons, four devices and two brokers start
    # and stop around the 12 s of training, which takes minutes on a loaded machine.
    with trio.fail_after(300):
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    stdout = done.stdout.decode()
    assert done.returncode == 0, stdout + done.stderr.decode()
    assert f"traces also exported over OTLP/HTTP to {env['OTEL_EXPORTER_OTLP_ENDPOINT']}" in stdout

    # Every process flushed at shutdown, and the demo waits for all of them to exit.
    with receiver.lock:
        spans: list[_Span] = list(receiver.spans)
        paths = set(receiver.paths)
    assert paths == {"/v1/traces"}
    services = {s.service for s in spans}
    assert {"fedtier-device", "fedtier-edge", "fedtier-regional", "fedtier-central"} <= services

    chains = [
        chain
        for send in spans
        if send.name == "device send"
        for chain in [_chain_of(send, spans)]
        if chain is not None
    ]
    assert chains, f"no update's chain could be rebuilt from {len(spans)} received spans"
    chain = chains[0]
    (
        device_send,
        edge_process,
        edge_aggregate,
        edge_send,
        regional_process,
        regional_aggregate,
        _regional_send,
        central_process,
        central_aggregate,
        publish,
    ) = chain
    update_id = device_send.attributes[ATTR_UPDATE_ID]
    # The attributes along the way tell the same story as the structure.
    assert edge_process.attributes[ATTR_UPDATE_ID] == update_id
    assert edge_process.attributes[ATTR_OUTCOME] == "accepted"
    assert update_id in edge_aggregate.attributes[ATTR_INPUT_IDS]
    partial = edge_send.attributes[ATTR_PARTIAL_ID]
    assert regional_process.attributes[ATTR_PARTIAL_ID] == partial
    assert partial in regional_aggregate.attributes[ATTR_INPUT_IDS]
    assert central_process.attributes[ATTR_OUTCOME] == "accepted"
    version = publish.attributes[ATTR_MODEL_VERSION]
    assert central_aggregate.attributes[ATTR_MODEL_VERSION] == version >= 1

    # Messaging semantic conventions: producers and consumers over MQTT and NATS.
    assert device_send.kind == ProtoSpan.SPAN_KIND_PRODUCER
    assert device_send.attributes[MESSAGING_SYSTEM] == "mqtt"
    assert device_send.attributes[MESSAGING_OPERATION_TYPE] == "send"
    assert device_send.attributes[MESSAGING_MESSAGE_ID] == update_id
    assert device_send.attributes[MESSAGING_MESSAGE_BODY_SIZE] > 0
    assert edge_process.kind == ProtoSpan.SPAN_KIND_CONSUMER
    assert edge_process.attributes[MESSAGING_SYSTEM] == "mqtt"
    assert edge_process.attributes[MESSAGING_OPERATION_TYPE] == "process"
    assert (
        edge_process.attributes[MESSAGING_DESTINATION_NAME]
        == device_send.attributes[MESSAGING_DESTINATION_NAME]
    )
    assert edge_process.attributes[MESSAGING_MESSAGE_ID] == update_id
    assert edge_send.kind == ProtoSpan.SPAN_KIND_PRODUCER
    assert edge_send.attributes[MESSAGING_SYSTEM] == "nats"
    assert edge_send.attributes[MESSAGING_MESSAGE_ID] == partial
    assert regional_process.kind == ProtoSpan.SPAN_KIND_CONSUMER
    assert regional_process.attributes[MESSAGING_MESSAGE_ID] == partial
    assert regional_process.attributes[MESSAGING_CLIENT_ID]
    assert publish.kind == ProtoSpan.SPAN_KIND_PRODUCER
    assert publish.attributes[MESSAGING_SYSTEM] == "nats"

    # The lab's own JSON-lines copy is written as well: `fedtier trace` reads it.
    traces = out / "traces"
    for service in ("fedtier-device", "fedtier-edge", "fedtier-regional", "fedtier-central"):
        files = list(traces.glob(f"{service}-*.jsonl"))
        assert files, service
        assert all(f.stat().st_size > 0 for f in files), service
    assert any(update_id in f.read_text() for f in traces.glob("fedtier-edge-*.jsonl"))
