"""OTLP/HTTP trace bodies (protobuf and JSON) to ``SpanRecord``s; no HTTP server, no sqlite.

The records come out exactly as ``tracequery`` reads the JSON-lines exporter's
lines (ids as lowercase hex, ``status`` as the SDK's code name, attributes as
JSON values), so spans that reached the explorer by either road give the same
views. The protobuf classes come with ``fedtier[otlp]`` (opentelemetry-proto);
JSON needs nothing but the standard library.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fedtier.tiers.tracequery import LinkRecord, SpanRecord

__all__ = [
    "BadBody",
    "decode_json",
    "decode_protobuf",
    "error_body",
    "success_body",
]

_STATUS_NAMES: Final = {0: "UNSET", 1: "OK", 2: "ERROR"}
_STATUS_ENUM: Final = {
    "STATUS_CODE_UNSET": "UNSET",
    "STATUS_CODE_OK": "OK",
    "STATUS_CODE_ERROR": "ERROR",
}
_INVALID_ARGUMENT: Final = 3  # google.rpc.Code, in the body of a 400

BadBody = ValueError
"""What a decoder raises for a body that is not an OTLP trace export (the HTTP layer's 400)."""


# -- protobuf -----------------------------------------------------------------------------


def _pb_value(value: Any) -> Any:
    """An ``AnyValue`` message as a JSON value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_pb_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _pb_attributes(attributes: Sequence[Any]) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in attributes}


def decode_protobuf(body: bytes) -> list[SpanRecord]:
    """The spans of an ``ExportTraceServiceRequest`` in protobuf.

    Raises:
        ValueError: not a trace export (``BadBody``).
        ImportError: opentelemetry-proto is not installed (``fedtier[otlp]``).
    """
    # google.protobuf ships no type stubs; opentelemetry-proto's classes are typed.
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise BadBody(f"not an OTLP protobuf trace export: {exc}") from exc
    spans: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = _pb_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    raise BadBody("a span has no valid trace_id or span_id")
                spans.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        start_unix_ns=span.start_time_unix_nano,
                        end_unix_ns=span.end_time_unix_nano,
                        attributes=_pb_attributes(span.attributes),
                        links=tuple(
                            LinkRecord(
                                link.trace_id.hex(),
                                link.span_id.hex(),
                                _pb_attributes(link.attributes),
                            )
                            for link in span.links
                        ),
                        resource=resource,
                        status=_STATUS_NAMES.get(span.status.code, "UNSET"),
                    )
                )
    return spans


# -- JSON (the OTLP/JSON mapping: lowerCamelCase, hex ids, 64-bit ints as strings) -------


def _field(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field by its JSON name, or by its proto name (receivers accept both)."""
    return obj[camel] if camel in obj else obj.get(snake)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadBody(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadBody(f"{what} is not a list")
    return value


def _json_value(value: Any) -> Any:
    obj = _object(value, "an attribute value")
    if not obj:
        return None
    ((key, inner),) = list(obj.items())[:1]
    if key in ("stringValue", "string_value", "boolValue", "bool_value"):
        return inner
    if key in ("intValue", "int_value"):
        return int(inner)
    if key in ("doubleValue", "double_value"):
        return float(inner)
    if key in ("arrayValue", "array_value"):
        return [_json_value(v) for v in _list(_object(inner, key).get("values"), "values")]
    if key in ("kvlistValue", "kvlist_value"):
        return _json_attributes(_object(inner, key).get("values"))
    if key in ("bytesValue", "bytes_value"):
        return base64.b64decode(str(inner)).hex()
    raise BadBody(f"unknown attribute value type {key!r}")


def _json_attributes(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in _list(value, "attributes"):
        kv = _object(kv, "an attribute")
        out[str(kv["key"])] = _json_value(kv.get("value"))
    return out


def _hex_id(value: Any, size: int, what: str, *, optional: bool = False) -> str | None:
    """An id in OTLP/JSON's hex (case-insensitive), checked for its length."""
    if value in (None, "") and optional:
        return None
    text = str(value or "").lower()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise BadBody(f"{what} {value!r} is not {size} bytes of hex")
    return text


def _json_span(span: Mapping[str, Any], resource: dict[str, Any]) -> SpanRecord:
    status = _object(span.get("status"), "status")
    code = status.get("code", 0)
    status_name = (
        _STATUS_ENUM.get(code, "UNSET")
        if isinstance(code, str)
        else (_STATUS_NAMES.get(int(code), "UNSET"))
    )
    trace_id = _hex_id(_field(span, "traceId", "trace_id"), 16, "traceId")
    span_id = _hex_id(_field(span, "spanId", "span_id"), 8, "spanId")
    assert trace_id is not None
    assert span_id is not None
    parent = _hex_id(
        _field(span, "parentSpanId", "parent_span_id"), 8, "parentSpanId", optional=True
    )
    links = []
    for link in _list(span.get("links"), "links"):
        link = _object(link, "a link")
        link_trace = _hex_id(_field(link, "traceId", "trace_id"), 16, "link traceId")
        link_span = _hex_id(_field(link, "spanId", "span_id"), 8, "link spanId")
        assert link_trace is not None
        assert link_span is not None
        links.append(LinkRecord(link_trace, link_span, _json_attributes(link.get("attributes"))))
    return SpanRecord(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=str(span.get("name", "")),
        start_unix_ns=int(_field(span, "startTimeUnixNano", "start_time_unix_nano") or 0),
        end_unix_ns=int(_field(span, "endTimeUnixNano", "end_time_unix_nano") or 0),
        attributes=_json_attributes(span.get("attributes")),
        links=tuple(links),
        resource=resource,
        status=status_name,
    )


def decode_json(body: bytes) -> list[SpanRecord]:
    """The spans of an ``ExportTraceServiceRequest`` in OTLP/JSON.

    Raises:
        ValueError: not JSON, or not a trace export (``BadBody``).
    """
    try:
        request = _object(json.loads(body), "the body")
        spans: list[SpanRecord] = []
        for resource_spans in _list(_field(request, "resourceSpans", "resource_spans"), "rs"):
            resource_spans = _object(resource_spans, "resourceSpans")
            resource = _json_attributes(
                _object(resource_spans.get("resource"), "resource").get("attributes")
            )
            scopes = _field(resource_spans, "scopeSpans", "scope_spans")
            for scope_spans in _list(scopes, "scopeSpans"):
                scope_spans = _object(scope_spans, "scopeSpans")
                for span in _list(scope_spans.get("spans"), "spans"):
                    spans.append(_json_span(_object(span, "a span"), resource))
    except (KeyError, TypeError) as exc:
        raise BadBody(f"not an OTLP/JSON trace export: {exc!r}") from exc
    except ValueError as exc:  # json, int(), base64 (binascii.Error) and ours
        raise BadBody(f"not an OTLP/JSON trace export: {exc}") from exc
    return spans


# -- responses ------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def success_body(protobuf: bool) -> bytes:
    """An empty ``ExportTraceServiceResponse`` (every span accepted)."""
    return b"" if protobuf else b"{}"


def error_body(message: str, protobuf: bool) -> bytes:
    """A ``google.rpc.Status`` with INVALID_ARGUMENT, as OTLP/HTTP answers a 400."""
    if not protobuf:
        return json.dumps({"code": _INVALID_ARGUMENT, "message": message}).encode()
    text = message.encode()
    return b"\x08" + _varint(_INVALID_ARGUMENT) + b"\x12" + _varint(len(text)) + text
