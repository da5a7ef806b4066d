from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision

from fedtier.protocol.errors import ConfigError
from fedtier.protocol.telemetry import (
    ATTR_INPUT_IDS,
    ATTR_OUTCOME,
    ATTR_REASON,
    ATTR_TIER,
    ATTR_UPDATE_ID,
    MESSAGING_CLIENT_ID,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_BODY_SIZE,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    SYSTEM_MQTT,
    SYSTEM_NATS,
    messaging_attributes,
)
from fedtier.protocol.telemetry.metrics import TierMetrics, setup_metrics
from fedtier.protocol.telemetry.tracing import (
    FedtierSampler,
    JsonLinesSpanExporter,
    extract_context,
    inject_headers,
    link_for,
    otlp_requested,
    setup_tracing,
)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever OTEL_* the developer's shell exports must not steer these tests."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    # A provider of the test's own: the global one can be set once per process.
    tp = TracerProvider(shutdown_on_exit=False)
    yield tp
    tp.shutdown()


def _read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- context in headers ---------------------------------------------------------


def test_context_round_trips_through_a_plain_header_dict(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("device send") as sender:
        headers: dict[str, str] = {"content-type": "application/msgpack"}
        inject_headers(headers)
    sent = sender.get_span_context()
    assert headers["traceparent"].startswith(f"00-{sent.trace_id:032x}-{sent.span_id:016x}-")

    # As MQTT user properties / NATS headers would deliver it: a new plain dict.
    received = dict(headers)
    with tracer.start_as_current_span("edge process", context=extract_context(received)) as child:
        pass
    parent = child.parent  # type: ignore[attr-defined]
    assert parent.span_id == sent.span_id
    assert parent.is_remote
    assert child.get_span_context().trace_id == sent.trace_id


def test_tracestate_travels_and_header_case_is_forgiven(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    headers = {
        "Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "TraceState": "vendor=abc",
    }
    ctx = extract_context(headers)
    span_context = trace.get_current_span(ctx).get_span_context()
    assert f"{span_context.span_id:016x}" == "b7ad6b7169203331"
    assert span_context.trace_state.get("vendor") == "abc"
    with tracer.start_as_current_span("x", context=ctx):
        out: dict[str, str] = {}
        inject_headers(out)
    assert out["tracestate"] == "vendor=abc"


def test_explicit_context_is_injected_not_the_current_one(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    stored = tracer.start_span("edge process")
    stored.end()
    with tracer.start_as_current_span("unrelated"):
        headers: dict[str, str] = {}
        inject_headers(headers, context=trace.set_span_in_context(stored))
    assert f"{stored.get_span_context().span_id:016x}" in headers["traceparent"]


def test_propagation_ignores_the_global_propagator(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([]))  # as OTEL_PROPAGATORS=none would
    try:
        with tracer.start_as_current_span("device send"):
            headers: dict[str, str] = {}
            inject_headers(headers)
        assert link_for(extract_context(headers)) is not None
    finally:
        propagate.set_global_textmap(previous)


def test_missing_or_bad_headers_give_a_new_root(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    for headers in ({}, {"traceparent": "garbage"}):
        ctx = extract_context(headers)
        assert link_for(ctx) is None
        with tracer.start_as_current_span("outer"):
            with tracer.start_as_current_span("edge process", context=ctx) as span:
                pass
        assert span.parent is None  # type: ignore[attr-defined]


def test_link_for_points_at_the_span_and_keeps_attributes(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("edge process") as process:
        headers: dict[str, str] = {}
        inject_headers(headers)
    link = link_for(extract_context(headers), {ATTR_UPDATE_ID: "ab" * 16})
    assert link is not None
    assert link.context.span_id == process.get_span_context().span_id
    assert link.attributes == {ATTR_UPDATE_ID: "ab" * 16}


# --- JSON-lines exporter --------------------------------------------------------


def test_jsonl_exporter_writes_spans_with_links_attributes_and_events(
    tmp_path: Path, provider: TracerProvider
) -> None:
    path = tmp_path / "nested" / "edge-e1.jsonl"
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("edge process") as process:
        pass
    ids = ["aa" * 16, "bb" * 16]
    link = link_for(trace.set_span_in_context(process), {"k": 1})
    assert link is not None
    with tracer.start_as_current_span(
        "edge aggregate",
        context=Context(),
        links=[link],
        attributes={ATTR_INPUT_IDS: ids, "ratio": math.nan, "ok": True},
    ) as aggregate:
        aggregate.add_event("flushed", {"inputs": 2})
        with tracer.start_as_current_span("edge send"):
            pass
    provider.shutdown()

    records = {r["name"]: r for r in _read_lines(path)}
    assert set(records) == {"edge process", "edge aggregate", "edge send"}
    agg = records["edge aggregate"]
    assert agg["parent_span_id"] is None
    assert agg["attributes"][ATTR_INPUT_IDS] == ids
    assert agg["attributes"]["ratio"] == "nan"  # JSON has no NaN
    assert agg["attributes"]["ok"] is True
    assert agg["links"] == [
        {
            "trace_id": records["edge process"]["trace_id"],
            "span_id": records["edge process"]["span_id"],
            "attributes": {"k": 1},
        }
    ]
    assert agg["events"][0]["name"] == "flushed"
    assert agg["events"][0]["attributes"] == {"inputs": 2}
    assert agg["end_unix_ns"] >= agg["start_unix_ns"] > 0
    assert agg["status"]["code"] == "UNSET"
    assert agg["kind"] == "INTERNAL"
    assert records["edge send"]["parent_span_id"] == agg["span_id"]
    assert (len(agg["trace_id"]), len(agg["span_id"])) == (32, 16)
    assert "service.name" in agg["resource"]


def test_a_torn_last_line_is_ended_before_new_spans_are_appended(
    tmp_path: Path, provider: TracerProvider
) -> None:
    path = tmp_path / "edge-e1.jsonl"
    path.write_text('{"trace_id": "00", "span_id": "01"}\n{"trace_id": "0af76519')  # killed
    exporter = JsonLinesSpanExporter(path)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("edge process"):
        pass
    provider.shutdown()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"trace_id": "0af76519'
    assert json.loads(lines[2])["name"] == "edge process"
    assert len(lines) == 3


def test_jsonl_exporter_refuses_spans_after_shutdown(
    tmp_path: Path, provider: TracerProvider
) -> None:
    exporter = JsonLinesSpanExporter(tmp_path / "x.jsonl")
    exporter.shutdown()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("late"):
        pass
    assert not (tmp_path / "x.jsonl").exists()


# --- setup_tracing --------------------------------------------------------------


class _OtlpRecorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, int]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append(  # type: ignore[attr-defined]
            (self.path, self.headers["Content-Type"], len(body))
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _OtlpRecorder)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_otlp_is_chosen_when_an_endpoint_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, otlp_server: HTTPServer
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{otlp_server.server_port}")
    with setup_tracing(
        "fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False
    ) as handle:
        assert handle.exporters == ("otlp",)
        assert handle.jsonl_path is None
        with handle.tracer.start_as_current_span("edge process"):
            pass
    # shutdown() flushed synchronously: the collector has the batch already.
    [(path, content_type, size)] = otlp_server.requests  # type: ignore[attr-defined]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert size > 0
    assert not list(tmp_path.iterdir())


def test_traces_endpoint_variable_also_selects_otlp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, otlp_server: HTTPServer
) -> None:
    url = f"http://127.0.0.1:{otlp_server.server_port}/custom/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)
    with setup_tracing("fedtier-central", instance_id="c", jsonl_dir=None, set_global=False) as h:
        with h.tracer.start_as_current_span("central aggregate"):
            pass
    assert [r[0] for r in otlp_server.requests] == ["/custom/traces"]  # type: ignore[attr-defined]


def test_jsonl_is_the_default_with_resource_attributes(tmp_path: Path) -> None:
    with setup_tracing(
        "fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False
    ) as handle:
        assert handle.exporters == ("jsonl",)
        assert handle.jsonl_path == tmp_path / "fedtier-edge-e1.jsonl"
        with handle.tracer.start_as_current_span("edge process"):
            pass
    [record] = _read_lines(tmp_path / "fedtier-edge-e1.jsonl")
    assert record["resource"]["service.name"] == "fedtier-edge"
    assert record["resource"]["service.instance.id"] == "e1"
    assert record["resource"][ATTR_TIER] == "edge"


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({"OTEL_TRACES_EXPORTER": "none"}, ()),
        ({"OTEL_SDK_DISABLED": "true"}, ()),
        (
            {"OTEL_TRACES_EXPORTER": "jsonl", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
            ("jsonl",),
        ),
    ],
)
def test_standard_variables_choose_the_exporters(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    exporters: tuple[str, ...],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False) as h:
        assert h.exporters == exporters
        with h.tracer.start_as_current_span("edge process") as span:
            recording = span.is_recording()
    assert recording == ("OTEL_SDK_DISABLED" not in env)
    assert (tmp_path / "fedtier-edge-e1.jsonl").exists() == bool(exporters)


def test_sampler_variable_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    with setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False) as h:
        with h.tracer.start_as_current_span("edge process") as span:
            assert not span.get_span_context().trace_flags.sampled
    assert not (tmp_path / "fedtier-edge-e1.jsonl").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            "grpc",
        ),
    ],
)
def test_unsupported_configuration_is_one_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False)


def test_names_that_would_escape_the_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="instance id"):
        setup_tracing("fedtier-edge", instance_id="../x", jsonl_dir=tmp_path, set_global=False)


def test_many_simulated_devices_share_one_process_file(tmp_path: Path) -> None:
    with setup_tracing(
        "fedtier-device", instance_id="fleet-1", jsonl_dir=tmp_path, set_global=False
    ) as h:
        for i in range(50):
            with h.tracer.start_as_current_span(
                "device send", attributes={ATTR_UPDATE_ID: f"{i:032x}"}
            ):
                pass
    records = _read_lines(tmp_path / "fedtier-device-fleet-1.jsonl")
    assert len(records) == 50
    assert {r["resource"][ATTR_TIER] for r in records} == {"device"}


# --- messaging semantic conventions -------------------------------------------------


def test_messaging_attributes_use_the_semconv_names() -> None:
    attributes = messaging_attributes(
        SYSTEM_MQTT, "send", "ft/f/s1/updates/d1", message_id="ab", body_size=12, client_id="d1"
    )
    assert attributes == {
        "messaging.system": "mqtt",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "ft/f/s1/updates/d1",
        "messaging.message.id": "ab",
        "messaging.message.body.size": 12,
        "messaging.client.id": "d1",
    }
    # What is not known when the span starts is left out, not set to a placeholder.
    assert messaging_attributes(SYSTEM_NATS, "process", "ft.f.partials.r1") == {
        MESSAGING_SYSTEM: "nats",
        MESSAGING_OPERATION_TYPE: "process",
        MESSAGING_OPERATION_NAME: "process",
        MESSAGING_DESTINATION_NAME: "ft.f.partials.r1",
    }


def test_semconv_names_match_the_opentelemetry_package() -> None:
    from opentelemetry.semconv._incubating.attributes import messaging_attributes as semconv

    assert MESSAGING_SYSTEM == semconv.MESSAGING_SYSTEM
    assert MESSAGING_DESTINATION_NAME == semconv.MESSAGING_DESTINATION_NAME
    assert MESSAGING_OPERATION_TYPE == semconv.MESSAGING_OPERATION_TYPE
    assert MESSAGING_OPERATION_NAME == semconv.MESSAGING_OPERATION_NAME
    assert MESSAGING_MESSAGE_ID == semconv.MESSAGING_MESSAGE_ID
    assert MESSAGING_MESSAGE_BODY_SIZE == semconv.MESSAGING_MESSAGE_BODY_SIZE
    assert MESSAGING_CLIENT_ID == semconv.MESSAGING_CLIENT_ID
    operations = {v.value for v in semconv.MessagingOperationTypeValues}
    assert {"send", "process"} <= operations


# --- sampling -----------------------------------------------------------------------

# A fixed set of trace ids: the ratio check below is deterministic.
_RNG = random.Random(13)
_TRACE_IDS = [_RNG.getrandbits(128) for _ in range(4000)]
_ALWAYS_KEPT = [
    "edge aggregate",
    "edge send",
    "regional process",
    "regional aggregate",
    "regional send",
    "central process",
    "central aggregate",
    "central publish model",
    "central evaluate model",
]


def _decision(sampler: FedtierSampler, name: str, trace_id: int) -> Decision:
    return sampler.should_sample(None, trace_id, name).decision


def _sampled(sampler: FedtierSampler, name: str, trace_id: int) -> bool:
    return _decision(sampler, name, trace_id) is Decision.RECORD_AND_SAMPLE


def test_device_and_edge_agree_on_every_trace_without_talking() -> None:
    # Two instances stand for two processes (the device and the edge).
    device, edge = FedtierSampler(0.25), FedtierSampler(0.25)
    kept = 0
    for trace_id in _TRACE_IDS:
        sent = _sampled(device, "device send", trace_id)
        assert sent == _sampled(edge, "edge process", trace_id)
        # The edge records what it does not export: it may become a rejection.
        assert _decision(edge, "edge process", trace_id) is not Decision.DROP
        kept += sent
    assert 0.22 < kept / len(_TRACE_IDS) < 0.28


def test_a_lower_ratio_only_removes_whole_traces() -> None:
    low, high = FedtierSampler(0.1), FedtierSampler(0.5)
    kept_low = {t for t in _TRACE_IDS if _sampled(low, "device send", t)}
    kept_high = {t for t in _TRACE_IDS if _sampled(high, "device send", t)}
    assert kept_low < kept_high
    none, every = FedtierSampler(0.0), FedtierSampler(1.0)
    assert not any(_sampled(none, "device send", t) for t in _TRACE_IDS)
    assert all(_sampled(every, "device send", t) for t in _TRACE_IDS)


@pytest.mark.parametrize("name", _ALWAYS_KEPT)
def test_aggregates_sends_and_publications_are_always_kept(name: str) -> None:
    never = FedtierSampler(0.0)
    assert all(_decision(never, name, t) is Decision.RECORD_AND_SAMPLE for t in _TRACE_IDS[:200])
    assert _decision(never, "device send", _TRACE_IDS[0]) is Decision.DROP
    assert _decision(never, "edge process", _TRACE_IDS[0]) is Decision.RECORD_ONLY


@pytest.mark.parametrize("arg", ["1.5", "-0.1", "nan", "half"])
def test_a_bad_ratio_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arg: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "fedtier")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
        setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False)


def test_the_fedtier_sampler_exports_rejections_of_unsampled_traces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "fedtier")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    with setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False) as h:
        tracer = h.tracer
        with tracer.start_as_current_span("device send") as send:
            assert not send.is_recording()
        with tracer.start_as_current_span("edge process") as accepted:
            accepted.set_attribute(ATTR_OUTCOME, "accepted")
        with tracer.start_as_current_span("edge process") as rejected:
            # The outcome is known only after the span started, as at the edge.
            rejected.set_attribute(ATTR_OUTCOME, "rejected")
            rejected.set_attribute(ATTR_REASON, "bad_signature")
        with tracer.start_as_current_span("edge aggregate"):
            pass
    records = _read_lines(tmp_path / "fedtier-edge-e1.jsonl")
    assert [(r["name"], r["attributes"].get(ATTR_OUTCOME)) for r in records] == [
        ("edge process", "rejected"),
        ("edge aggregate", None),
    ]
    assert records[0]["attributes"][ATTR_REASON] == "bad_signature"
    assert records[0]["span_id"] == f"{rejected.get_span_context().span_id:016x}"


def test_without_the_fedtier_sampler_the_sdk_sampler_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False) as h:
        assert not isinstance(h.provider.sampler, FedtierSampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "FEDTIER")
    with setup_tracing("fedtier-edge", instance_id="e2", jsonl_dir=tmp_path, set_global=False) as h:
        assert isinstance(h.provider.sampler, FedtierSampler)
        assert h.provider.sampler.ratio == 1.0


# --- exporters of the lab's child processes -----------------------------------------


@pytest.mark.parametrize(
    ("env", "daemons", "device"),
    [
        ({}, "jsonl", None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp,jsonl", "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"}, "otlp,jsonl", "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, "console,otlp,jsonl", "console,otlp"),
        ({"OTEL_TRACES_EXPORTER": "none"}, "jsonl", None),
        ({"OTEL_TRACES_EXPORTER": "jsonl"}, "jsonl", None),
    ],
)
def test_lab_children_export_where_the_user_asks_and_keep_their_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    daemons: str,
    device: str | None,
) -> None:
    from fedtier.simulations.mesh import child_environment, lab_exporters

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    child = child_environment(tmp_path)
    assert child["OTEL_TRACES_EXPORTER"] == daemons
    assert "OTEL_SDK_DISABLED" not in child  # the lab wants its span files
    assert lab_exporters(keep_jsonl=False) == device
    assert otlp_requested() == ("otlp" in daemons)


@pytest.mark.parametrize("otlp", [False, True])
def test_chaos_children_trace_only_when_the_user_asks_for_otlp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, otlp: bool
) -> None:
    from fedtier.simulations.chaos import _run

    if otlp:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    env = _run._chaos_environment(tmp_path)
    if otlp:
        assert "OTEL_SDK_DISABLED" not in env
        assert env["OTEL_TRACES_EXPORTER"] == "otlp,jsonl"
    else:
        # Spans cost CPU in every process and the checker reads device logs instead.
        assert env["OTEL_SDK_DISABLED"] == "true"


def test_a_child_with_otlp_and_jsonl_writes_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, otlp_server: HTTPServer
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{otlp_server.server_port}")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,jsonl")
    with setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=tmp_path, set_global=False) as h:
        assert h.exporters == ("otlp", "jsonl")
        with h.tracer.start_as_current_span("edge aggregate"):
            pass
    assert [r[0] for r in otlp_server.requests] == ["/v1/traces"]  # type: ignore[attr-defined]
    [record] = _read_lines(tmp_path / "fedtier-edge-e1.jsonl")
    assert record["name"] == "edge aggregate"


# --- metrics --------------------------------------------------------------------


def _exercise(m: TierMetrics) -> None:
    m.update_outcome("accepted")
    m.update_outcome("accepted")
    m.update_outcome("rejected", "bad_signature")
    m.update_bytes(40_000)
    m.staleness(2)
    m.anomalous("norm_clipped")
    m.participation(17)
    m.aggregation_duration(0.02)
    m.aggregate_latency(3.5)
    m.buffer_depth(5)
    m.buffer_depth(0)
    m.model_version(12)
    m.retry("publish")
    m.inputs_flushed(24, "count")


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def test_metrics_are_no_ops_without_a_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    _exercise(TierMetrics("edge", "e1", NoOpMeterProvider()))
    _exercise(TierMetrics("edge", "e1"))  # the global proxy: no-op until one is installed
    handle = setup_metrics(prometheus_port=None, set_global=False)
    assert (handle.meter_provider, handle.port) == (None, None)
    handle.shutdown()

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    reader = InMemoryMetricReader()
    disabled = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    _exercise(TierMetrics("edge", "e1", disabled))
    assert _points(reader) == {}
    disabled.shutdown()
    with setup_metrics(prometheus_port=0, set_global=False) as off:
        assert off.port is None


def test_metrics_are_counted_when_enabled() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    _exercise(TierMetrics("edge", "e1", provider))
    TierMetrics("regional", "r1", provider).update_outcome("duplicate")
    points = _points(reader)
    provider.shutdown()

    updates = {
        (p.attributes["tier"], p.attributes["outcome"], p.attributes["reason"]): p.value
        for p in points["fedtier_updates"]
    }
    assert updates == {
        ("edge", "accepted", ""): 2,
        ("edge", "rejected", "bad_signature"): 1,
        ("regional", "duplicate", ""): 1,
    }
    [size] = points["fedtier_update_bytes"]
    assert (size.count, size.sum) == (1, 40_000)
    assert dict(size.attributes) == {"tier": "edge", "fedtier_instance": "e1"}
    assert size.explicit_bounds[0] == 256  # our buckets, not the SDK's 0..10 000
    assert points["fedtier_staleness_versions"][0].sum == 2
    assert points["fedtier_anomalous_updates"][0].attributes["detector"] == "norm_clipped"
    assert points["fedtier_active_devices"][0].value == 17
    assert points["fedtier_aggregation_seconds"][0].sum == pytest.approx(0.02)
    assert points["fedtier_aggregate_latency_seconds"][0].sum == pytest.approx(3.5)
    assert points["fedtier_buffer_inputs"][0].value == 0  # a gauge keeps the last value
    assert points["fedtier_model_version"][0].value == 12
    assert points["fedtier_retries"][0].attributes["operation"] == "publish"
    [flushed] = points["fedtier_flushed_inputs"]
    assert (flushed.value, flushed.attributes["reason"]) == (24, "count")


def test_prometheus_endpoint_serves_the_counters() -> None:
    with setup_metrics(
        prometheus_port=0, service_name="fedtier-edge", instance_id="e1", set_global=False
    ) as handle:
        assert handle.port is not None
        metrics = TierMetrics("edge", "e1", handle.meter_provider)
        metrics.update_outcome("accepted")
        metrics.update_bytes(1000)
        # The socket listens before setup_metrics returns; the timeout is the deadline.
        url = f"http://127.0.0.1:{handle.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    assert (
        'fedtier_updates_total{fedtier_instance="e1",outcome="accepted",reason="",tier="edge"} 1.0'
        in body
    )
    assert "fedtier_update_bytes_bucket" in body
    assert 'service_name="fedtier-edge"' in body  # target_info
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=10)  # closed by shutdown


_GLOBAL_WIRING = """
import json, sys, urllib.request
from pathlib import Path
from opentelemetry import trace
from fedtier.protocol.telemetry.metrics import TierMetrics, setup_metrics
from fedtier.protocol.telemetry.tracing import setup_tracing

out = Path(sys.argv[1])
early = TierMetrics("edge", "e1")  # made before any provider exists
with setup_tracing("fedtier-edge", instance_id="e1", jsonl_dir=out):
    with setup_tracing("fedtier-edge", instance_id="e2", jsonl_dir=out):
        pass  # a second setup keeps the first global provider
    with trace.get_tracer("somelib").start_as_current_span("edge process"):
        pass
    with setup_metrics(prometheus_port=0) as metrics:
        early.update_outcome("accepted")
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
print(json.dumps({"counted": 'outcome="accepted"' in body}))
"""


def test_default_setup_installs_the_global_providers(tmp_path: Path) -> None:
    # In a child process: the global providers can be set once per process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", _GLOBAL_WIRING, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"counted": True}
    assert "already set" in done.stderr
    [record] = _read_lines(tmp_path / "fedtier-edge-e1.jsonl")
    assert (record["name"], record["scope"]) == ("edge process", "somelib")
    assert not (tmp_path / "fedtier-edge-e2.jsonl").exists()  # opened on first span only
