from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind
from rich.console import Console

from fedtier.protocol.telemetry import (
    ATTR_FLUSH_REASON,
    ATTR_INPUT_COUNT,
    ATTR_INPUT_IDS,
    ATTR_MODEL_VERSION,
    ATTR_OUTCOME,
    ATTR_PARTIAL_ID,
    ATTR_REASON,
    ATTR_UPDATE_ID,
    span_name,
)
from fedtier.protocol.telemetry.tracing import (
    TracingHandle,
    extract_context,
    inject_headers,
    link_for,
    setup_tracing,
)
from fedtier.tiers.tracequery import (
    LinkRecord,
    SpanRecord,
    TraceIndex,
    _escape,
    _plain,
    follow_update,
    main,
    path_text,
    render_path,
    summary,
)

U1, U2, U3, U4, U5 = (f"{n:02x}" * 16 for n in (0xA1, 0xA2, 0xA3, 0xB4, 0xC5))
P_EDGE_A, P_EDGE_B, P_REGIONAL = ("e0" * 16, "e1" * 16, "f0" * 16)
VERSION = 7

FULL_PATH = [
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


@dataclass
class Daemon:
    """One simulated process: its tracing handle and the contexts of its buffered inputs."""

    handle: TracingHandle
    buffered: dict[str, dict[str, str]] = field(default_factory=dict)

    def process(
        self, tier: str, item_attr: str, item: str, headers: dict[str, str], **attrs: str
    ) -> None:
        """Receive one message: a child of the sender's span, context kept as headers."""
        tracer = self.handle.tracer
        with tracer.start_as_current_span(
            span_name(tier, "process"),
            context=extract_context(headers),
            kind=SpanKind.CONSUMER,
            attributes={item_attr: item, ATTR_OUTCOME: "accepted", **attrs},
        ):
            if attrs.get(ATTR_OUTCOME, "accepted") == "accepted":
                stored: dict[str, str] = {}
                inject_headers(stored)  # what the state store would keep
                self.buffered[item] = stored

    def flush(self, tier: str, items: list[str], partial_id: str | None) -> dict[str, str]:
        """Aggregate ``items`` in a new root span linked to their process spans, then send."""
        tracer = self.handle.tracer
        links = [
            link
            for item in items
            if (link := link_for(extract_context(self.buffered.pop(item)))) is not None
        ]
        headers: dict[str, str] = {}
        with tracer.start_as_current_span(
            span_name(tier, "aggregate"),
            context=Context(),  # a new root, whatever is current
            links=links,
            attributes={
                ATTR_INPUT_IDS: items,
                ATTR_INPUT_COUNT: len(items),
                ATTR_FLUSH_REASON: "count",
            },
        ):
            if partial_id is None:
                with tracer.start_as_current_span(
                    span_name(tier, "publish model"), attributes={ATTR_MODEL_VERSION: VERSION}
                ):
                    pass
            else:
                with tracer.start_as_current_span(
                    span_name(tier, "send"),
                    kind=SpanKind.PRODUCER,
                    attributes={ATTR_PARTIAL_ID: partial_id},
                ):
                    inject_headers(headers)
        return headers


def _daemon(run: Path, service: str, instance: str) -> Daemon:
    return Daemon(setup_tracing(service, instance_id=instance, jsonl_dir=run, set_global=False))


def _build_run(run: Path) -> None:
    """Three tiers as separate processes would trace them, each into its own file."""
    fleet = _daemon(run, "fedtier-device", "fleet-1")
    edge_a = _daemon(run, "fedtier-edge", "edge-a")
    edge_b = _daemon(run, "fedtier-edge", "edge-b")
    regional = _daemon(run, "fedtier-regional", "reg-eu")
    central = _daemon(run, "fedtier-central", "central")

    sent: dict[str, dict[str, str]] = {}
    for update in (U1, U2, U3, U4, U5):
        with fleet.handle.tracer.start_as_current_span(
            span_name("device", "send"), kind=SpanKind.PRODUCER, attributes={ATTR_UPDATE_ID: update}
        ):
            sent[update] = {}
            inject_headers(sent[update])

    edge_a.process("edge", ATTR_UPDATE_ID, U1, sent[U1])
    edge_a.process("edge", ATTR_UPDATE_ID, U2, sent[U2])
    edge_a.process("edge", ATTR_UPDATE_ID, U3, sent[U3])  # stays in the buffer
    # U1 redelivered after a lost PUBACK: recognised and not folded again.
    edge_a.process("edge", ATTR_UPDATE_ID, U1, sent[U1], **{ATTR_OUTCOME: "duplicate"})
    edge_a.process(
        "edge",
        ATTR_UPDATE_ID,
        U5,
        sent[U5],
        **{ATTR_OUTCOME: "rejected", ATTR_REASON: "bad_signature"},
    )
    edge_b.process("edge", ATTR_UPDATE_ID, U4, sent[U4])
    to_regional_a = edge_a.flush("edge", [U1, U2], P_EDGE_A)
    to_regional_b = edge_b.flush("edge", [U4], P_EDGE_B)

    regional.process("regional", ATTR_PARTIAL_ID, P_EDGE_A, to_regional_a)
    regional.process("regional", ATTR_PARTIAL_ID, P_EDGE_B, to_regional_b)
    to_central = regional.flush("regional", [P_EDGE_A, P_EDGE_B], P_REGIONAL)

    central.process("central", ATTR_PARTIAL_ID, P_REGIONAL, to_central)
    central.flush("central", [P_REGIONAL], None)

    for daemon in (fleet, edge_a, edge_b, regional, central):
        daemon.handle.shutdown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("OTEL_"):
                mp.delenv(name)
        _build_run(run)
    return run


def test_an_update_is_followed_to_the_model_version(run_dir: Path) -> None:
    path = follow_update(U1, run_dir)
    assert [hop.name for hop in path.hops] == FULL_PATH
    assert path.model_version == VERSION
    assert path.ends == f"included in model v{VERSION}"
    instances = [hop.instance for hop in path.hops]
    assert instances == ["fleet-1", "edge-a", "edge-a", "edge-a"] + ["reg-eu"] * 3 + ["central"] * 3
    assert path.hops[1].attributes[ATTR_OUTCOME] == "accepted"  # not the duplicate delivery
    assert path.hops[3].attributes[ATTR_PARTIAL_ID] == P_EDGE_A
    assert path.hops[6].attributes[ATTR_PARTIAL_ID] == P_REGIONAL
    assert path.hops[-1].attributes[ATTR_MODEL_VERSION] == VERSION
    starts = [hop.start_unix_ns for hop in path.hops]
    assert starts == sorted(starts)
    # Each aggregate starts a new trace; send and process continue it.
    assert path.hops[0].trace_id == path.hops[1].trace_id != path.hops[2].trace_id
    assert path.hops[3].trace_id == path.hops[4].trace_id


def test_updates_folded_together_share_every_hop_above_the_edge(run_dir: Path) -> None:
    one, two = follow_update(U1, run_dir), follow_update(U2, run_dir)
    assert [h.span_id for h in one.hops[:2]] != [h.span_id for h in two.hops[:2]]
    assert [h.span_id for h in one.hops[2:]] == [h.span_id for h in two.hops[2:]]
    other_edge = follow_update(U4, run_dir)
    assert other_edge.hops[1].instance == "edge-b"
    assert [h.span_id for h in other_edge.hops[5:]] == [h.span_id for h in one.hops[5:]]


def test_an_update_never_aggregated_ends_at_its_edge_process(run_dir: Path) -> None:
    path = follow_update(U3, run_dir)
    assert [hop.name for hop in path.hops] == ["device send", "edge process"]
    assert path.model_version is None
    assert "waiting in edge edge-a" in path.ends


def test_a_rejected_update_says_why(run_dir: Path) -> None:
    path = follow_update(U5, run_dir)
    assert [hop.name for hop in path.hops] == ["device send", "edge process"]
    assert path.ends == "rejected at edge edge-a: bad_signature"


def test_unknown_ids_and_prefixes(run_dir: Path) -> None:
    assert not follow_update("ff" * 16, run_dir).found
    assert follow_update(U1[:8].upper(), run_dir).model_version == VERSION
    with pytest.raises(ValueError, match="not hexadecimal"):
        follow_update("xyz", run_dir)


def test_summary_counts_the_run(run_dir: Path) -> None:
    result = summary(run_dir)
    assert result.files == 5
    assert result.torn_lines == 0
    assert result.updates_seen == 5
    assert result.model_versions == (VERSION,)
    assert result.spans_per_name["device send"] == 5
    assert result.spans_per_name["edge process"] == 6
    assert result.spans_per_name["central publish model"] == 1
    assert "fedtier-edge/edge-b" in result.instances


def test_a_torn_last_line_is_skipped(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy" / "nested"
    copy.mkdir(parents=True)
    for src in run_dir.glob("*.jsonl"):
        (copy / src.name).write_bytes(src.read_bytes())
    with (copy / "fedtier-central-central.jsonl").open("ab") as f:
        f.write(b'{"trace_id": "0af7651916cd43dd84')  # the process was killed mid-line
    index = TraceIndex.load(tmp_path / "copy")  # recursive
    assert index.torn_lines == 1
    assert follow_update(U1, index).model_version == VERSION


def test_links_alone_lead_to_the_aggregate() -> None:
    """With more inputs than the link limit the ids lead; with no ids, links still do."""

    def span(name: str, span_id: str, **kw: object) -> SpanRecord:
        fields: dict[str, object] = {
            "trace_id": kw.pop("trace_id", "1" * 32),
            "span_id": span_id,
            "parent_span_id": None,
            "name": name,
            "start_unix_ns": int(span_id, 16),
            "end_unix_ns": int(span_id, 16) + 1,
            "attributes": {},
            "links": (),
            "resource": {"service.instance.id": "e"},
        }
        fields.update(kw)
        return SpanRecord(**fields)  # type: ignore[arg-type]

    process = span("edge process", "01" * 8, attributes={ATTR_UPDATE_ID: U1})
    aggregate = span(
        "edge aggregate", "02" * 8, trace_id="2" * 32, links=(LinkRecord("1" * 32, "01" * 8, {}),)
    )
    send = span(
        "edge send",
        "03" * 8,
        trace_id="2" * 32,
        parent_span_id="02" * 8,
        attributes={ATTR_PARTIAL_ID: P_EDGE_A},
    )
    path = follow_update(U1, TraceIndex([process, aggregate, send]))
    assert [h.name for h in path.hops] == ["edge process", "edge aggregate", "edge send"]
    assert path.ends == "sent by edge; no regional process span yet"


def test_render_path_draws_the_tree(run_dir: Path) -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_path(follow_update(U1, run_dir)))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"model v{VERSION}" in text
    lines = [line for line in text.splitlines() if "took" in line]
    assert len(lines) == len(FULL_PATH)
    for line, name in zip(lines, FULL_PATH, strict=True):
        assert name.split(" ", 1)[1] in line
    for instance in ("fleet-1", "edge-a", "reg-eu", "central"):
        assert instance in text


def test_main_prints_json_and_trees(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([U1, "--dir", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_version"] == VERSION
    assert [h["name"] for h in result["hops"]] == FULL_PATH

    assert main([U3[:6], "--dir", str(run_dir)]) == 0
    assert "waiting in edge" in capsys.readouterr().out

    assert main(["--dir", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_versions"] == [VERSION]

    assert main(["ff" * 16, "--dir", str(run_dir)]) == 1
    assert "no span" in capsys.readouterr().err

    assert main([U1, "--dir", str(run_dir / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtier trace: trace directory")
    assert "Traceback" not in err


def _drawn(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def test_plain_tree_is_the_rich_tree_without_styles(run_dir: Path) -> None:
    path = follow_update(U1, run_dir)
    drawn = [line.rstrip() for line in _drawn(render_path(path)).splitlines()]
    assert path_text(path).splitlines() == drawn


@pytest.mark.parametrize(
    "text", ["plain", "[bold]not a tag[/]", "a\\[red]b", "ends in \\", "x[1]", "[/]\\\\[b]"]
)
def test_escape_matches_rich_and_plain_undoes_it(text: str) -> None:
    from rich.markup import escape
    from rich.text import Text

    assert _escape(text) == escape(text)
    assert _plain(f"[bold]{_escape(text)}[/]") == Text.from_markup(f"[bold]{escape(text)}[/]").plain


def test_main_without_rich_prints_plain_text(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon install has no rich: the same views, as plain text."""
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "rich", None)
    assert main([U1, "--dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"update {U1} → model v{VERSION}" in out
    assert "[" not in out
    assert main(["--dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spans per name\n")
    assert "central publish model" in out
    assert main([U1, "--dir", str(run_dir / "missing")]) == 2
    assert capsys.readouterr().err.startswith("fedtier trace: trace directory")
