"""Engine (b): a scenario on real brokers, daemons and fleet processes; runs no tier in process.

Imports trio, protocol, client and the demo's orchestration
(``simulations.mesh``: ``prepare_mesh``, ``open_brokers``, ``open_mesh``;
``simulations.fleet``'s settings); the scenario format is the in-process
engine's. The mesh runs what a deployment runs: Mosquitto and nats-server,
the central, regional and edge daemons as processes, and one fleet process
per site whose devices are real ``client.device`` loops (own keys, MQTT
connection, outbox, torch trainer).

Only what the orchestration can express is accepted; anything else is refused
with one sentence naming the setting (:func:`mesh_problems`): digits data with
a Dirichlet split, the mlp model without FedProx or momentum, hierarchical
FedBuff with ``fedbuff`` staleness and one ``max_staleness`` everywhere,
FedAvg at the central, f32 partials, clipping (not rejecting) at the edges,
device kinds named ``vehicle``, ``factory`` or ``iot``, and no network,
concurrency or sync-round settings (the loopback network is what it is). Time
is real: ``stop.virtual_time_s`` is seconds of training on the wall clock, and
``clients.compute_median_s`` sets the devices' base interval between
trainings (half a fixed interval, half a log-normal delay with
``compute_sigma``; the real training time comes on top). A kind's ``dropout``
becomes online/offline periods: on average ``1 / dropout`` trainings online,
then ``clients.offline_s`` away.

Measured per model version, as the in-process engine measures it: held-out
accuracy and loss of each version a site's edge relays (verified against the
central key, evaluated with ``client.torch_trainer.TorchTrainer``); uploaded bytes
(envelopes, from the fleets' counters; payloads, as updates sent times the
codec's fixed payload size); bytes into the central, outcomes and staleness
from the daemons' Prometheus endpoints. The staleness histogram comes from
the edges' Prometheus buckets, exact for 0-4 versions and coarser above.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt
import trio

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.engine import RunResult, VersionRecord
from fedtier.simulations.sim.specs import ClientsSpec, Scenario, TierSpec, TrainingSpec
from fedtier.tiers.flush import FlushPolicy

if TYPE_CHECKING:
    from fedtier.simulations.mesh import FlushSpec, MeshSpec

__all__ = ["mesh_problems", "mesh_spec_for", "run_on_mesh"]

MESH_KINDS: Final = ("vehicle", "factory", "iot")
_FLEET_READY_TIMEOUT_S: Final = 90.0
_METRIC_RE: Final = re.compile(r"^(fedtier_[a-z_]+)\{([^}]*)\} (\S+)$", re.M)
_LABEL_RE: Final = re.compile(r'(\w+)="([^"]*)"')
# A max_norm nothing reaches: the orchestration always writes a bound.
_NO_NORM_BOUND: Final = 1e30


def mesh_problems(s: Scenario) -> list[str]:
    """Each setting of ``s`` the mesh engine cannot honour, as one sentence; empty when none."""
    problems: list[str] = []
    agg, data, model, training, clients = s.aggregation, s.data, s.model, s.training, s.clients

    def refuse(setting: str, why: str) -> None:
        problems.append(f"{setting}: {why}")

    if agg.mode != "async" or agg.topology != "hierarchical":
        refuse(
            "aggregation.mode/topology",
            "the mesh runs hierarchical FedBuff only (sync rounds and flat FedBuff are "
            "in-process only)",
        )
    if data.dataset != "digits" or data.partition not in (None, "dirichlet") or data.args:
        refuse("data.dataset", "the mesh's devices read digits shards with a Dirichlet split")
    if data.holdout not in (None, "global"):
        refuse("data.holdout", "the mesh holds out 20% of digits before it splits them")
    if data.quantity_sigma:
        refuse("data.quantity_sigma", "the mesh splits data by each kind's data_volume only")
    if not math.isclose(data.test_fraction, 0.2):
        refuse("data.test_fraction", "the mesh holds out 20% of digits")
    if model.factory != "mlp" or set(dict(model.args)) - {"hidden"} or model.local:
        refuse(
            "model.factory (training.model)",
            "the mesh's devices train the mlp (client.torch_trainer.make_mlp) with no local "
            "tensors",
        )
    plain = TrainingSpec()
    for name in ("loss", "optimizer", "weight_decay", "grad_clip", "drop_last", "device"):
        if getattr(training, name) != getattr(plain, name):
            refuse(f"training.{name}", "the fleet processes train with plain SGD on the CPU")
    if training.mu:
        refuse("training.mu", "the fleet processes have no FedProx term")
    if s.attack is not None:
        refuse("attack", "hostile devices on the mesh are `fedtier sim attack`'s (tests/attacks)")
    if s.defences is not None:
        refuse("defences", "the daemons read their bounds from their own config files")
    if training.momentum:
        refuse("training.momentum", "the fleet processes train with plain SGD")
    names = [k.name for k in s.fleet.kinds]
    if any(name not in MESH_KINDS for name in names) or len(set(names)) != len(names):
        refuse(
            "fleet.devices.kind",
            f"the mesh's device kinds are {', '.join(MESH_KINDS)}, each at most once; got "
            f"{', '.join(names)}",
        )
    if any(k.uplink_bytes_per_s or k.downlink_bytes_per_s for k in s.fleet.kinds):
        refuse("fleet.devices.*link_bytes_per_s", "the mesh's network is the loopback")
    defaults = ClientsSpec()
    for name in (
        "selection",
        "concurrency",
        "rest_s",
        "latency_s",
        "uplink_bytes_per_s",
        "downlink_bytes_per_s",
        "straggler_fraction",
    ):
        if getattr(clients, name) != getattr(defaults, name):
            refuse(
                f"clients.{name}",
                "devices on the mesh train on their own schedule over the loopback",
            )
    tiers: list[tuple[str, TierSpec | None]] = [("edge", agg.edge), ("regional", agg.regional)]
    staleness = {agg.central.staleness, agg.edge.staleness, agg.regional.staleness}
    if any(p.kind != "fedbuff" for p in staleness) or len({p.max_staleness for p in staleness}) > 1:
        refuse(
            "aggregation.*.staleness",
            "the mesh uses fedbuff with one max_staleness at every tier",
        )
    for name, spec in [*tiers, ("central", None)]:
        flush = agg.central.flush if spec is None else spec.flush
        if flush.max_age_s is None or flush.min_sample_weight is not None:
            refuse(
                f"aggregation.{name}.flush",
                "the mesh's tiers flush by count and deadline (set max_age_s, no "
                "min_sample_weight)",
            )
        if spec is not None and (spec.partial_codec != "f32" or spec.uplink_bytes_per_s):
            refuse(f"aggregation.{name}", "the mesh's partials are f32 over the loopback")
    if agg.edge.norm_policy != "clip":
        refuse("aggregation.edge.norm_policy", "the mesh's edges clip")
    if agg.central.optimizer != "fedavg" or any(k != "lr" for k, _ in agg.central.optimizer_params):
        refuse("aggregation.central.optimizer", "the mesh's central runs FedAvg with a server lr")
    if s.stop.virtual_time_s is None:
        refuse("stop.virtual_time_s", "the mesh runs in real time: give its length in seconds")
    return problems


def _mlp_hidden(s: Scenario) -> int:
    hidden = dict(s.model.args).get("hidden", 32)
    assert isinstance(hidden, int)  # mesh_problems refused anything but the mlp's args
    return hidden


def mesh_spec_for(s: Scenario) -> MeshSpec:
    """The orchestration's ``MeshSpec`` for ``s`` (see the module docstring for the mapping).

    Raises:
        ConfigError: the scenario asks for something the mesh cannot run.
    """
    from fedtier.simulations.fleet import SendSpec
    from fedtier.simulations.fleet import TrainingSpec as FleetTraining
    from fedtier.simulations.mesh import FlushSpec, KindProfile, MeshSpec

    problems = mesh_problems(s)
    if problems:
        raise ConfigError(
            f"scenario {s.name!r} cannot run on the mesh engine: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    fleet, clients, agg = s.fleet, s.clients, s.aggregation
    base_t = clients.compute_median_s
    kinds: dict[str, KindProfile] = {}
    for kind in fleet.kinds:
        # Half a fixed interval and half a log-normal delay: the median run takes speed x T.
        fixed = 0.5 * kind.speed if clients.compute_sigma else kind.speed
        delay = 0.5 * kind.speed if clients.compute_sigma else 0.0
        online = (fixed + delay) / kind.dropout if kind.dropout else None
        kinds[kind.name] = KindProfile(
            share=kind.count / fleet.devices_per_edge,
            volume=kind.data_volume,
            interval=fixed,
            delay_median=delay,
            delay_sigma=clients.compute_sigma,
            online_mean=online,
            offline_mean=clients.offline_s / base_t if online is not None else 0.0,
        )
    devices = fleet.num_devices
    rate_per_t = sum(
        devices * p.share * p.availability / (p.interval + p.delay_median) for p in kinds.values()
    )
    regions = tuple(
        (f"r{r}", tuple(f"r{r}-e{e}" for e in range(fleet.edges_per_region)))
        for r in range(fleet.regions)
    )

    def flush(policy: FlushPolicy) -> FlushSpec:
        assert policy.max_age_s is not None  # mesh_problems refused None
        return FlushSpec(policy.max_inputs, policy.max_age_s)

    lr = dict(agg.central.optimizer_params).get("lr", 1.0)
    return MeshSpec(
        fleet="sim",
        regions=regions,
        devices=devices,
        seed=s.seed,
        updates_per_s=rate_per_t / base_t,
        misbehaving=0,
        edge_flush=flush(agg.edge.flush),
        regional_flush=flush(agg.regional.flush),
        central_flush=flush(agg.central.flush),
        max_staleness=agg.central.staleness.max_staleness,
        server_lr=lr,
        max_norm=agg.edge.max_norm if agg.edge.max_norm is not None else _NO_NORM_BOUND,
        training=FleetTraining(
            epochs=s.training.local_epochs,
            batch_size=s.training.batch_size,
            lr=s.training.lr,
            hidden=_mlp_hidden(s),
            num_classes=10,
        ),
        send=SendSpec(codec=s.codec.name, error_feedback=s.codec.error_feedback),
        kinds=kinds,  # type: ignore[arg-type]  # names checked by mesh_problems
        dirichlet_alpha=s.data.dirichlet_alpha,
        model_seed=s.seed,
    )


# -- watching a running mesh -----------------------------------------------------------


def _scrape(urls: Sequence[str]) -> list[tuple[str, dict[str, str], float]]:
    """Every ``fedtier_*`` sample of these Prometheus endpoints (unreachable ones skipped)."""
    samples: list[tuple[str, dict[str, str], float]] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:  # noqa: S310 - loopback URL
                text = resp.read().decode("utf-8", "replace")
        except OSError:
            continue
        for name, labels, value in _METRIC_RE.findall(text):
            samples.append((name, dict(_LABEL_RE.findall(labels)), float(value)))
    return samples


@dataclass
class _Watch:
    """What the watchers saw; written by trio tasks of one run."""

    started: float | None = None
    records: list[VersionRecord] = field(default_factory=list)
    update_counts: dict[int, int] = field(default_factory=dict)
    fleets: dict[str, dict[str, object]] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    changed: trio.Event = field(default_factory=trio.Event)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def fleet_sum(self, key: str) -> int:
        total = 0
        for body in self.fleets.values():
            value = body.get(key, 0)
            total += int(value) if isinstance(value, int | float) else 0
        return total


def _total(samples: Sequence[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        value
        for n, tags, value in samples
        if n == name and all(tags.get(k) == v for k, v in labels.items())
    )


def _staleness_hist(samples: Sequence[tuple[str, dict[str, str], float]]) -> list[int]:
    """The edges' staleness histogram, de-cumulated onto integer buckets (lower bounds)."""
    cumulative: dict[float, float] = {}
    for name, tags, value in samples:
        if name == "fedtier_staleness_versions_bucket" and tags.get("tier") == "edge":
            text = tags.get("le", "+Inf")
            upper = math.inf if text == "+Inf" else float(text)
            cumulative[upper] = cumulative.get(upper, 0.0) + value
    hist = [0] * 32
    previous_bound, previous_count = -1.0, 0.0
    for bound in sorted(cumulative):
        count = cumulative[bound] - previous_count
        bucket = min(31, int(previous_bound) + 1)
        hist[bucket] += round(count)
        previous_bound, previous_count = (
            (bound if math.isfinite(bound) else 64.0),
            cumulative[bound],
        )
    return hist


async def _run_mesh(
    s: Scenario, workdir: Path, out: Path, progress: Callable[[float], None]
) -> RunResult:
    from fedtier.client.model_store import ModelStore, OfferStatus
    from fedtier.client.torch_trainer import TorchTrainer, make_mlp
    from fedtier.protocol.bus import Delivery, Subscription
    from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
    from fedtier.protocol.envelope import open_envelope
    from fedtier.protocol.errors import ChildFailed, RemoteProtocolError
    from fedtier.protocol.files import load_public_key
    from fedtier.protocol.messages import ModelAnnouncement
    from fedtier.protocol.names import MqttTopics
    from fedtier.simulations.mesh import MeshPlan, open_brokers, open_mesh, prepare_mesh
    from fedtier.tiers.config import load_initial_model

    spec = mesh_spec_for(s)
    watch = _Watch()
    started_wall = time.perf_counter()
    duration_s = s.stop.virtual_time_s
    assert duration_s is not None
    codec_payload = 0

    async with open_brokers(workdir / "brokers") as brokers:
        plan: MeshPlan = await trio.to_thread.run_sync(prepare_mesh, spec, workdir, out, brokers)
        layout, _ = load_initial_model(plan.initial_model)
        codec_payload = (
            CodecSpec.parse(s.codec.name, num_params=layout.num_params).expected_payload_size(
                layout.num_params
            )
            or 0
        )
        X_test, y_test = plan.split.X_test, plan.split.y_test
        X_train, y_train = plan.split.X_train, plan.split.y_train
        evaluator = TorchTrainer(make_mlp(64, _mlp_hidden(s), 10, seed=s.seed), X_test, y_test)
        central_key = load_public_key(plan.central_key_file)
        store = ModelStore(central_key, layout, spec.fleet)
        topics = MqttTopics(spec.fleet, spec.sites[0])
        metric_urls = [
            f"http://127.0.0.1:{port}/metrics" for port in plan.prometheus_ports.values()
        ]

        async def record(version: int, params: npt.NDArray[np.float32]) -> None:
            metrics = evaluator.evaluate(params, X_test, y_test)
            train_loss = math.nan
            if s.eval.train_loss:
                train_loss = evaluator.evaluate(params, X_train, y_train)["loss"]
            samples = await trio.to_thread.run_sync(_scrape, metric_urls)
            watch.samples = samples or watch.samples
            now = trio.current_time()
            elapsed = 0.0 if watch.started is None else max(0.0, now - watch.started)
            central_inputs = _total(samples, "fedtier_updates_total", tier="central",
                                    outcome="accepted")  # fmt: skip
            hist_n = _total(samples, "fedtier_staleness_versions_count", tier="edge")
            hist_sum = _total(samples, "fedtier_staleness_versions_sum", tier="edge")
            watch.records.append(
                VersionRecord(
                    version=version,
                    time_s=elapsed,
                    test_accuracy=metrics["accuracy"],
                    test_loss=metrics["loss"],
                    train_loss=train_loss,
                    uploaded_bytes=watch.fleet_sum("sent") * codec_payload,
                    uploaded_wire_bytes=watch.fleet_sum("bytes_sent"),
                    updates_uploaded=watch.fleet_sum("sent"),
                    central_bytes=int(central_inputs) * 4 * layout.num_params,
                    central_wire_bytes=int(
                        _total(samples, "fedtier_update_bytes_sum", tier="central")
                    ),
                    updates_in_version=watch.update_counts.get(version, 0),
                    mean_staleness=hist_sum / hist_n if hist_n else math.nan,
                    participants=watch.fleet_sum("participants"),
                    stale_rejections=int(
                        _total(samples, "fedtier_updates_total", tier="edge", reason="stale")
                    ),
                    lost_runs=0,
                )
            )
            fraction = elapsed / duration_s
            if s.stop.versions is not None:
                fraction = max(fraction, version / s.stop.versions)
            progress(min(1.0, fraction))
            watch.poke()

        async def watch_models() -> None:
            def on_pointer(delivery: Delivery) -> None:
                try:
                    envelope = open_envelope(delivery.payload, {central_key.key_id: central_key})
                except RemoteProtocolError:
                    return
                if isinstance(envelope.message, ModelAnnouncement):
                    watch.update_counts[envelope.message.version] = envelope.message.update_count

            async def pump(sub: Subscription, blobs: bool) -> None:
                while True:
                    delivery = await sub.receive()
                    if not blobs:
                        on_pointer(delivery)
                    elif store.offer_blob(delivery.payload).status is OfferStatus.LOADED:
                        current = store.current
                        if current is not None:
                            await record(current[0], current[1].copy())
                    await delivery.ack()

            config = MqttConfig(
                host=plan.mqtt_host, port=plan.mqtt_port, client_id="fedtier-sim-watch"
            )
            async with (
                open_mqtt_bus(config) as bus,
                bus.subscribe(topics.model_pointer()) as pointers,
                bus.subscribe(topics.model_blob()) as blobs,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(pump, pointers, False)
                nursery.start_soon(pump, blobs, True)

        def on_fleet_line(line: str) -> None:
            try:
                body = json.loads(line)
            except ValueError:
                return
            if isinstance(body, dict) and isinstance(body.get("fleet"), str):
                watch.fleets[body["fleet"]] = body
                if body.get("type") == "ready":
                    watch.ready.add(body["fleet"])
                    watch.poke()

        async with open_mesh(plan) as mesh, trio.open_nursery() as nursery:
            nursery.start_soon(watch_models)
            await mesh.start_fleets(on_fleet_line)

            async def until_failure() -> None:
                child = await mesh.wait_failed()
                raise ChildFailed(child.describe_exit())

            nursery.start_soon(until_failure)
            with trio.move_on_after(_FLEET_READY_TIMEOUT_S):
                while len(watch.ready) < len(mesh.fleets):
                    await watch.changed.wait()
            watch.started = trio.current_time()
            with trio.move_on_after(duration_s):
                while s.stop.versions is None or (
                    not watch.records or watch.records[-1].version < s.stop.versions
                ):
                    await watch.changed.wait()
            virtual_s = trio.current_time() - watch.started
            final_samples = await trio.to_thread.run_sync(_scrape, metric_urls)
            watch.samples = final_samples or watch.samples
            nursery.cancel_scope.cancel()

    names = {d.name: i for i, d in enumerate(plan.devices)}
    per_device = np.zeros(len(plan.devices), dtype=np.int64)
    for path in sorted(plan.device_log_dir.glob("*.jsonl")):
        index = names.get(path.stem)
        if index is None:
            continue
        with path.open(encoding="utf-8") as lines:
            per_device[index] = sum(1 for line in lines if '"receipt_accepted"' in line)
    counts: dict[str, int] = {}
    for name, tags, value in watch.samples:
        if name == "fedtier_updates_total" and value:
            key = f"{tags.get('tier', '?')}:{tags.get('reason') or tags.get('outcome', '?')}"
            counts[key] = counts.get(key, 0) + int(value)
    if not watch.records:
        raise ConfigError(f"scenario {s.name!r} made no model version on the mesh")
    return RunResult(
        scenario=s,
        records=watch.records,
        staleness_hist=_staleness_hist(watch.samples),
        updates_per_device=per_device,
        counts=counts,
        wall_s=time.perf_counter() - started_wall,
        virtual_time_s=virtual_s,
        num_params=layout.num_params,
        codec=s.codec.name,
        num_devices=len(plan.devices),
        engine="mesh",
    )


def run_on_mesh(
    s: Scenario, *, show_progress: bool = True, keep_dir: Path | None = None
) -> RunResult:
    """Run ``s`` on brokers, daemons and fleet processes on this machine; blocks until done.

    Args:
        s: the scenario (checked with :func:`mesh_problems` first).
        show_progress: a progress bar on stderr.
        keep_dir: where the daemons' logs and spans go (a temporary directory,
            removed afterwards, when None).

    Raises:
        ConfigError: the scenario asks for what the mesh cannot run, or a broker
            is missing.
        ChildFailed: a daemon or fleet exited on its own.
    """
    from fedtier.simulations.sim.progress import progress_bar

    mesh_spec_for(s)  # refuse before starting anything
    workdir = Path(tempfile.mkdtemp(prefix="fedtier-sim-mesh-"))
    out = keep_dir if keep_dir is not None else workdir / "out"
    try:
        with progress_bar(f"{s.name} on the mesh", show_progress) as tick:
            return trio.run(_run_mesh, s, workdir, out, tick)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
