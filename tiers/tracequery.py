"""Follows updates through a run's span files; never imports the OTel SDK, trio or a bus.

``fedtier trace`` answers "where did update X go, and which model version included it?".

Reads the files ``protocol.telemetry.tracing.JsonLinesSpanExporter`` writes;
imports ``protocol.telemetry`` names and the standard library, never the
OpenTelemetry SDK, trio or a bus, so it works on a copy of a run's directory.
It lives with the tiers because operators run it against a production mesh's
traces. rich, when installed, draws the trees and tables; without it (a
daemon install) the same views print as plain text.

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
from typing import TYPE_CHECKING, Any, Final, Protocol

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

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = [
    "DESCRIPTION",
    "Hop",
    "SpanLookup",
    "SpanRecord",
    "TraceIndex",
    "TraceSummary",
    "UpdatePath",
    "add_arguments",
    "follow_partial",
    "follow_update",
    "int_value",
    "iter_span_file",
    "main",
    "path_text",
    "render_path",
    "render_summary",
    "run",
    "summary",
    "summary_text",
]

DESCRIPTION: Final = "Follow an update through the tiers to the model version that included it."
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


def iter_span_file(path: Path) -> Iterator[SpanRecord | None]:
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


class SpanLookup(Protocol):
    """The lookups ``follow_update`` walks: an in-memory ``TraceIndex`` or a span database.

    The trace explorer (``tiers.explorer``) answers them from sqlite, so a day of
    spans need not fit in memory to follow one update.
    """

    def children(self, span: SpanRecord, name: str) -> list[SpanRecord]:
        """Spans named ``name`` whose parent is ``span``."""
        ...

    def naming(self, item_id: str, name: str) -> list[SpanRecord]:
        """Spans named ``name`` whose update or partial id is ``item_id``."""
        ...

    def folding(self, item_id: str, process: SpanRecord | None, name: str) -> list[SpanRecord]:
        """Aggregate spans named ``name`` that list ``item_id`` or link to ``process``."""
        ...

    def resolve(self, update_id: str) -> str:
        """The full update id that ``update_id`` (a full id or a unique prefix) names."""
        ...


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
            for record in iter_span_file(path):
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
    index: SpanLookup, level: int, item_id: str | None, sender: SpanRecord | None
) -> _Trail | None:
    """The best trail that starts at a ``<tier> process`` span for ``item_id``."""
    tier = UPPER_TIERS[level]
    name = span_name(tier, "process")
    candidates = index.children(sender, name) if sender is not None else []
    if item_id is not None:
        candidates += index.naming(item_id, name)
    return _best(_after_process(index, level, item_id, process) for process in _unique(candidates))


def _after_process(
    index: SpanLookup, level: int, item_id: str | None, process: SpanRecord
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


def _after_aggregate(index: SpanLookup, level: int, aggregate: SpanRecord) -> _Trail:
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


def int_value(value: object) -> int | None:
    """An attribute value as an integer: an int, or a string of digits; else None.

    JSON-lines files keep ints; an OTLP exporter may send large ones as strings.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _int_attr(span: SpanRecord, attr: str) -> int | None:
    return int_value(span.attributes.get(attr))


def _index(source: Path | TraceIndex) -> TraceIndex:
    return source if isinstance(source, TraceIndex) else TraceIndex.load(Path(source))


def follow_update(update_id: str, source: Path | SpanLookup) -> UpdatePath:
    """Follow one update from its device through every tier to a model version.

    Args:
        update_id: the update id in hex, or a unique prefix of at least 4 digits.
        source: a run's trace directory, an index already loaded from one, or
            any other ``SpanLookup`` (the explorer's span database).

    Returns:
        The hops found, device first; ``hops`` is empty when no span names the update.

    Raises:
        ValueError: ``update_id`` is not hex or is an ambiguous prefix.
        FileNotFoundError: ``source`` is a directory that does not exist.
    """
    index: SpanLookup = (
        source if not isinstance(source, (str, Path)) else TraceIndex.load(Path(source))
    )
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


def follow_partial(partial_id: str, tier: str, source: SpanLookup) -> tuple[int | None, str]:
    """The model version that included a partial cut at ``tier``, and where its trail ends.

    Args:
        partial_id: the partial's id in hex.
        tier: the tier that cut it, ``edge`` or ``regional``.
        source: the spans, as ``follow_update`` takes them.

    Raises:
        ValueError: ``tier`` cuts no partials.
    """
    if tier not in UPPER_TIERS[:-1]:
        raise ValueError(f"tier {tier!r} cuts no partials")
    level = UPPER_TIERS.index(tier) + 1  # the tier that receives it
    trail = _from_process(source, level, partial_id.lower(), None)
    if trail is None:
        return None, f"no {UPPER_TIERS[level]} process span names partial {partial_id}"
    return trail[2], trail[1]


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
# Views are built once as rich markup; rich draws them when it is installed (the
# lab, a developer machine), and ``_plain`` strips the markup when it is not (a
# daemon install has no rich), so ``fedtier trace`` works on any fedtier install.

_MARKUP_TAG_RE: Final = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def _escape(text: str) -> str:
    """``text`` as literal rich markup (what ``rich.markup.escape`` does), without rich."""

    def escape_backslashes(match: re.Match[str]) -> str:
        backslashes, tag = match.groups()
        return f"{backslashes}{backslashes}\\{tag}"

    text = _MARKUP_TAG_RE.sub(escape_backslashes, text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def _plain(markup: str) -> str:
    """The text that rich would draw for ``markup``, without its styles."""

    def drop_tag(match: re.Match[str]) -> str:
        backslashes, tag = match.groups()
        kept = "\\" * (len(backslashes) // 2)
        return f"{kept}{tag}" if len(backslashes) % 2 else kept

    return _MARKUP_TAG_RE.sub(drop_tag, markup)


@dataclass(slots=True)
class _Node:
    """One line (or lines) of a tree view, in rich markup, and what hangs below it."""

    label: str
    children: list[_Node] = field(default_factory=list)

    def add(self, label: str) -> _Node:
        child = _Node(label)
        self.children.append(child)
        return child


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
        _escape(f"{label}{attrs[attr]}")
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
        parts.append(_escape(f"partial {_short(str(attrs[ATTR_PARTIAL_ID]))}"))
    if ATTR_MODEL_VERSION in attrs:
        version = _escape(str(attrs[ATTR_MODEL_VERSION]))
        # On a publish it is the new model; elsewhere the version the process
        # knew (a device's base version, a tier's current one).
        if hop.name.endswith("publish model"):
            parts.append(f"[bold green]model v{version}[/]")
        else:
            parts.append(f"at v{version}")
    return ", ".join(parts)


def _path_view(path: UpdatePath) -> _Node:
    """The update, then one branch per process it passed, then that process's spans."""
    if path.model_version is not None:
        head = f"update [bold]{path.update_id}[/] → [bold green]model v{path.model_version}[/]"
    else:
        head = f"update [bold]{path.update_id}[/] → [yellow]not in a model yet[/]"
    tree = _Node(head)
    if not path.hops:
        tree.add(f"[red]{_escape(path.ends)}[/]")
        return tree
    t0 = path.hops[0].start_unix_ns
    start = datetime.fromtimestamp(t0 / 1e9, tz=UTC).isoformat(timespec="milliseconds")
    branch: _Node | None = None
    branch_owner: tuple[str, str] | None = None
    trace_id = ""
    for i, hop in enumerate(path.hops):
        owner = (hop.service, hop.instance)
        if branch is None or owner != branch_owner:
            branch = tree.add(
                f"[bold]{_escape(hop.instance or '?')}[/] [dim]{_escape(hop.service)}[/]"
            )
            branch_owner = owner
        action = hop.name.split(" ", 1)[1] if " " in hop.name else hop.name
        when = start if i == 0 else f"+{_duration(hop.start_unix_ns - t0)}"
        label = (
            f"[cyan]{_escape(action)}[/]  {when}  "
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
    tree.add(f"[{style}]{_escape(path.ends)}[/]")
    return tree


def _summary_line(result: TraceSummary) -> str:
    versions = result.model_versions
    version_text = f"v{versions[0]}..v{versions[-1]} ({len(versions)})" if versions else "none"
    return (
        f"{result.spans} spans in {result.files} files from {len(result.instances)} instances; "
        f"{result.updates_seen} updates; model versions {version_text}; "
        f"{result.torn_lines} unreadable lines skipped"
    )


def render_path(path: UpdatePath) -> RenderableType:
    """A rich tree: the update, then one branch per process it passed, then that process's spans.

    Times are relative to the first hop; a trace id is shown where a new trace
    starts (the first hop and every aggregate), span ids on every hop. Needs
    rich (``fedtier[lab]``); ``path_text`` draws the same tree without it.
    """
    from rich.tree import Tree

    def grow(rich_tree: Tree, node: _Node) -> None:
        for child in node.children:
            grow(rich_tree.add(child.label), child)

    view = _path_view(path)
    tree = Tree(view.label)
    grow(tree, view)
    return tree


def path_text(path: UpdatePath) -> str:
    """The tree of ``render_path`` as plain text, for an install without rich."""
    view = _path_view(path)
    lines = _plain(view.label).splitlines()

    def grow(node: _Node, indent: str) -> None:
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            first, *more = _plain(child.label).splitlines() or [""]
            lines.append(f"{indent}{'└── ' if last else '├── '}{first}")
            below = indent + ("    " if last else "│   ")
            lines.extend(f"{below}{line}" for line in more)
            grow(child, below)

    grow(view, "")
    return "\n".join(lines)


def render_summary(result: TraceSummary) -> RenderableType:
    """A rich table of span counts, with a line on updates, versions and torn lines.

    Needs rich (``fedtier[lab]``); ``summary_text`` prints the same without it.
    """
    from rich.console import Group
    from rich.table import Table

    table = Table(title="spans per name")
    table.add_column("span")
    table.add_column("count", justify="right")
    for name, count in result.spans_per_name.items():
        table.add_row(_escape(name), str(count))
    return Group(table, _escape(_summary_line(result)))


def summary_text(result: TraceSummary) -> str:
    """The table of ``render_summary`` as plain text, for an install without rich."""
    rows = [("span", "count"), *((name, str(n)) for name, n in result.spans_per_name.items())]
    width = max(len(name) for name, _ in rows)
    count_width = max(len(count) for _, count in rows)
    lines = ["spans per name"]
    lines += [f"{name:<{width}}  {count:>{count_width}}" for name, count in rows]
    lines.append(_summary_line(result))
    return "\n".join(lines)


def _console(*, stderr: bool = False) -> Console | None:
    """A rich console, or ``None`` where rich is not installed (a daemon install)."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=stderr)


def _print_error(message: str) -> None:
    """One sentence on stderr; ``message`` is rich markup."""
    err = _console(stderr=True)
    if err is None:
        print(_plain(message), file=sys.stderr)
    else:
        err.print(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedtier trace``, on ``parser`` (its own, or the ``fedtier`` one's)."""
    parser.add_argument("update_id", nargs="?", metavar="UPDATE_ID", help="hex id or prefix")
    parser.add_argument(
        "--dir", type=Path, help="the run's trace directory (required, but for trace collect)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a tree")


def run(args: argparse.Namespace) -> int:
    """``fedtier trace`` with parsed arguments (``add_arguments``); see ``main``."""
    out = _console()
    if args.dir is None:
        # Not required by argparse: ``fedtier trace collect`` shares this parser.
        _print_error("fedtier trace: the following arguments are required: --dir")
        return 2
    try:
        index = TraceIndex.load(args.dir)
        if args.update_id is None:
            result = summary(index)
            if args.json:
                print(json.dumps(result.to_json(), indent=2))
            elif out is None:
                print(summary_text(result))
            else:
                out.print(render_summary(result))
            return 0 if result.spans else 1
        path = follow_update(args.update_id, index)
    except (FileNotFoundError, ValueError) as exc:
        _print_error(f"fedtier trace: {_escape(str(exc))}")
        return 2
    if not path.found:
        _print_error(
            f"fedtier trace: no span in {_escape(str(args.dir))} names update {path.update_id} "
            f"({len(index.spans)} spans read)"
        )
        return 1
    if args.json:
        print(json.dumps(path.to_json(), indent=2))
    elif out is None:
        print(path_text(path))
    else:
        out.print(render_path(path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier trace [UPDATE_ID] --dir DIR [--json]``; without an id, summarise the run.

    Returns:
        0 when the update (or any span, for a summary) was found, 1 when not,
        2 for an unusable argument or directory.
    """
    parser = argparse.ArgumentParser(prog="fedtier trace", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
