from __future__ import annotations

import json
import math
import os
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

from fedtier.protocol.errors import ConfigError
from fedtier.protocol.telemetry import ATTR_INPUT_IDS, ATTR_TIER, ATTR_UPDATE_ID
from fedtier.protocol.telemetry.metrics import TierMetrics, setup_metrics
from fedtier.protocol.telemetry.tracing import (
    JsonLinesSpanExporter,
    extract_context,
    inject_headers,
    link_for,
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
