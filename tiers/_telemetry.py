"""The tiers' one doorway to tracing and metrics; imports protocol.telemetry and the OTel API only.

Everything the daemons need from telemetry passes through here, so moving to
another telemetry module is one edit in this file. Metrics objects are duck-typed
to ``protocol.telemetry.metrics.TierMetrics`` (tests record through a fake);
:func:`quiet_metrics` is the default when a daemon is given none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Final, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import Link, Span

from fedtier.protocol.telemetry.metrics import TierMetrics
from fedtier.protocol.telemetry.tracing import extract_context, inject_headers, link_for

__all__ = [
    "TierMetricsLike",
    "context_of",
    "default_tracer",
    "extract_context",
    "inject_headers",
    "links_to",
    "quiet_metrics",
    "traceparent_of",
]

TRACER_NAME: Final = "fedtier"
_DEFAULT_LINK_LIMIT: Final = 128


class TierMetricsLike(Protocol):
    """What a daemon reports; ``protocol.telemetry.metrics.TierMetrics`` has this shape."""

    def update_outcome(self, outcome: str, reason: str, /) -> None:
        """Count one input by outcome (accepted, duplicate, rejected) and reason."""

    def update_bytes(self, n: int, /) -> None:
        """Record the size of one received input."""

    def staleness(self, tau: int, /) -> None:
        """Record the staleness of one accepted input."""

    def anomalous(self, detector: str, /) -> None:
        """Count an accepted but anomalous input (e.g. ``norm_clipped``)."""

    def participation(self, n: int, /) -> None:
        """Record how many distinct senders one flush holds."""

    def aggregation_duration(self, s: float, /) -> None:
        """Record how long building one aggregate took."""

    def aggregate_latency(self, s: float, /) -> None:
        """Record the age of the oldest input of one aggregate when it left."""

    def buffer_depth(self, n: int, /) -> None:
        """Record the number of inputs in the open buffer."""

    def model_version(self, v: int, /) -> None:
        """Record the model version this daemon knows."""

    def retry(self, op: str, /) -> None:
        """Count one retry of a transient failure of ``op``."""

    def inputs_flushed(self, count: int, reason: str, /) -> None:
        """Count the inputs of one flush and why it happened."""

    def model_metrics(self, version: int, metrics: Mapping[str, float], /) -> None:
        """Record the held-out metrics of model ``version`` (central)."""

    def evaluation_failed(self) -> None:
        """Count one failed evaluation of a model version (central)."""


def quiet_metrics(tier: str, instance: str) -> TierMetricsLike:
    """Metrics that go nowhere: ``TierMetrics`` on a no-op provider (tests, embedded use)."""
    return TierMetrics(tier, instance, meter_provider=NoOpMeterProvider())


def default_tracer() -> trace.Tracer:
    """The process-global fedtier tracer (a no-op until a provider is installed)."""
    return trace.get_tracer(TRACER_NAME)


def traceparent_of(span: Span) -> str:
    """The W3C ``traceparent`` of ``span``, or ``""`` when it is not recording a valid span.

    Stored beside each buffered input and each outbox partial, so links and
    parents survive a restart.
    """
    headers: dict[str, str] = {}
    inject_headers(headers, trace.set_span_in_context(span))
    return headers.get("traceparent", "")


def context_of(traceparent: str) -> Context:
    """The remote-parent context of a stored ``traceparent`` (empty when there is none)."""
    if not traceparent:
        return Context()
    return extract_context({"traceparent": traceparent})


def _link_limit() -> int:
    # The SDK drops links past this limit anyway; not creating them saves work.
    raw = os.environ.get("OTEL_SPAN_LINK_COUNT_LIMIT", "")
    try:
        value = int(raw)
    except ValueError:
        return _DEFAULT_LINK_LIMIT
    return max(value, 0)


def links_to(traceparents: Iterable[str]) -> list[Link]:
    """Span links to the stored spans, at most ``OTEL_SPAN_LINK_COUNT_LIMIT`` of them."""
    limit = _link_limit()
    links: list[Link] = []
    for value in traceparents:
        if len(links) >= limit:
            break
        link = link_for(context_of(value)) if value else None
        if link is not None:
            links.append(link)
    return links


def headers_with_context(span: Span, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A fresh headers dict holding ``base`` and the trace context of ``span``."""
    headers = dict(base or {})
    inject_headers(headers, trace.set_span_in_context(span))
    return headers
