"""Follows updates through a run's span files; never imports the OTel SDK, trio or a bus.

It answers "where did update X go, and which model version included it?".

Reads the files ``protocol.telemetry.tracing.JsonLinesSpanExporter`` writes;
imports ``protocol.telemetry`` names, rich and the standard library, never the
OpenTelemetry SDK, trio or a bus, so it works on a copy of a run's directory.

How one hop leads to the next (``protocol/telemetry/__init__.py`` has the span table)::

    device send --parent--> edge process            also: fedtier.update_id on both
    edge process <--link-- edge aggregate           also: update id in fedtier.input_ids
    edge aggregate --parent--> edge send            carries fedtier.partial_id = P
    edge send --parent--> regional process          also: fedtier.partial_id = P
    regional process <--link-- regional aggregate   also: P in fedtier.input_ids
    ... the same for regional -> central ...
    central aggregate --parent--> central publish model   carries fedtier.model_version

Ids are the primary key and links a second way in, because the SDK keeps only
``OTEL_SPAN_LINK_COUNT_LIMIT`` links per span. When a step has several
candidates (a redelivered update, a flush retried after a restart) the one
that leads furthest wins, then the earliest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from fedtier.protocol.telemetry import (
    ATTR_DEVICE,
    ATTR_FLUSH_REASON,
    ATTR_INPUT_COUNT,
    ATTR_INPUT_IDS,
    ATTR_MODEL_VERSION,
    ATTR_OUTCOME,
    ATTR_PARTIAL_ID,
    ATTR_REASON,
    ATTR_STALENESS,
    ATTR_UPDATE_ID,
    span_name,
)

__all__ = [
    "Hop",
    "SpanRecord",
    "TraceIndex",
    "TraceSummary",
    "UpdatePath",
    "follow_update",
    "main",
    "render_path",
    "render_summary",
    "summary",
]

UPPER_TIERS: Final = ("edge", "regional", "central")
_HEX_RE: Final = re.compile(r"[0-9a-f]+")
_MIN_PREFIX: Final = 4

SpanKey = tuple[str, str]  # (trace_id, span_id), lowercase hex


@dataclass(frozen=True, slots=True)
class LinkRecord:
    """A span link as read back from a JSON line."""

    trace_id: str
    span_id: str
    attributes: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span as read back from a JSON line."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_unix_ns: int
    end_unix_ns: int
    attributes: Mapping[str, Any]
    links: tuple[LinkRecord, ...]
    resource: Mapping[str, Any]
    status: str = "UNSET"

    @property
    def key(self) -> SpanKey:
        """``(trace_id, span_id)``."""
        return (self.trace_id, self.span_id)

    @property
    def service(self) -> str:
        """``service.name`` of the process that ended the span."""
        return str(self.resource.get("service.name", ""))

    @property
    def instance(self) -> str:
        """``service.instance.id`` of the process that ended the span."""
        return str(self.resource.get("service.instance.id", ""))

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SpanRecord:
        """Parse one exported object; raises ``KeyError``, ``TypeError`` or ``ValueError``."""
        links = tuple(
            LinkRecord(
                str(link["trace_id"]), str(link["span_id"]), dict(link.get("attributes") or {})
            )
            for link in obj.get("links") or ()
        )
        status = obj.get("status") or {}
        parent = obj.get("parent_span_id")
        return cls(
            trace_id=str(obj["trace_id"]),
            span_id=str(obj["span_id"]),
            parent_span_id=str(parent) if parent else None,
            name=str(obj["name"]),
            start_unix_ns=int(obj.get("start_unix_ns") or 0),
            end_unix_ns=int(obj.get("end_unix_ns") or 0),
            attributes=dict(obj.get("attributes") or {}),
            links=links,
            resource=dict(obj.get("resource") or {}),
            status=str(status.get("code", "UNSET")) if isinstance(status, Mapping) else "UNSET",
        )


@dataclass(frozen=True, slots=True)
class Hop:
    """One step of an update's way, from one span."""

    name: str
    service: str
    instance: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    start_unix_ns: int
    end_unix_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    """The span's ``fedtier.*`` attributes."""

    @classmethod
    def of(cls, span: SpanRecord) -> Hop:
        """The hop ``span`` stands for."""
        return cls(
            name=span.name,
            service=span.service,
            instance=span.instance,
            trace_id=span.trace_id,
            span_id=span.span_id,
            parent_span_id=span.parent_span_id,
            start_unix_ns=span.start_unix_ns,
            end_unix_ns=span.end_unix_ns,
            attributes={k: v for k, v in span.attributes.items() if k.startswith("fedtier.")},
        )


@dataclass(frozen=True, slots=True)
class UpdatePath:
    """The hops of one update, device first, and where the trail ends."""

    update_id: str
    hops: tuple[Hop, ...]
    model_version: int | None
    """The first model version that included the update, when the trail reaches it."""
    ends: str
    """One sentence: where and why the trail stops."""

    @property
    def found(self) -> bool:
        """Whether any span mentions the update."""
        return bool(self.hops)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``fedtier trace --json``)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """What a run's trace files hold."""

    files: int
    spans: int
    torn_lines: int
    spans_per_name: dict[str, int]
    updates_seen: int
    model_versions: tuple[int, ...]
    instances: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _iter_file(path: Path) -> Iterator[SpanRecord | None]:
    """Spans of one file; ``None`` for each line that is torn or not a span."""
    with path.open("rb") as lines:
        for raw in lines:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise TypeError("not an object")
                yield SpanRecord.from_json(obj)
            except (ValueError, KeyError, TypeError, AttributeError):
                # A process killed mid-write leaves a torn last line; skip it
                # (and anything else unreadable) rather than refuse the run.
                yield None


class TraceIndex:
    """Every span of a run, indexed by the keys ``follow_update`` walks."""

    def __init__(self, spans: Iterable[SpanRecord], *, files: int = 0, torn_lines: int = 0) -> None:
        self.files = files
        self.torn_lines = torn_lines
        self.spans: list[SpanRecord] = []
        self._by_key: dict[SpanKey, SpanRecord] = {}
        self._children: dict[SpanKey, list[SpanRecord]] = defaultdict(list)
        self._by_item: dict[str, list[SpanRecord]] = defaultdict(list)
        self._by_input: dict[str, list[SpanRecord]] = defaultdict(list)
        self._by_link: dict[SpanKey, list[SpanRecord]] = defaultdict(list)
        for span in spans:
            self._add(span)

    @classmethod
    def load(cls, run_dir: Path) -> TraceIndex:
        """Read every ``*.jsonl`` file under ``run_dir``, recursively.

        Raises:
            FileNotFoundError: ``run_dir`` is not a directory.
        """
        if not run_dir.is_dir():
            raise FileNotFoundError(f"trace directory {str(run_dir)!r} does not exist")
        paths = sorted(run_dir.rglob("*.jsonl"))
        spans: list[SpanRecord] = []
        torn = 0
        for path in paths:
            for record in _iter_file(path):
                if record is None:
                    torn += 1
                else:
                    spans.append(record)
        return cls(spans, files=len(paths), torn_lines=torn)

    def _add(self, span: SpanRecord) -> None:
        if span.key in self._by_key:
            return  # the same span exported twice (a retried batch)
        self.spans.append(span)
        self._by_key[span.key] = span
        if span.parent_span_id:
            self._children[(span.trace_id, span.parent_span_id)].append(span)
        for attr in (ATTR_UPDATE_ID, ATTR_PARTIAL_ID):
            value = span.attributes.get(attr)
            if isinstance(value, str):
                self._by_item[value.lower()].append(span)
        inputs = span.attributes.get(ATTR_INPUT_IDS)
        if isinstance(inputs, list):
            for item in inputs:
                if isinstance(item, str):
                    self._by_input[item.lower()].append(span)
        for link in span.links:
            self._by_link[(link.trace_id, link.span_id)].append(span)

    def children(self, span: SpanRecord, name: str) -> list[SpanRecord]:
        """Spans named ``name`` whose parent is ``span``."""
        return [s for s in self._children.get(span.key, ()) if s.name == name]

    def naming(self, item_id: str, name: str) -> list[SpanRecord]:
        """Spans named ``name`` whose update or partial id is ``item_id``."""
        return [s for s in self._by_item.get(item_id, ()) if s.name == name]

    def folding(self, item_id: str, process: SpanRecord | None, name: str) -> list[SpanRecord]:
        """Aggregate spans named ``name`` that list ``item_id`` or link to ``process``."""
        found = [s for s in self._by_input.get(item_id, ()) if s.name == name]
        if process is not None:
            found += [s for s in self._by_link.get(process.key, ()) if s.name == name]
        return _unique(found)

    def update_ids(self) -> set[str]:
        """Every update id a span names."""
        return {
            str(s.attributes[ATTR_UPDATE_ID]).lower()
            for s in self.spans
            if isinstance(s.attributes.get(ATTR_UPDATE_ID), str)
        }

    def resolve(self, update_id: str) -> str:
        """The full update id that ``update_id`` (a full id or a unique prefix) names.

        Raises:
            ValueError: not hex, too short a prefix, or a prefix shared by several updates.
        """
        wanted = update_id.strip().lower()
        if not _HEX_RE.fullmatch(wanted):
            raise ValueError(f"update id {update_id!r} is not hexadecimal")
        if wanted in self._by_item or wanted in self._by_input:
            return wanted
        if len(wanted) < _MIN_PREFIX:
            return wanted
        matches = sorted(i for i in self.update_ids() if i.startswith(wanted))
        if len(matches) > 1:
            raise ValueError(
                f"update id prefix {update_id!r} matches {len(matches)} updates "
                f"({', '.join(m[:12] + '…' for m in matches[:3])}); give more digits"
            )
        return matches[0] if matches else wanted


def _unique(spans: Iterable[SpanRecord]) -> list[SpanRecord]:
    seen: set[SpanKey] = set()
    out: list[SpanRecord] = []
    for span in spans:
        if span.key not in seen:
            seen.add(span.key)
            out.append(span)
    return out


def _str_attr(span: SpanRecord, attr: str) -> str | None:
    value = span.attributes.get(attr)
    return value.lower() if isinstance(value, str) and value else None


# A trail is the spans walked so far plus the sentence saying why it stopped.
_Trail = tuple[list[SpanRecord], str, int | None]


def _better(a: _Trail, b: _Trail) -> _Trail:
    """The trail that leads further; on a tie, the one that starts earlier."""
    if (a[2] is not None) != (b[2] is not None):
        return a if a[2] is not None else b
    if len(a[0]) != len(b[0]):
        return a if len(a[0]) > len(b[0]) else b
    return a if a[0][0].start_unix_ns <= b[0][0].start_unix_ns else b


def _best(trails: Iterable[_Trail]) -> _Trail | None:
    best: _Trail | None = None
    for trail in trails:
        best = trail if best is None else _better(best, trail)
    return best


def _from_process(
    index: TraceIndex, level: int, item_id: str | None, sender: SpanRecord | None
) -> _Trail | None:
    """The best trail that starts at a ``<tier> process`` span for ``item_id``."""
    tier = UPPER_TIERS[level]
    name = span_name(tier, "process")
    candidates = index.children(sender, name) if sender is not None else []
    if item_id is not None:
        candidates += index.naming(item_id, name)
    return _best(_after_process(index, level, item_id, process) for process in _unique(candidates))


def _after_process(
    index: TraceIndex, level: int, item_id: str | None, process: SpanRecord
) -> _Trail:
    tier = UPPER_TIERS[level]
    outcome = _str_attr(process, ATTR_OUTCOME)
    if outcome in {"rejected", "duplicate"}:
        reason = _str_attr(process, ATTR_REASON)
        why = f": {reason}" if reason else ""
        return [process], f"{outcome} at {tier} {process.instance or '?'}{why}", None
    item_id = item_id or _str_attr(process, ATTR_UPDATE_ID) or _str_attr(process, ATTR_PARTIAL_ID)
    aggregates = index.folding(item_id, process, span_name(tier, "aggregate")) if item_id else []
    best = _best(_after_aggregate(index, level, agg) for agg in aggregates)
    if best is None:
        return (
            [process],
            f"waiting in {tier} {process.instance or '?'}: no {tier} aggregate includes it yet",
            None,
        )
    return [process, *best[0]], best[1], best[2]


def _after_aggregate(index: TraceIndex, level: int, aggregate: SpanRecord) -> _Trail:
    tier = UPPER_TIERS[level]
    if level == len(UPPER_TIERS) - 1:
        publishes = index.children(aggregate, span_name(tier, "publish model"))
        trails: list[_Trail] = []
        for pub in publishes:
            version = _int_attr(pub, ATTR_MODEL_VERSION)
            ends = f"included in model v{version}" if version is not None else "published a model"
            trails.append(([aggregate, pub], ends, version))
        best = _best(trails)
        if best is None:
            return [aggregate], "central aggregate has no publish model span yet", None
        return best
    upper = UPPER_TIERS[level + 1]
    trails = []
    for send in index.children(aggregate, span_name(tier, "send")):
        above = _from_process(index, level + 1, _str_attr(send, ATTR_PARTIAL_ID), send)
        if above is None:
            trails.append(([aggregate, send], f"sent by {tier}; no {upper} process span yet", None))
        else:
            trails.append(([aggregate, send, *above[0]], above[1], above[2]))
    best = _best(trails)
    if best is None:
        return [aggregate], f"{tier} aggregate has no send span yet", None
    return best


def _int_attr(span: SpanRecord, attr: str) -> int | None:
    value = span.attributes.get(attr)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _index(source: Path | TraceIndex) -> TraceIndex:
    return source if isinstance(source, TraceIndex) else TraceIndex.load(Path(source))


def follow_update(update_id: str, source: Path | TraceIndex) -> UpdatePath:
    """Follow one update from its device through every tier to a model version.

    Args:
        update_id: the update id in hex, or a unique prefix of at least 4 digits.
        source: a run's trace directory, or an index already loaded from one.

    Returns:
        The hops found, device first; ``hops`` is empty when no span names the update.

    Raises:
        ValueError: ``update_id`` is not hex or is an ambiguous prefix.
        FileNotFoundError: ``source`` is a directory that does not exist.
    """
    index = _index(source)
    wanted = index.resolve(update_id)
    trails: list[_Trail] = []
    for send in index.naming(wanted, span_name("device", "send")):
        above = _from_process(index, 0, wanted, send)
        if above is None:
            trails.append(([send], "sent by the device; no edge process span yet", None))
        else:
            trails.append(([send, *above[0]], above[1], above[2]))
    if not trails:
        # No device span (device tracing off or unsampled): start at the edge.
        above = _from_process(index, 0, wanted, None)
        if above is not None:
            trails.append(above)
    best = _best(trails)
    if best is None:
        return UpdatePath(wanted, (), None, f"no span names update {wanted}")
    spans, ends, version = best
    return UpdatePath(wanted, tuple(Hop.of(s) for s in spans), version, ends)


def summary(source: Path | TraceIndex) -> TraceSummary:
    """Count a run's spans by name, the updates they name and the model versions published."""
    index = _index(source)
    per_name = Counter(s.name for s in index.spans)
    versions = {
        v
        for s in index.spans
        if s.name == span_name("central", "publish model")
        and (v := _int_attr(s, ATTR_MODEL_VERSION)) is not None
    }
    instances = {f"{s.service}/{s.instance}" for s in index.spans if s.service or s.instance}
    return TraceSummary(
        files=index.files,
        spans=len(index.spans),
        torn_lines=index.torn_lines,
        spans_per_name=dict(sorted(per_name.items())),
        updates_seen=len(index.update_ids()),
        model_versions=tuple(sorted(versions)),
        instances=tuple(sorted(instances)),
    )


# --- rendering ----------------------------------------------------------------------


def _short(hex_id: str, digits: int = 12) -> str:
    return hex_id if len(hex_id) <= digits else hex_id[:digits] + "…"


def _duration(ns: int) -> str:
    seconds = ns / 1e9
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if abs(seconds) < 1:
        return f"{seconds * 1e3:.1f} ms"
    if abs(seconds) < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


def _details(hop: Hop) -> str:
    attrs = hop.attributes
    parts = [
        escape(f"{label}{attrs[attr]}")
        for attr, label in (
            (ATTR_DEVICE, "device "),
            (ATTR_OUTCOME, ""),
            (ATTR_REASON, "reason "),
            (ATTR_STALENESS, "staleness "),
            (ATTR_INPUT_COUNT, "inputs "),
            (ATTR_FLUSH_REASON, "flush "),
        )
        if attr in attrs
    ]
    if ATTR_PARTIAL_ID in attrs and hop.name.endswith(("send", "process")):
        parts.append(escape(f"partial {_short(str(attrs[ATTR_PARTIAL_ID]))}"))
    if ATTR_MODEL_VERSION in attrs:
        version = escape(str(attrs[ATTR_MODEL_VERSION]))
        # On a publish it is the new model; elsewhere the version the process
        # knew (a device's base version, a tier's current one).
        if hop.name.endswith("publish model"):
            parts.append(f"[bold green]model v{version}[/]")
        else:
            parts.append(f"at v{version}")
    return ", ".join(parts)


def render_path(path: UpdatePath) -> RenderableType:
    """A rich tree: the update, then one branch per process it passed, then that process's spans.

    Times are relative to the first hop; a trace id is shown where a new trace
    starts (the first hop and every aggregate), span ids on every hop.
    """
    if path.model_version is not None:
        head = f"update [bold]{path.update_id}[/] → [bold green]model v{path.model_version}[/]"
    else:
        head = f"update [bold]{path.update_id}[/] → [yellow]not in a model yet[/]"
    tree = Tree(head)
    if not path.hops:
        tree.add(f"[red]{escape(path.ends)}[/]")
        return tree
    t0 = path.hops[0].start_unix_ns
    start = datetime.fromtimestamp(t0 / 1e9, tz=UTC).isoformat(timespec="milliseconds")
    branch: Tree | None = None
    branch_owner: tuple[str, str] | None = None
    trace_id = ""
    for i, hop in enumerate(path.hops):
        owner = (hop.service, hop.instance)
        if branch is None or owner != branch_owner:
            branch = tree.add(
                f"[bold]{escape(hop.instance or '?')}[/] [dim]{escape(hop.service)}[/]"
            )
            branch_owner = owner
        action = hop.name.split(" ", 1)[1] if " " in hop.name else hop.name
        when = start if i == 0 else f"+{_duration(hop.start_unix_ns - t0)}"
        label = (
            f"[cyan]{escape(action)}[/]  {when}  "
            f"[dim]took {_duration(hop.end_unix_ns - hop.start_unix_ns)}[/]"
        )
        details = _details(hop)
        if details:
            label += f"  {details}"
        ids = f"span {hop.span_id}"
        if hop.trace_id != trace_id:
            ids = f"trace {hop.trace_id} {ids}"
            trace_id = hop.trace_id
        branch.add(f"{label}\n[dim]{ids}[/]")
    style = "green" if path.model_version is not None else "yellow"
    tree.add(f"[{style}]{escape(path.ends)}[/]")
    return tree


def render_summary(result: TraceSummary) -> RenderableType:
    """A rich table of span counts, with a line on updates, versions and torn lines."""
    table = Table(title="spans per name")
    table.add_column("span")
    table.add_column("count", justify="right")
    for name, count in result.spans_per_name.items():
        table.add_row(escape(name), str(count))
    versions = result.model_versions
    version_text = f"v{versions[0]}..v{versions[-1]} ({len(versions)})" if versions else "none"
    line = (
        f"{result.spans} spans in {result.files} files from {len(result.instances)} instances; "
        f"{result.updates_seen} updates; model versions {version_text}; "
        f"{result.torn_lines} unreadable lines skipped"
    )
    return Group(table, escape(line))


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier trace [UPDATE_ID] --dir DIR [--json]``; without an id, summarise the run.

    Returns:
        0 when the update (or any span, for a summary) was found, 1 when not,
        2 for an unusable argument or directory.
    """
    parser = argparse.ArgumentParser(
        prog="fedtier trace",
        description="Follow an update through the tiers to the model version that included it.",
    )
    parser.add_argument("update_id", nargs="?", metavar="UPDATE_ID", help="hex id or prefix")
    parser.add_argument("--dir", type=Path, required=True, help="the run's trace directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    args = parser.parse_args(argv)
    out = Console()
    err = Console(stderr=True)
    try:
        index = TraceIndex.load(args.dir)
        if args.update_id is None:
            result = summary(index)
            if args.json:
                print(json.dumps(result.to_json(), indent=2))
            else:
                out.print(render_summary(result))
            return 0 if result.spans else 1
        path = follow_update(args.update_id, index)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"fedtier trace: {escape(str(exc))}")
        return 2
    if not path.found:
        err.print(
            f"fedtier trace: no span in {escape(str(args.dir))} names update {path.update_id} "
            f"({len(index.spans)} spans read)"
        )
        return 1
    if args.json:
        print(json.dumps(path.to_json(), indent=2))
    else:
        out.print(render_path(path))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
