"""Tracer setup, span exporters and W3C context in headers; never imports trio, a bus or a tier.

Uses the OpenTelemetry API and SDK and the standard library (the OTLP exporter
lazily, when asked for), so any process (device, daemon, simulator) can use it.

Exporter choice follows the standard ``OTEL_*`` variables (read once, in
``setup_tracing``):

* ``OTEL_SDK_DISABLED=true``: the tracer is a no-op and nothing is written.
* ``OTEL_TRACES_EXPORTER``: a comma-separated list of ``otlp``, ``console``,
  ``none`` and the fedtier extension ``jsonl``. Unset, it means ``otlp`` when
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set,
  else ``jsonl`` (when a directory was given).
* OTLP is OTLP/HTTP with protobuf; its endpoint, headers, timeout and
  compression come from the exporter's own ``OTEL_EXPORTER_OTLP_*`` variables.
* ``OTEL_TRACES_SAMPLER=fedtier`` chooses :class:`FedtierSampler`: device
  sends (and the edge spans of their traces) kept at the ratio
  ``OTEL_TRACES_SAMPLER_ARG`` (1.0 when unset), every aggregate, partial,
  publication and rejection kept. Any other sampler name, ``OTEL_BSP_*``,
  ``OTEL_SPAN_*_LIMIT`` and ``OTEL_RESOURCE_ATTRIBUTES`` are applied by the SDK.

Every exporter sits behind a ``BatchSpanProcessor``: ending a span only appends
it to a bounded in-memory queue (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048 by default)
that a background thread drains. When the queue is full the SDK drops the
*oldest* queued span and logs "Queue full, dropping Span"; the caller never
blocks, so tracing never applies backpressure to aggregation. Provenance does
not depend on it: every aggregate carries its lineage manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    TraceFlags,
    format_span_id,
    format_trace_id,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from fedtier.protocol.errors import ConfigError
from fedtier.protocol.telemetry import ATTR_OUTCOME, ATTR_TIER, OUTCOME_REJECTED, span_name

__all__ = [
    "DEVICE_ORIGIN_SPANS",
    "SAMPLER_NAME",
    "TRACER_NAME",
    "FedtierSampler",
    "JsonLinesSpanExporter",
    "TracingHandle",
    "extract_context",
    "inject_headers",
    "link_for",
    "otlp_requested",
    "requested_exporters",
    "setup_tracing",
    "span_to_json",
]

_logger = logging.getLogger(__name__)

TRACER_NAME: Final = "fedtier"
_TIERS: Final = ("device", "edge", "regional", "central")
# A local file write is cheap, and `fedtier trace` run during a demo should see
# spans within a second rather than the SDK's default five.
_JSONL_SCHEDULE_DELAY_MILLIS: Final = 1000

# Our own instance, not the global propagator: OTEL_PROPAGATORS may name b3 or
# nothing at all, but the wire contract says W3C traceparent/tracestate.
_PROPAGATOR: Final = TraceContextTextMapPropagator()

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


# --- context in headers -------------------------------------------------------------


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads headers exactly, then case-insensitively.

    MQTT user properties keep their case but a NATS or HTTP hop on the way may
    have canonicalised ``traceparent`` to ``Traceparent``.
    """

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            folded = key.casefold()
            value = next((v for k, v in carrier.items() if k.casefold() == folded), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER: Final = _HeaderGetter()


def inject_headers(headers: dict[str, str], context: Context | None = None) -> None:
    """Write ``traceparent`` (and ``tracestate`` when non-empty) into ``headers``.

    Args:
        headers: the MQTT v5 user properties or NATS headers about to be sent.
        context: the context whose span is the parent of the receiver's span;
            the current context when ``None``. Nothing is written when it holds
            no valid span (tracing disabled or unsampled-and-invalid).
    """
    _PROPAGATOR.inject(headers, context=context)


def extract_context(headers: Mapping[str, str]) -> Context:
    """The context carried by received headers, starting from an empty context.

    The result never inherits the receiver's current span, so a span started
    with it is a child of the remote sender or, when the headers carry no valid
    ``traceparent``, a new root.
    """
    return _PROPAGATOR.extract(headers, context=Context(), getter=_GETTER)


def link_for(context: Context, attributes: Attributes = None) -> Link | None:
    """A span link to the span held by ``context``, or ``None`` when it holds none.

    Daemons keep the context of each buffered input's ``process`` span (as
    headers from ``inject_headers``, so it survives a restart) and pass the links
    to the ``aggregate`` span; the SDK keeps at most ``OTEL_SPAN_LINK_COUNT_LIMIT``
    of them, and ``fedtier.input_ids`` lists every input regardless.
    """
    span_context = trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return None
    return Link(span_context, attributes)


# --- sampling -----------------------------------------------------------------------

SAMPLER_NAME: Final = "fedtier"
"""The ``OTEL_TRACES_SAMPLER`` value that chooses :class:`FedtierSampler`."""

DEVICE_ORIGIN_SPANS: Final = frozenset({span_name("device", "send"), span_name("edge", "process")})
"""The spans sampled by ratio: one of each per device update, so they are the volume.

Every other fedtier span (aggregates, partial sends, regional and central
processing, model publication and evaluation) is one per partial or version
and always kept.
"""

_TRACE_ID_LOW_BITS: Final = (1 << 64) - 1


class FedtierSampler(Sampler):
    """Keeps device-origin spans by trace-id ratio and every other span always.

    The decision for a device-origin span is a pure function of its trace id
    (the low 64 bits against ``ratio * 2**64``, as the SDK's ``TraceIdRatioBased``),
    so the device that sends an update and the edge that processes it agree
    without talking, and lowering the ratio only ever removes whole traces.

    An edge ``process`` span that is not sampled is still *recorded* (not
    exported): it may turn into a rejection after it started, and
    ``setup_tracing``'s processors export a recorded span whose
    ``fedtier.outcome`` is ``rejected`` whatever the sampling said. A device
    ``send`` span that is not sampled is dropped outright.

    Args:
        ratio: the fraction of device updates whose device and edge spans are kept,
            in ``[0, 1]``.

    Raises:
        ConfigError: ``ratio`` outside ``[0, 1]`` or not a number.
    """

    def __init__(self, ratio: float = 1.0) -> None:
        if not 0.0 <= ratio <= 1.0:  # also refuses NaN
            raise ConfigError(
                f"the fedtier sampler's ratio is {ratio!r}; "
                "set OTEL_TRACES_SAMPLER_ARG to a number from 0 to 1"
            )
        self._ratio = ratio
        self._bound = round(ratio * (1 << 64))

    @property
    def ratio(self) -> float:
        """The fraction of device updates kept."""
        return self._ratio

    def keeps_trace(self, trace_id: int) -> bool:
        """Whether the device-origin spans of the trace ``trace_id`` are sampled."""
        return (trace_id & _TRACE_ID_LOW_BITS) < self._bound

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: object = None,
    ) -> SamplingResult:
        """Sample by the rules in the class docstring; keep the parent's trace state."""
        parent_state = get_current_span(parent_context).get_span_context().trace_state
        if name not in DEVICE_ORIGIN_SPANS or self.keeps_trace(trace_id):
            decision = Decision.RECORD_AND_SAMPLE
        elif name == span_name("device", "send"):
            decision = Decision.DROP
        else:
            decision = Decision.RECORD_ONLY
        return SamplingResult(decision, attributes, parent_state)

    def get_description(self) -> str:
        """The sampler's name and ratio, as the SDK's samplers describe themselves."""
        return f"FedtierSampler{{{self._ratio}}}"


def _sampler_from_env() -> Sampler | None:
    """The fedtier sampler when ``OTEL_TRACES_SAMPLER`` names it, else ``None`` (the SDK's)."""
    if os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() != SAMPLER_NAME:
        return None
    raw = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not raw:
        return FedtierSampler()
    try:
        ratio = float(raw)
    except ValueError:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER_ARG is {raw!r}; the fedtier sampler wants a ratio from 0 to 1"
        ) from None
    return FedtierSampler(ratio)


def _sampled_copy(span: ReadableSpan) -> ReadableSpan:
    """``span`` with its sampled flag set, for exporters that only take sampled spans."""
    context = span.get_span_context()
    assert context is not None  # an ended SDK span always has one
    flags = TraceFlags(context.trace_flags | TraceFlags.SAMPLED)
    return ReadableSpan(
        name=span.name,
        context=SpanContext(
            context.trace_id, context.span_id, context.is_remote, flags, context.trace_state
        ),
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class _KeepRejections(SpanProcessor):
    """Passes sampled spans on, and recorded-but-unsampled spans that ended as rejections.

    The fedtier sampler records the edge's unsampled ``process`` spans only so
    this processor can still export the ones that became rejections.
    """

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.get_span_context()
        if context is None or context.trace_flags.sampled:
            self._inner.on_end(span)
        elif (span.attributes or {}).get(ATTR_OUTCOME) == OUTCOME_REJECTED:
            self._inner.on_end(_sampled_copy(span))

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


# --- JSON lines exporter ------------------------------------------------------------


def _json_value(value: object) -> JsonValue:
    """``value`` made JSON-safe: non-finite floats and unknown types become strings."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_json_value(v) for v in value]
    return str(value)


def _json_attributes(attributes: Attributes) -> dict[str, JsonValue]:
    if not attributes:
        return {}
    return {str(k): _json_value(v) for k, v in attributes.items()}


def span_to_json(span: ReadableSpan) -> dict[str, JsonValue]:
    """The JSON object the JSON-lines exporter writes for ``span`` (ids as lowercase hex)."""
    context = span.get_span_context()
    assert context is not None  # a span the SDK ended always has one
    parent = span.parent
    scope = span.instrumentation_scope
    return {
        "trace_id": format_trace_id(context.trace_id),
        "span_id": format_span_id(context.span_id),
        "parent_span_id": format_span_id(parent.span_id) if parent is not None else None,
        "parent_is_remote": bool(parent.is_remote) if parent is not None else False,
        "name": span.name,
        "kind": span.kind.name,
        "start_unix_ns": span.start_time,
        "end_unix_ns": span.end_time,
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "attributes": _json_attributes(span.attributes),
        "events": [
            {
                "name": event.name,
                "time_unix_ns": event.timestamp,
                "attributes": _json_attributes(event.attributes),
            }
            for event in span.events
        ],
        "links": [
            {
                "trace_id": format_trace_id(link.context.trace_id),
                "span_id": format_span_id(link.context.span_id),
                "attributes": _json_attributes(link.attributes),
            }
            for link in span.links
        ],
        "dropped": {
            "attributes": span.dropped_attributes,
            "events": span.dropped_events,
            "links": span.dropped_links,
        },
        "scope": scope.name if scope is not None else "",
        "resource": _json_attributes(span.resource.attributes),
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file, one line each.

    Each batch is written with one unbuffered ``write`` of complete lines, so a
    killed process leaves at most one torn last line; readers skip lines that
    do not parse. When reopening a file whose last line is torn, the exporter
    first ends that line, so the torn fragment never swallows a new span.
    The file is opened on the first export and closed by ``shutdown``.

    With ``max_bytes`` the file is rotated once a batch takes it to that size:
    ``x.jsonl`` becomes ``x.1.jsonl`` (``x.1`` becomes ``x.2``, and so on) and
    the oldest beyond ``keep`` is deleted, so the span files of a long-running
    daemon stay under about ``(keep + 1) * max_bytes`` (one batch more). Rotated
    files keep the ``.jsonl`` suffix: the readers that load every ``*.jsonl`` of
    a folder (``fedtier trace``, the explorer) read them too.

    Args:
        path: the file spans are appended to.
        max_bytes: rotate past this size; None never rotates.
        keep: rotated files kept besides the current one (0: a rotation deletes it).
    """

    def __init__(self, path: Path | str, *, max_bytes: int | None = None, keep: int = 4) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"span file max_bytes must be >= 1, got {max_bytes!r}")
        if keep < 0:
            raise ValueError(f"span files keep must be >= 0, got {keep!r}")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        """The file spans are appended to."""
        return self._path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append ``spans`` as JSON lines; a failed write is logged and reported."""
        if not spans:
            return SpanExportResult.SUCCESS
        # ensure_ascii keeps the file valid UTF-8 whatever the attributes hold.
        data = "".join(
            json.dumps(span_to_json(span), separators=(",", ":"), allow_nan=False) + "\n"
            for span in spans
        ).encode("ascii")
        with self._lock:
            if self._closed:
                _logger.warning("span exporter for %s is shut down; dropping spans", self._path)
                return SpanExportResult.FAILURE
            try:
                file = self._open()
                self._write_all(file, data)
                if self._max_bytes is not None and file.tell() >= self._max_bytes:
                    self._rotate()
            except OSError as exc:
                _logger.warning("cannot append %d spans to %s: %s", len(spans), self._path, exc)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def rotated_path(self, index: int) -> Path:
        """The ``index``-th rotated file (1 is the newest): ``x.jsonl`` -> ``x.<index>.jsonl``."""
        return self._path.with_name(f"{self._path.stem}.{index}{self._path.suffix}")

    def _rotate(self) -> None:
        """Close the current file and shift it into the rotated ones (under the lock)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        # Oldest first: each rename replaces the file just moved on (the oldest
        # kept one is replaced, so dropped), never one still to be moved.
        for index in range(self._keep, 0, -1):
            newer = self.rotated_path(index - 1) if index > 1 else self._path
            if newer.exists():
                newer.replace(self.rotated_path(index))
        if self._keep == 0:
            self._path.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Close the file; later exports fail."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here, so there is nothing to flush."""
        return True

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self._path, "ab", buffering=0)  # noqa: SIM115 - closed by shutdown()
            try:
                if file.tell() > 0 and not self._ends_with_newline():
                    self._write_all(file, b"\n")
            except OSError:
                file.close()
                raise
            self._file = file
        return self._file

    def _ends_with_newline(self) -> bool:
        with open(self._path, "rb") as reader:
            reader.seek(-1, os.SEEK_END)
            return reader.read(1) == b"\n"

    @staticmethod
    def _write_all(file: IO[bytes], data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = file.write(view)
            if not written:
                raise OSError(f"write to {file.name!r} made no progress")
            view = view[written:]


# --- provider setup -----------------------------------------------------------------


class TracingHandle:
    """The tracer provider of this process, its tracer and what it exports to.

    Use ``tracer`` for spans; ``shutdown()`` (or leaving the ``with`` block) flushes
    queued spans and closes exporters, so call it when the daemon stops.
    """

    __slots__ = ("_provider", "_shut_down", "exporters", "jsonl_path", "tracer")

    def __init__(
        self, provider: TracerProvider, exporters: tuple[str, ...], jsonl_path: Path | None
    ) -> None:
        self._provider = provider
        self._shut_down = False
        self.tracer: trace.Tracer = provider.get_tracer(TRACER_NAME)
        self.exporters = exporters
        """Names of the configured exporters, e.g. ``("jsonl",)``; empty when none."""
        self.jsonl_path = jsonl_path
        """The JSON-lines file spans go to, when ``"jsonl"`` is configured."""

    @property
    def provider(self) -> TracerProvider:
        """The SDK tracer provider (for instrumentation libraries that want one)."""
        return self._provider

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export every queued span now; ``False`` if that did not finish in time."""
        return self._provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush queued spans and close the exporters; later calls do nothing."""
        if not self._shut_down:
            self._shut_down = True
            self._provider.shutdown()

    def __enter__(self) -> TracingHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _tier_of(service_name: str) -> str:
    for token in reversed(service_name.replace("_", "-").split("-")):
        if token in _TIERS:
            return token
    return service_name


def _check_file_token(kind: str, value: str) -> str:
    if not value or value in {".", ".."} or "/" in value or "\\" in value or "\0" in value:
        raise ConfigError(
            f"{kind} {value!r} cannot be part of a trace file name; "
            "use a non-empty name without path separators"
        )
    return value


def otlp_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables of ``environ`` (``os.environ``) ask for OTLP export."""
    return "otlp" in requested_exporters(environ)


def requested_exporters(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The exporters the ``OTEL_*`` variables of ``environ`` (``os.environ``) ask for.

    ``OTEL_TRACES_EXPORTER`` when set (``none`` gives no exporter), else ``otlp``
    when an OTLP endpoint is set, else none: without fedtier's own ``jsonl``
    default, which depends on the process having a trace directory. The
    simulators use it to add their own JSON-lines copy to what the user asked for.

    Raises:
        ConfigError: ``OTEL_TRACES_EXPORTER`` names an exporter fedtier lacks.
    """
    env = os.environ if environ is None else environ
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if raw:
        names = [name.strip() for name in raw.split(",") if name.strip()]
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        names = ["otlp"]
    else:
        names = []
    if "none" in names:
        return ()
    for name in names:
        if name not in {"otlp", "jsonl", "console"}:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER names {name!r}; fedtier supports otlp, jsonl, console "
                "and none"
            )
    return tuple(dict.fromkeys(names))


def _exporter_names(jsonl_dir: Path | None) -> list[str]:
    explicit = bool(os.environ.get("OTEL_TRACES_EXPORTER", "").strip())
    names = list(requested_exporters())
    if not names and not explicit and jsonl_dir is not None:
        names = ["jsonl"]
    return names


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        raise ConfigError(
            f"OTLP protocol {protocol!r} is not supported; fedtier exports OTLP/HTTP "
            "(set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
    except ImportError as exc:
        raise ConfigError(
            "an OTLP endpoint is set but the OTLP exporter is not installed; install fedtier[otlp]"
        ) from exc
    return OTLPSpanExporter()


def setup_tracing(
    service_name: str,
    *,
    instance_id: str,
    jsonl_dir: Path | None,
    tier: str | None = None,
    set_global: bool = True,
    jsonl_max_bytes: int | None = None,
    jsonl_keep: int = 4,
) -> TracingHandle:
    """Create this process's tracer provider, configured by the ``OTEL_*`` variables.

    Call it once per process, even one that simulates many devices: the
    resource (and so the service name) belongs to the process.

    Args:
        service_name: ``service.name``, e.g. ``"fedtier-edge"``; also names the file.
        instance_id: ``service.instance.id``, e.g. the daemon's key id.
        jsonl_dir: where ``<service_name>-<instance_id>.jsonl`` is appended to when
            no OTLP endpoint is configured; ``None`` for no local file.
        tier: the ``fedtier.tier`` resource attribute; by default the tier word in
            ``service_name`` (``device``, ``edge``, ``regional``, ``central``).
        set_global: also install the provider as the process-global one (the
            API allows that once per process; later calls keep the first and
            log a warning). Tests pass ``False`` and use ``handle.tracer``.
        jsonl_max_bytes: rotate the JSON-lines file past this size (a daemon's
            ``[retention] span_file_max_bytes``); None never rotates.
        jsonl_keep: rotated files kept besides the current one.

    Raises:
        ConfigError: an unsupported ``OTEL_TRACES_EXPORTER`` or OTLP protocol, a
            missing OTLP package, a fedtier sampler ratio outside ``[0, 1]``, or
            names that cannot form a file name.
    """
    resource = Resource.create(
        {
            SERVICE_NAME: service_name,
            SERVICE_INSTANCE_ID: instance_id,
            ATTR_TIER: tier if tier is not None else _tier_of(service_name),
        }
    )
    # The SDK reads OTEL_TRACES_SAMPLER (unless it names ours), OTEL_SDK_DISABLED
    # and the span limits here.
    provider = TracerProvider(resource=resource, sampler=_sampler_from_env())
    names: list[str] = [] if _env_true("OTEL_SDK_DISABLED") else _exporter_names(jsonl_dir)
    jsonl_path: Path | None = None
    try:
        for name in names:
            if name == "otlp":
                provider.add_span_processor(_KeepRejections(BatchSpanProcessor(_otlp_exporter())))
            elif name == "console":
                # stderr: stdout belongs to the CLI's progress display.
                console = ConsoleSpanExporter(out=sys.stderr)
                provider.add_span_processor(_KeepRejections(BatchSpanProcessor(console)))
            elif jsonl_dir is None:
                raise ConfigError("OTEL_TRACES_EXPORTER names jsonl but no trace directory is set")
            else:
                file_name = (
                    f"{_check_file_token('service name', service_name)}-"
                    f"{_check_file_token('instance id', instance_id)}.jsonl"
                )
                jsonl_path = Path(jsonl_dir) / file_name
                delay: float | None = _JSONL_SCHEDULE_DELAY_MILLIS
                if "OTEL_BSP_SCHEDULE_DELAY" in os.environ:
                    delay = None  # the SDK reads it
                provider.add_span_processor(
                    _KeepRejections(
                        BatchSpanProcessor(
                            JsonLinesSpanExporter(
                                jsonl_path, max_bytes=jsonl_max_bytes, keep=jsonl_keep
                            ),
                            schedule_delay_millis=delay,
                        )
                    )
                )
    except BaseException:
        provider.shutdown()
        raise
    if set_global:
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)
        else:
            _logger.warning(
                "a global tracer provider is already set; %s/%s uses its own provider only",
                service_name,
                instance_id,
            )
    return TracingHandle(provider, tuple(names), jsonl_path)
