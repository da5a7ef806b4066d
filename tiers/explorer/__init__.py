"""The trace explorer: a span database, its views, a web UI and an OTLP receiver; never the lab.

``fedtier trace serve`` shows a run's spans (its JSON-lines files, or the
sqlite database ``fedtier trace collect`` fills from OTLP/HTTP exports) as
linked pages: a model version, an update, a device, a daemon, refusals over
time, search. Imports the standard library, ``protocol.telemetry`` and
``tiers.tracequery``; opentelemetry-proto only to decode protobuf exports.
"""

from fedtier.tiers.explorer._cli import parse_listen, run_collect, run_serve
from fedtier.tiers.explorer._http import MAX_BODY_BYTES, collector_server, explorer_server
from fedtier.tiers.explorer._otlp import BadBody, decode_json, decode_protobuf
from fedtier.tiers.explorer._store import SpanStore
from fedtier.tiers.explorer._views import (
    STAGES,
    device_view,
    instance_view,
    overview,
    refusals_view,
    search,
    update_view,
    version_view,
)

__all__ = [
    "MAX_BODY_BYTES",
    "STAGES",
    "BadBody",
    "SpanStore",
    "collector_server",
    "decode_json",
    "decode_protobuf",
    "device_view",
    "explorer_server",
    "instance_view",
    "overview",
    "parse_listen",
    "refusals_view",
    "run_collect",
    "run_serve",
    "search",
    "update_view",
    "version_view",
]
