"""``fedtier demo``: a whole mesh and a 240-device fleet on one machine, live; imports anything.

What runs (``simulations.mesh`` builds and starts it): one Mosquitto for the
four sites (per-site topics) and one nats-server with JetStream, on free
loopback ports in a temporary directory; 1 central, 2 regional and 4 edge
daemons (2 sites per region), each a separate ``python -m fedtier``
process; and one fleet process per site (``simulations.fleet``): vehicles,
factory machines and IoT gateways training a 64-32-10 MLP on non-IID shards
of scikit-learn's digits. A few IoT gateways now and then send a malformed or
badly signed update, which the edges reject.

This process watches it all like an operator would:

* the model: it subscribes to one site's retained model topics over MQTT,
  verifies each version with the central's pinned key (``client.model_store``,
  as a device does) and evaluates it on the held-out 20% no device has seen;
* the edges' Prometheus endpoints (``fedtier_updates_total{outcome,reason}``,
  ``fedtier_update_bytes``): accepted and rejected updates per second, bytes;
* the fleets' JSON progress lines: devices online, participation.

It stops when ``duration_s`` of training has passed or, earlier, once the
target accuracy has held for a few versions, then stops every process in
order (fleets, edges, regionals, central: SIGTERM, SIGKILL past a deadline),
the brokers, and removes the temporary directory. Ctrl-C takes the same path.
Artefacts stay in ``--out`` (default ``./fedtier-demo-out``): span files
(``traces/``), device logs (``devices/``), process logs (``logs/``),
``accuracy.png`` and ``summary.json``. With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_TRACES_EXPORTER=otlp``) set, every process also exports its spans there
(``simulations.mesh.child_environment``); the span files are written anyway.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import trio

from fedtier.protocol.errors import ChildFailed, ConfigError, FedtierError, sole_error
from fedtier.protocol.telemetry.tracing import otlp_requested
from fedtier.simulations.mesh import (
    LAB_OBSERVER,
    MeshPlan,
    MeshSpec,
    RunningMesh,
    open_brokers,
    open_mesh,
    prepare_mesh,
)
from fedtier.tiers.config import load_config
from fedtier.tiers.store import read_latest_version

__all__ = ["DemoControl", "DemoOptions", "DemoResult", "main_demo", "run_demo"]

DEFAULT_DURATION_S: Final = 120.0
DEFAULT_DEVICES: Final = 240
DEFAULT_OUT: Final = Path("fedtier-demo-out")
_REFRESH_S: Final = 0.25
_SCRAPE_S: Final = 1.0
_RATE_WINDOW_S: Final = 3.0
_QUIET_EVERY_S: Final = 5.0
_STOP_GRACE_S: Final = 15.0
_FLEET_START_TIMEOUT_S: Final = 60.0
_METRIC_RE: Final = re.compile(r"^(fedtier_[a-z_]+)\{([^}]*)\} (\S+)$", re.M)
_LABEL_RE: Final = re.compile(r'(\w+)="([^"]*)"')
# Only our own artefacts are cleared from --out before a run.
_ARTEFACTS: Final = ("traces", "devices", "logs", "accuracy.png", "summary.json")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``fedtier demo`` was asked for.

    Attributes:
        duration_s: training time before the demo stops (start-up and
            shutdown come on top: about 10 s and 5 s here).
        devices: devices in the fleet.
        out: the artefact directory.
        seed: seeds keys' order, data split and device behaviour.
        quiet: plain progress lines instead of the live display.
        keep_temp: keep the temporary directory (keys, configs, state, brokers).
        target_accuracy: stop early once this held-out accuracy ...
        hold_versions: ... held for this many versions in a row.
        updates_per_s: device updates per second the fleet aims at.
        tls: run the brokers as ``deploy/`` configures them: TLS listeners
            that require a client certificate (one per device and daemon, from
            a CA made for the run), Mosquitto with the deployed ACL.
    """

    duration_s: float = DEFAULT_DURATION_S
    devices: int = DEFAULT_DEVICES
    out: Path = DEFAULT_OUT
    seed: int = 0
    quiet: bool = False
    keep_temp: bool = False
    target_accuracy: float = 0.94
    hold_versions: int = 5
    updates_per_s: float = 15.0
    tls: bool = False


@dataclass(eq=False)
class DemoControl:
    """How a caller stops a running demo early.

    Attributes:
        stop_requested: set it to end training now; the demo then stops like
            at the end of its duration (processes in order, artefacts written).
        training: True once training runs (before, only cancelling stops it).
        reason: the stop reason the demo reports for a requested stop.
    """

    stop_requested: trio.Event = field(default_factory=trio.Event)
    training: bool = False
    reason: str = "stop requested"


@dataclass(slots=True)
class AccuracyPoint:
    """One evaluated model version."""

    t_s: float
    version: int
    accuracy: float
    update_count: int | None


@dataclass(slots=True)
class DemoResult:
    """What a demo run did (also written as ``summary.json``)."""

    stop_reason: str = "not started"
    wall_s: float = 0.0
    training_s: float = 0.0
    training_started_s: float | None = None
    target_accuracy: float | None = None
    devices: int = 0
    versions: int = 0
    initial_accuracy: float | None = None
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    updates_accepted: int = 0
    updates_rejected: dict[str, int] = field(default_factory=dict)
    updates_in_versions: int = 0
    participation: float = 0.0
    bytes_uploaded: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    history: list[AccuracyPoint] = field(default_factory=list)
    trace_dir: str = ""
    example_update: str | None = None
    example_path: list[str] = field(default_factory=list)
    example_version: int | None = None
    plot: str | None = None
    summary: str | None = None
    temp_dir: str | None = None


class _State:
    """Everything the display shows; written by the watcher tasks, read by the renderer."""

    def __init__(self, plan: MeshPlan | None = None) -> None:
        self.started = time.monotonic()
        self.phase = "starting brokers"
        self.plan = plan
        self.training_started: float | None = None
        self.history: list[AccuracyPoint] = []
        self.update_counts: dict[int, int] = {}
        self.fleets: dict[str, dict[str, Any]] = {}
        self.fleets_ready: set[str] = set()
        self.fleets_changed = trio.lowlevel.ParkingLot()
        self.edge_totals: dict[tuple[str, str], float] = {}
        self.edge_bytes = 0.0
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=64)
        self.version_changed = trio.lowlevel.ParkingLot()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def training_elapsed(self) -> float:
        return 0.0 if self.training_started is None else time.monotonic() - self.training_started

    def accepted(self) -> int:
        return int(sum(n for (outcome, _), n in self.edge_totals.items() if outcome == "accepted"))

    def rejected(self) -> dict[str, int]:
        return {
            reason or "unspecified": int(n)
            for (outcome, reason), n in sorted(self.edge_totals.items())
            if outcome == "rejected"
        }

    def rates(self) -> tuple[float, float]:
        """Accepted and rejected updates per second over the last few seconds."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        now = self.samples[-1]
        old = next((s for s in self.samples if now[0] - s[0] <= _RATE_WINDOW_S), self.samples[0])
        span = now[0] - old[0]
        if span <= 0:
            return 0.0, 0.0
        return (now[1] - old[1]) / span, (now[2] - old[2]) / span

    def fleet_sum(self, key: str) -> int:
        return sum(int(f.get(key, 0)) for f in self.fleets.values())

    def injected(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for f in self.fleets.values():
            out.update({str(k): int(v) for k, v in dict(f.get("injected", {})).items()})
        return dict(out)


# -- the model watcher ----------------------------------------------------------------


def _mlp_accuracy(
    tensors: Sequence[npt.NDArray[np.floating]],
    X: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
) -> float:
    """Held-out accuracy of Linear-ReLU-Linear weights (state-dict order: W1, b1, W2, b2)."""
    w1, b1, w2, b2 = (np.asarray(t, dtype=np.float32) for t in tensors)
    hidden = np.maximum(X @ w1.T + b1, 0.0)
    logits = hidden @ w2.T + b2
    return float((logits.argmax(axis=1) == y).mean())


async def _watch_models(plan: MeshPlan, state: _State) -> None:
    """Verify and evaluate every model version one site's edge relays (retained MQTT topics)."""
    from fedtier.client.model_store import ModelStore, OfferStatus
    from fedtier.protocol.bus import Delivery, Subscription
    from fedtier.protocol.bus.mqtt import open_mqtt_bus
    from fedtier.protocol.envelope import open_envelope
    from fedtier.protocol.errors import RemoteProtocolError
    from fedtier.protocol.files import load_public_key
    from fedtier.protocol.messages import ModelAnnouncement
    from fedtier.protocol.names import MqttTopics
    from fedtier.tiers.config import load_initial_model

    layout, _ = load_initial_model(plan.initial_model)
    central_key = load_public_key(plan.central_key_file)
    store = ModelStore(central_key, layout, plan.spec.fleet)
    topics = MqttTopics(plan.spec.fleet, plan.spec.sites[0])
    X, y = plan.split.X_test, plan.split.y_test
    config = plan.mqtt_config("fedtier-demo-watch", LAB_OBSERVER)

    def on_pointer(delivery: Delivery) -> None:
        try:
            envelope = open_envelope(delivery.payload, {central_key.key_id: central_key})
        except RemoteProtocolError:
            return
        message = envelope.message
        if isinstance(message, ModelAnnouncement):
            state.update_counts[message.version] = message.update_count
            # Edges relay the blob before its pointer: fill in the count late.
            for point in reversed(state.history):
                if point.version == message.version:
                    point.update_count = message.update_count
                    break

    def on_blob(delivery: Delivery) -> None:
        offer = store.offer_blob(delivery.payload)
        current = store.current
        if offer.status is not OfferStatus.LOADED or current is None:
            return
        version, params = current
        accuracy = _mlp_accuracy(list(layout.unflatten(params).values()), X, y)
        state.history.append(
            AccuracyPoint(state.elapsed(), version, accuracy, state.update_counts.get(version))
        )
        state.version_changed.unpark_all()

    async def pump(sub: Subscription, handle: Callable[[Delivery], None]) -> None:
        while True:
            delivery = await sub.receive()
            handle(delivery)
            await delivery.ack()

    async with (
        open_mqtt_bus(config) as bus,
        bus.subscribe(topics.model_pointer()) as pointers,
        bus.subscribe(topics.model_blob()) as blobs,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(pump, pointers, on_pointer)
        nursery.start_soon(pump, blobs, on_blob)


# -- the metrics scraper ----------------------------------------------------------------


def _scrape(urls: Sequence[str]) -> tuple[dict[tuple[str, str], float], float]:
    """Sum ``fedtier_updates_total`` by (outcome, reason) and the update bytes over the edges."""
    totals: dict[tuple[str, str], float] = {}
    size = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:  # noqa: S310 - our loopback URL
                text = resp.read().decode("utf-8", "replace")
        except OSError:
            continue  # an edge starting or stopping; the next scrape catches up
        for name, labels, value in _METRIC_RE.findall(text):
            if name == "fedtier_updates_total":
                tags = dict(_LABEL_RE.findall(labels))
                key = (tags.get("outcome", ""), tags.get("reason", ""))
                totals[key] = totals.get(key, 0.0) + float(value)
            elif name == "fedtier_update_bytes_sum":
                size += float(value)
    return totals, size


async def _scrape_edges(plan: MeshPlan, state: _State) -> None:
    urls = list(plan.edge_metrics_urls.values())
    while True:
        totals, size = await trio.to_thread.run_sync(_scrape, urls)
        if totals:
            # Counters only grow; a missed edge must not make the sum dip.
            for key, value in totals.items():
                state.edge_totals[key] = max(state.edge_totals.get(key, 0.0), value)
            state.edge_bytes = max(state.edge_bytes, size)
        rejected = sum(state.rejected().values())
        state.samples.append((state.elapsed(), state.accepted(), rejected))
        await trio.sleep(_SCRAPE_S)


def _fleet_line(state: _State) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        try:
            data = json.loads(line)
        except ValueError:
            return
        if isinstance(data, dict) and isinstance(data.get("fleet"), str):
            state.fleets[data["fleet"]] = data
            if data.get("type") == "ready":
                state.fleets_ready.add(data["fleet"])
                state.fleets_changed.unpark_all()

    return on_line


# -- display ------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _sparkline(values: Sequence[float], width: int = 40) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    values = list(values)[-width:]
    return "".join(bars[min(len(bars) - 1, max(0, int(v * len(bars))))] for v in values)


def _render(state: _State, options: DemoOptions) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", justify="right")
    table.add_column()
    newest = state.history[-1] if state.history else None
    train_s = state.training_elapsed()
    table.add_row(
        "elapsed",
        f"{state.elapsed():6.1f} s   training {train_s:5.1f} / {options.duration_s:.0f} s",
    )
    table.add_row("phase", state.phase)
    if newest is not None:
        first = state.history[0].accuracy
        best = max(p.accuracy for p in state.history)
        table.add_row("model version", f"v{newest.version}")
        table.add_row(
            "held-out accuracy",
            f"[bold green]{newest.accuracy:.3f}[/]   (v{state.history[0].version}: {first:.3f},"
            f" best {best:.3f}, target {options.target_accuracy:.2f})",
        )
        table.add_row("", Text(_sparkline([p.accuracy for p in state.history]), style="green"))
    accepted_rate, rejected_rate = state.rates()
    rejected = state.rejected()
    reasons = ", ".join(f"{r} {n}" for r, n in rejected.items()) or "none"
    table.add_row(
        "updates accepted",
        f"{accepted_rate:5.1f}/s   total {state.accepted():,}",
    )
    table.add_row(
        "updates rejected",
        f"{rejected_rate:5.1f}/s   total {sum(rejected.values()):,} ({reasons})",
    )
    devices = state.plan.spec.devices if state.plan is not None else options.devices
    participants = state.fleet_sum("participants")
    table.add_row(
        "participation",
        f"{participants}/{devices} devices with an accepted update"
        f" ({participants / devices:.0%}); {state.fleet_sum('online')} online now",
    )
    table.add_row("bytes uploaded", _fmt_bytes(state.edge_bytes or state.fleet_sum("bytes_sent")))
    injected = state.injected()
    if injected:
        table.add_row(
            "bad input sent",
            ", ".join(f"{k} {v}" for k, v in sorted(injected.items()))
            + "  (by misbehaving gateways, on purpose)",
        )
    versions = len({p.version for p in state.history})
    counted = [n for v, n in state.update_counts.items() if v > 0]
    if counted:
        table.add_row(
            "versions",
            f"{len(counted)} after v0 ({versions} evaluated here);"
            f" {sum(counted) / len(counted):.1f} updates per version",
        )
    title = (
        "fedtier demo: 1 central, 2 regional, 4 edge daemons; "
        f"{devices} devices (vehicles, factory machines, IoT gateways)"
    )
    return Panel(Group(table), title=title, border_style="blue")


async def _show_live(state: _State, options: DemoOptions) -> None:
    from rich.console import Console
    from rich.live import Live

    # auto_refresh=False: no rich thread; this task refreshes from trio.
    with Live(
        _render(state, options), console=Console(), auto_refresh=False, transient=False
    ) as live:
        try:
            while True:
                live.update(_render(state, options), refresh=True)
                await trio.sleep(_REFRESH_S)
        finally:
            live.update(_render(state, options), refresh=True)


async def _show_plain(state: _State, options: DemoOptions) -> None:
    last_phase = ""
    next_at = 0.0
    while True:
        if state.phase != last_phase or state.elapsed() >= next_at:
            last_phase = state.phase
            next_at = state.elapsed() + _QUIET_EVERY_S
            newest = state.history[-1] if state.history else None
            model = f"v{newest.version} acc {newest.accuracy:.3f}" if newest else "no model yet"
            accepted_rate, _ = state.rates()
            print(
                f"[{state.elapsed():6.1f}s] {state.phase}: {model}; "
                f"accepted {state.accepted()} ({accepted_rate:.1f}/s), "
                f"rejected {sum(state.rejected().values())}, "
                f"participants {state.fleet_sum('participants')}",
                flush=True,
            )
        await trio.sleep(_REFRESH_S)


# -- the run ------------------------------------------------------------------------


def _held_target(state: _State, options: DemoOptions) -> bool:
    recent = state.history[-options.hold_versions :]
    return (
        len(recent) == options.hold_versions
        and recent[0].version > 0
        and all(p.accuracy >= options.target_accuracy for p in recent)
    )


async def _train_until_done(
    mesh: RunningMesh, state: _State, options: DemoOptions, control: DemoControl
) -> str:
    """Return why training stopped: duration, target accuracy, or raise if a process died."""
    reason = f"duration of {options.duration_s:g} s reached"
    async with trio.open_nursery() as nursery:

        async def until_stop_requested() -> None:
            nonlocal reason
            await control.stop_requested.wait()
            reason = control.reason
            nursery.cancel_scope.cancel()

        async def until_target() -> None:
            nonlocal reason
            while not _held_target(state, options):
                await state.version_changed.park()
            reason = (
                f"target accuracy {options.target_accuracy:.2f} held for "
                f"{options.hold_versions} versions"
            )
            nursery.cancel_scope.cancel()

        async def until_failure() -> None:
            child = await mesh.wait_failed()
            raise ChildFailed(child.describe_exit())

        nursery.start_soon(until_failure)
        nursery.start_soon(until_stop_requested)
        # The clock starts once every fleet has built its devices (torch,
        # keys, data): training time is what the duration is about.
        with trio.move_on_after(_FLEET_START_TIMEOUT_S):
            while len(state.fleets_ready) < len(mesh.fleets):
                await state.fleets_changed.park()
        state.training_started = time.monotonic()
        state.phase = "training"
        control.training = True
        nursery.start_soon(until_target)
        await trio.sleep(options.duration_s)
        nursery.cancel_scope.cancel()
    return reason


async def run_demo(
    options: DemoOptions,
    *,
    result: DemoResult | None = None,
    control: DemoControl | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring); ``result`` is filled in as it goes.

    ``control.stop_requested`` ends training early the normal way (Ctrl-C in
    ``main_demo``). Cancellation stops every process and removes the temporary
    directory before it propagates, without writing the plot and summary;
    ``result`` then says how far it got.

    Raises:
        ConfigError: bad options or a missing broker binary.
        ChildFailed: a daemon or fleet exited on its own.
    """
    if options.devices < 4:
        raise ConfigError(f"--devices is {options.devices}; the demo needs at least 4 (4 sites)")
    if not options.duration_s > 0:
        raise ConfigError(f"--duration-s is {options.duration_s}; expected a number > 0")
    result = result if result is not None else DemoResult()
    control = control if control is not None else DemoControl()
    out = options.out.resolve()
    _clear_artefacts(out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fedtier-demo-"))
    result.temp_dir = str(workdir)
    state = _State()
    spec = MeshSpec(
        devices=options.devices,
        seed=options.seed,
        updates_per_s=options.updates_per_s,
        # Fleets end by themselves even if this process were killed outright.
        fleet_duration_s=options.duration_s + _FLEET_START_TIMEOUT_S + _STOP_GRACE_S,
    )
    plan: MeshPlan | None = None
    cpu_before = os.times()
    try:
        async with trio.open_nursery() as display:
            display.start_soon(_show_plain if options.quiet else _show_live, state, options)
            try:
                tls_for = spec if options.tls else None
                async with open_brokers(workdir / "brokers", tls_for=tls_for) as brokers:
                    state.phase = "writing keys, data and configs"
                    plan = await trio.to_thread.run_sync(prepare_mesh, spec, workdir, out, brokers)
                    state.plan = plan
                    state.phase = "starting the daemons"
                    async with (
                        open_mesh(plan, stop_grace_s=_STOP_GRACE_S) as mesh,
                        trio.open_nursery() as watchers,
                    ):
                        watchers.start_soon(_watch_models, plan, state)
                        watchers.start_soon(_scrape_edges, plan, state)
                        state.phase = "starting the fleets"
                        await mesh.start_fleets(_fleet_line(state))
                        try:
                            result.stop_reason = await _train_until_done(
                                mesh, state, options, control
                            )
                        finally:
                            result.training_s = state.training_elapsed()
                            # Final numbers before the edges go away.
                            with trio.CancelScope(shield=True):
                                totals, size = await trio.to_thread.run_sync(
                                    _scrape, list(plan.edge_metrics_urls.values())
                                )
                            for key, value in totals.items():
                                state.edge_totals[key] = max(state.edge_totals.get(key, 0.0), value)
                            state.edge_bytes = max(state.edge_bytes, size)
                            state.phase = "stopping: fleets, edges, regionals, central"
                            watchers.cancel_scope.cancel()
                    state.phase = "stopping the brokers"
            finally:
                display.cancel_scope.cancel()
    finally:
        _collect(result, state, options, plan)
        children = os.times()
        result.cpu_s = {
            "children": round(
                children.children_user
                + children.children_system
                - cpu_before.children_user
                - cpu_before.children_system,
                1,
            ),
            "demo": round(children.user + children.system - cpu_before.user - cpu_before.system, 1),
        }
        if options.keep_temp:
            result.temp_dir = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            result.temp_dir = None
    assert plan is not None
    await trio.to_thread.run_sync(_finish_artefacts, result, plan, out)
    result.wall_s = round(state.elapsed(), 1)
    return result


def _clear_artefacts(out: Path) -> None:
    for name in _ARTEFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _collect(
    result: DemoResult, state: _State, options: DemoOptions, plan: MeshPlan | None
) -> None:
    result.wall_s = round(state.elapsed(), 1)
    result.devices = options.devices
    result.target_accuracy = options.target_accuracy
    if state.training_started is not None:
        result.training_started_s = round(state.training_started - state.started, 2)
    result.history = list(state.history)
    result.versions = len({p.version for p in state.history if p.version > 0})
    if plan is not None:
        # The watcher evaluates versions as it sees them and may be behind at
        # the stop; the central's store says how many were made.
        result.versions = max(result.versions, _versions_made(plan))
    if state.history:
        result.initial_accuracy = state.history[0].accuracy
        result.final_accuracy = state.history[-1].accuracy
        result.best_accuracy = max(p.accuracy for p in state.history)
    result.updates_accepted = state.accepted()
    result.updates_rejected = state.rejected()
    result.updates_in_versions = sum(n for v, n in state.update_counts.items() if v > 0)
    result.participation = state.fleet_sum("participants") / max(1, options.devices)
    result.bytes_uploaded = int(state.edge_bytes)
    result.injected = state.injected()
    if plan is not None:
        result.trace_dir = str(plan.trace_dir)


def _versions_made(plan: MeshPlan) -> int:
    """How many versions after v0 the central stored (0 when its store cannot be read)."""
    try:
        latest = read_latest_version(load_config("central", plan.central_config).store_path)
    except (FedtierError, OSError):
        return 0
    return 0 if latest is None else latest.version


def _finish_artefacts(result: DemoResult, plan: MeshPlan, out: Path) -> None:
    """After every process stopped: find a traced update, draw the plot, write the summary."""
    from fedtier.tiers.tracequery import TraceIndex, follow_update

    index = TraceIndex.load(plan.trace_dir) if plan.trace_dir.is_dir() else None
    if index is not None:
        for update_id in _accepted_update_ids(plan.device_log_dir):
            path = follow_update(update_id, index)
            if path.model_version is not None:
                result.example_update = update_id
                result.example_version = path.model_version
                result.example_path = [hop.name for hop in path.hops]
                break
    if result.history:
        result.plot = str(_plot(result, out / "accuracy.png"))
    summary = out / "summary.json"
    body = asdict(result)
    body["summary"] = str(summary)
    summary.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    result.summary = str(summary)


def _accepted_update_ids(log_dir: Path, limit: int = 200) -> list[str]:
    """Update ids the edges accepted, oldest first (the likeliest to be in a version)."""
    found: list[tuple[float, str]] = []
    for path in sorted(log_dir.glob("*.jsonl")) if log_dir.is_dir() else []:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "receipt_accepted":
                    found.append((float(entry.get("time_s", 0.0)), str(entry["update_id"])))
                    break  # a device's first accepted update is enough
    return [uid for _, uid in sorted(found)[:limit]]


def _plot(result: DemoResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [p.t_s for p in result.history]
    accuracy = [p.accuracy for p in result.history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(times, accuracy, marker=".", linewidth=1.2, color="tab:blue", label="newest version")
    if result.training_started_s is not None:
        ax.axvline(result.training_started_s, color="gray", linestyle="--", label="fleets ready")
    if result.target_accuracy is not None and result.target_accuracy <= 1.0:
        ax.axhline(result.target_accuracy, color="tab:green", linestyle=":", label="target")
    ax.legend(loc="lower right")
    ax.set_xlabel("seconds since the demo started")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    last = result.history[-1]
    ax.annotate(
        f"v{last.version}: {last.accuracy:.3f}",
        (last.t_s, last.accuracy),
        textcoords="offset points",
        xytext=(-60, -25),
    )
    ax.set_title(
        f"fedtier demo: {result.devices} devices, {result.versions} versions, "
        f"{result.updates_accepted:,} updates accepted"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the command ----------------------------------------------------------------------


def _otlp_destination() -> str | None:
    """Where the children export spans over OTLP besides their files, or ``None``."""
    if not otlp_requested():
        return None
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "the OTLP exporter's default endpoint"
    )


def _print_report(result: DemoResult, options: DemoOptions) -> None:
    acc = (
        f"{result.final_accuracy:.3f} (version 0: {result.initial_accuracy:.3f}, "
        f"best {result.best_accuracy:.3f})"
        if result.final_accuracy is not None and result.initial_accuracy is not None
        else "no model evaluated"
    )
    rejected = sum(result.updates_rejected.values())
    reasons = ", ".join(f"{r} {n}" for r, n in result.updates_rejected.items()) or "none"
    lines = [
        f"stopped: {result.stop_reason}",
        f"held-out accuracy: {acc}",
        f"model versions: {result.versions}; updates accepted: {result.updates_accepted:,}"
        f" ({result.updates_in_versions:,} folded into versions), rejected: {rejected}"
        f" ({reasons})",
        f"participation: {result.participation:.0%} of {result.devices} devices;"
        f" uploaded {_fmt_bytes(result.bytes_uploaded)}",
        f"wall time {result.wall_s:.1f} s (training {result.training_s:.1f} s); CPU: processes"
        f" {result.cpu_s.get('children', 0):.1f} s, this one {result.cpu_s.get('demo', 0):.1f} s",
        f"traces: {result.trace_dir} (one JSON-lines file per process)",
    ]
    otlp = _otlp_destination()
    if otlp is not None:
        lines.append(f"traces also exported over OTLP/HTTP to {otlp}")
    if result.example_update is not None:
        lines += [
            f"update {result.example_update} reached model v{result.example_version}: "
            + " -> ".join(result.example_path),
            f"  follow it: fedtier trace {result.example_update} --dir {result.trace_dir}",
        ]
    elif result.summary is not None:
        lines.append("no device update could be followed to a model version in the traces")
    if result.plot:
        lines.append(f"accuracy plot: {result.plot}")
    if result.summary:
        lines.append(f"summary: {result.summary}")
    if result.temp_dir:
        lines.append(f"temporary directory kept: {result.temp_dir}")
    print("\n".join(lines), flush=True)


async def _run_with_signals(options: DemoOptions, result: DemoResult) -> bool:
    """Run the demo under SIGINT/SIGTERM handling; returns True when a signal stopped it.

    The first signal during training ends it the normal way (every process
    stopped in order, artefacts written); before training, or a second
    signal, cancels the run, which still stops every process and removes the
    temporary directory.
    """
    interrupted = False
    control = DemoControl()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            run_scope = trio.CancelScope()

            async def watch() -> None:
                nonlocal interrupted
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not interrupted and control.training:
                        control.reason = f"interrupted ({name})"
                        control.stop_requested.set()
                        note = "stopping every process in order..."
                    else:
                        result.stop_reason = f"interrupted ({name})"
                        run_scope.cancel()
                        note = (
                            "stopping now: processes get SIGTERM, SIGKILL after"
                            f" {_STOP_GRACE_S:g} s; the temporary directory is removed"
                        )
                    interrupted = True
                    print(f"\nfedtier demo: {name}: {note}", file=sys.stderr, flush=True)

            nursery.start_soon(watch)
            try:
                with run_scope:
                    await run_demo(options, result=result, control=control)
            finally:
                nursery.cancel_scope.cancel()
    return interrupted


def main_demo(options: DemoOptions) -> int:
    """``fedtier demo``: run, report; 0 on success, 130 when interrupted.

    Raises:
        FedtierError: bad options, a missing broker, or a process that died.
    """
    if not options.quiet and not sys.stdout.isatty():
        options = DemoOptions(**{**asdict(options), "quiet": True})
    result = DemoResult()
    try:
        interrupted = trio.run(_run_with_signals, options, result)
    except BaseException as exc:  # mapped to one sentence below
        error: BaseException = sole_error(exc)
        if isinstance(error, ConfigError):
            raise error from None
        if isinstance(error, FedtierError):
            print(f"fedtier demo: failed: {error}", file=sys.stderr, flush=True)
            return 1
        raise
    _print_report(result, options)
    return 130 if interrupted else 0
