"""The explorer's and the collector's HTTP servers (standard library); no view logic.

``explorer_server`` serves the pages (one HTML shell and its script, shipped in
``tiers/explorer/static``) and a JSON API over the views of ``_views``;
``collector_server`` takes OTLP/HTTP trace exports (``POST /v1/traces``) into a
``SpanStore``. Both bind to loopback unless told otherwise: a span database
names every device, and neither server authenticates anyone.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, ClassVar, Final
from urllib.parse import parse_qs, unquote, urlsplit

from fedtier.tiers.explorer import _otlp, _views
from fedtier.tiers.explorer._store import SpanStore

__all__ = ["MAX_BODY_BYTES", "collector_server", "explorer_server"]

MAX_BODY_BYTES: Final = 64 * 1024 * 1024
"""The largest export the collector reads, compressed or not (the SDK batches 512 spans)."""

_log = logging.getLogger("fedtier.explorer")

_STATIC_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Every page path gets the same shell; its script reads the path and calls the API.
_PAGES: Final = ("", "version", "update", "device", "instance", "refusals", "search")


def _static(name: str) -> bytes:
    return resources.files("fedtier.tiers.explorer").joinpath("static", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    """Shared bits: quiet logging, JSON and byte replies."""

    store: ClassVar[SpanStore]
    server_version = "fedtier-explorer"

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._reply(status, json.dumps(obj).encode(), "application/json")


class _ExplorerHandler(_Handler):
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if parts[:1] == ["api"]:
                self._api(parts[1:], query)
            elif parts[:1] == ["static"] and len(parts) == 2:
                name = parts[1]
                suffix = name[name.rfind(".") :]
                if suffix not in _STATIC_TYPES or "/" in name or name.startswith("."):
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no such file"})
                    return
                self._reply(HTTPStatus.OK, _static(name), _STATIC_TYPES[suffix])
            elif (parts[0] if parts else "") in _PAGES and len(parts) <= 2:
                self._reply(HTTPStatus.OK, _static("index.html"), _STATIC_TYPES[".html"])
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away

    def _api(self, parts: list[str], query: dict[str, str]) -> None:
        store = self.store
        view: Callable[[], dict[str, Any] | None]
        what = parts[0] if parts else ""
        arg = parts[1] if len(parts) > 1 else ""
        if what == "overview" and not arg:
            view = lambda: _views.overview(store)  # noqa: E731
        elif what == "refusals" and not arg:
            view = lambda: _views.refusals_view(store)  # noqa: E731
        elif what == "search" and not arg:
            view = lambda: _views.search(store, query.get("q", ""))  # noqa: E731
        elif what == "version" and arg.isdigit():
            view = lambda: _views.version_view(store, int(arg))  # noqa: E731
        elif what == "update" and arg:
            view = lambda: _views.update_view(store, arg)  # noqa: E731
        elif what == "device" and arg:
            view = lambda: _views.device_view(store, arg)  # noqa: E731
        elif what == "instance" and arg:
            view = lambda: _views.instance_view(store, arg)  # noqa: E731
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no API {'/'.join(parts)!r}"})
            return
        try:
            result = view()
        except ValueError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        if result is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no span names {what} {arg}"})
            return
        self._json(HTTPStatus.OK, result)


class _CollectorHandler(_Handler):
    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/v1/traces":
            self._json(HTTPStatus.NOT_FOUND, {"error": "only /v1/traces is served"})
            return
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        protobuf = content_type == "application/x-protobuf"
        if not protobuf and content_type != "application/json":
            self._reply(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                _otlp.error_body(f"unsupported Content-Type {content_type!r}", False),
                "application/json",
            )
            return
        reply_type = "application/x-protobuf" if protobuf else "application/json"
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self._bad("missing, bad or too large Content-Length", protobuf, reply_type)
            return
        body = self.rfile.read(length)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = _gunzip(body)
            elif encoding != "identity":
                self._bad(f"unsupported Content-Encoding {encoding!r}", protobuf, reply_type)
                return
            spans = _otlp.decode_protobuf(body) if protobuf else _otlp.decode_json(body)
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            self._bad(str(exc), protobuf, reply_type)
            return
        added = self.store.add(spans)
        _log.debug("stored %d of %d spans", added, len(spans))
        self._reply(HTTPStatus.OK, _otlp.success_body(protobuf), reply_type)

    def _bad(self, message: str, protobuf: bool, reply_type: str) -> None:
        self._reply(HTTPStatus.BAD_REQUEST, _otlp.error_body(message, protobuf), reply_type)


def _gunzip(body: bytes) -> bytes:
    """``body`` decompressed, refusing one that would grow past ``MAX_BODY_BYTES``."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(body, MAX_BODY_BYTES + 1)
    if len(out) > MAX_BODY_BYTES or inflater.unconsumed_tail:
        raise ValueError("gzip body inflates past the size limit")
    if not inflater.eof:
        raise EOFError("truncated gzip body")
    return out


def _server(handler: type[_Handler], store: SpanStore, host: str, port: int) -> ThreadingHTTPServer:
    bound = type(handler.__name__, (handler,), {"store": store})
    server = ThreadingHTTPServer((host, port), bound)
    server.daemon_threads = True
    return server


def explorer_server(
    store: SpanStore, host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """The explorer's pages and JSON API over ``store``, bound but not yet serving."""
    return _server(_ExplorerHandler, store, host, port)


def collector_server(
    store: SpanStore, host: str = "127.0.0.1", port: int = 4318
) -> ThreadingHTTPServer:
    """An OTLP/HTTP trace receiver that writes into ``store``, bound but not yet serving."""
    return _server(_CollectorHandler, store, host, port)
