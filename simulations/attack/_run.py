"""One attack run: brokers, mesh, honest fleets, attackers, drain, then the verdict's inputs.

Imports the mesh machinery, the MQTT bus (attackers are MQTT clients like any
device), lazily the NATS bus (the edge key's partials, the tampered blob) and
the tiers' store readers (after the run, for what the edges stored and
quarantined); must not import argparse. What the findings mean is
``_verdict``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import trio

from fedtier.protocol.bus import Bus
from fedtier.protocol.bus.mqtt import open_mqtt_bus
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import PublishError, RemoteProtocolError, StoreError
from fedtier.protocol.files import load_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.protocol.messages import ModelAnnouncement, Receipt
from fedtier.protocol.names import MqttTopics, NatsSubjects
from fedtier.simulations.attack import _craft as craft
from fedtier.simulations.attack._plan import ATTACKS, AttackOptions
from fedtier.simulations.attack._verdict import (
    BROKER_REFUSED,
    AttackResult,
    Outcome,
    StoredInput,
    judge,
)
from fedtier.simulations.chaos._run import export_device_logs
from fedtier.simulations.checker import check, load_device_logs
from fedtier.simulations.mesh import (
    LAB_OBSERVER,
    Brokers,
    DeviceEntry,
    MeshPlan,
    MeshSpec,
    RunningMesh,
    open_brokers,
    open_mesh,
    prepare_mesh,
)
from fedtier.tiers.store import read_lineages, read_quarantine

if TYPE_CHECKING:
    from fedtier.protocol.bus.nats import NatsConfig

__all__ = ["run_attack"]

_NO_ID: Final = bytes(16)


def _hex_or_none(update_id: bytes) -> str | None:
    return None if update_id == _NO_ID else update_id.hex()


def _nats_config(brokers: Brokers, nats_url: str, common_name: str) -> NatsConfig:
    """A NATS client of the run's attackers; with TLS, with a certificate for ``common_name``."""
    from fedtier.protocol.bus.nats import NatsConfig

    pki = brokers.pki
    cert = None if pki is None else brokers.client_cert(common_name)
    return NatsConfig(
        servers=[nats_url],
        manage_streams=False,
        require_sync_always=False,
        tls_ca_file=None if pki is None else pki.ca_file,
        tls_cert_file=None if cert is None else cert.cert_file,
        tls_key_file=None if cert is None else cert.key_file,
    )


_PACE_S: Final = 0.6  # between two sends of one attacker: under the edges' rate limit
_POLL_S: Final = 0.5
_QUIET_S: Final = 4.0
_PROGRESS_EVERY_S: Final = 5.0
_STOP_GRACE_S: Final = 15.0


@dataclass(slots=True)
class _Observer:
    """The receipts of the watched devices and the newest model versions, from one MQTT client.

    Receipts are parsed, not verified: the observer is the lab's own client on
    loopback, and what it judges is the edge's answer, not the edge's identity.
    """

    watched: set[str] = field(default_factory=set)
    receipts: list[Receipt] = field(default_factory=list)
    version: int = 0
    site_versions: dict[str, int] = field(default_factory=dict)
    changed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    taken: set[int] = field(default_factory=set)
    seen: int = 0

    def take(self, device: str, update_id: bytes) -> Receipt | None:
        """The first unclaimed receipt for ``device`` that echoes ``update_id`` (or no id)."""
        for index, receipt in enumerate(self.receipts):
            if (
                index not in self.taken
                and receipt.device == device
                and receipt.update_id in (update_id, _NO_ID)
            ):
                self.taken.add(index)
                return receipt
        return None

    async def wait(self, device: str, update_id: bytes, timeout_s: float) -> Receipt | None:
        """Wait up to ``timeout_s`` for ``take`` to find a receipt."""
        with trio.move_on_after(timeout_s):
            while (receipt := self.take(device, update_id)) is None:
                await self.changed.park()
            return receipt
        return None

    async def serve(
        self, bus: Bus, topics: list[str], fleet: str, task_status: trio.TaskStatus[None]
    ) -> None:
        """Collect the receipts on ``topics`` and every site's model pointer until cancelled.

        One subscription per watched receipt topic, not one wildcard over the
        fleet: the honest fleet's receipts are of no interest, and with a
        hundred devices a wildcard subscription was seen to stop delivering.
        """
        async with trio.open_nursery() as nursery:

            async def pump(subject_filter: str, task_status: trio.TaskStatus[None]) -> None:
                async with bus.subscribe(subject_filter) as deliveries:
                    task_status.started()
                    async for delivery in deliveries:
                        # Unacknowledged deliveries count against the session's receive
                        # maximum: without acks the broker stops sending after that many.
                        await delivery.ack()
                        self._on_delivery(delivery.subject, delivery.payload)

            for subject_filter in [*topics, f"ft/{fleet}/+/model/current"]:
                await nursery.start(pump, subject_filter)
            task_status.started()

    def _on_delivery(self, subject: str, payload: bytes) -> None:
        try:
            message = parse_envelope(payload).message
        except RemoteProtocolError:
            return
        if isinstance(message, ModelAnnouncement):
            self.version = max(self.version, message.version)
            site = subject.split("/")[2]
            self.site_versions[site] = max(self.site_versions.get(site, 0), message.version)
        elif isinstance(message, Receipt) and message.device in self.watched:
            self.seen += 1
            self.receipts.append(message)
        self.changed.unpark_all()


class _Attacker:
    """One registered device key used to attack; runs its share of the attacks in order."""

    def __init__(
        self,
        options: AttackOptions,
        plan: MeshPlan,
        entry: DeviceEntry,
        victim: str,
        layout: ModelLayout,
        observer: _Observer,
        outcomes: list[Outcome],
        seed: int,
    ) -> None:
        self.options = options
        self.plan = plan
        self.entry = entry
        self.victim = victim
        self.layout = layout
        self.observer = observer
        self.outcomes = outcomes
        self.rng = np.random.default_rng(seed)
        self.identity: SigningIdentity = load_signing_identity(
            plan.workdir / "keys" / "devices" / f"{entry.name}.key"
        )
        self.topics = MqttTopics(plan.spec.fleet, entry.site)
        self.seq = 0
        # Updates of this attacker the edge accepted: (update id, seq, envelope).
        self.accepted: list[tuple[bytes, int, bytes]] = []

    def _site_version(self) -> int:
        """The newest model version this attacker's own edge relayed, as a device there sees it.

        Not the newest anywhere: an edge that has not fetched that one yet
        would refuse the update as ``future_base``, which is not the attack.
        """
        return self.observer.site_versions.get(self.entry.site, 0)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _update(
        self, delta: np.ndarray, *, base: int | None = None, n_samples: int = 32
    ) -> tuple[bytes, int, bytes]:
        seq = self._next_seq()
        uid, envelope = craft.signed_update(
            self.identity,
            fleet=self.plan.spec.fleet,
            layout=self.layout,
            delta=delta.astype(np.float32),
            seq=seq,
            base_version=self._site_version() if base is None else base,
            n_samples=n_samples,
        )
        return uid, seq, envelope

    async def _send(
        self,
        bus: Bus,
        attack: str,
        envelope: bytes,
        *,
        update_id: bytes = _NO_ID,
        seq: int = 0,
        norm: float = 0.0,
        to: str | None = None,
    ) -> None:
        """Publish on ``to``'s topic (default: our own), wait for the receipt, record it."""
        device = to or self.identity.key_id
        try:
            await bus.publish(self.topics.update(device), envelope)
        except PublishError as exc:
            # The broker's ACL refused it (TLS mesh: a device may publish only
            # on its own topic); nothing was routed, so no receipt will come.
            if "not authorized" not in str(exc).lower():
                raise
            self.outcomes.append(
                Outcome(
                    attack,
                    self.entry.name,
                    _hex_or_none(update_id),
                    BROKER_REFUSED,
                    "not_authorized",
                    norm,
                )
            )
            return
        receipt = await self.observer.wait(device, update_id, self.options.receipt_timeout_s)
        self._record(attack, update_id, norm, receipt)
        if receipt is not None and receipt.status.value == "accepted" and update_id != _NO_ID:
            self.accepted.append((update_id, seq, envelope))
        await trio.sleep(_PACE_S)

    def _record(self, attack: str, uid: bytes, norm: float, receipt: Receipt | None) -> None:
        self.outcomes.append(
            Outcome(
                attack=attack,
                device=self.entry.name,
                update_id=_hex_or_none(uid),
                status="no_receipt" if receipt is None else receipt.status.value,
                reason="" if receipt is None else receipt.reason,
                norm=norm,
            )
        )

    async def run(self, attacks: list[str]) -> None:
        config = self.plan.mqtt_config(self.identity.key_id, self.identity.key_id)
        async with open_mqtt_bus(config) as bus:
            for attack in attacks:
                await getattr(self, f"_{attack}")(bus)

    # -- the attacks (one method each, named as in ATTACKS) ---------------------------

    def _honest(self) -> np.ndarray:
        return craft.honest_delta(self.layout, self.rng)

    async def _bounded(self, bus: Bus, attack: str, delta: np.ndarray, n_samples: int) -> None:
        uid, seq, envelope = self._update(delta, n_samples=n_samples)
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        await self._send(bus, attack, envelope, update_id=uid, seq=seq, norm=norm)

    async def _weight_inflation(self, bus: Bus) -> None:
        await self._bounded(bus, "weight_inflation", self._honest(), craft.INT64_MAX)

    async def _scaling(self, bus: Bus) -> None:
        await self._bounded(bus, "scaling", self._honest() * np.float32(1e6), 32)

    async def _sign_flip(self, bus: Bus) -> None:
        await self._bounded(bus, "sign_flip", self._honest() * np.float32(-10.0), 32)

    async def _future(self, bus: Bus, attack: str, base: int) -> None:
        uid, seq, envelope = self._update(self._honest(), base=base)
        await self._send(bus, attack, envelope, update_id=uid, seq=seq, norm=craft.HONEST_NORM)

    async def _future_base(self, bus: Bus) -> None:
        await self._future(bus, "future_base", self.observer.version + 1000)

    async def _future_base_max(self, bus: Bus) -> None:
        await self._future(bus, "future_base_max", craft.INT64_MAX)

    async def _accepted_one(self, bus: Bus) -> tuple[bytes, int, bytes] | None:
        """An update of ours the edge accepted; sends an honest-sized one when there is none."""
        if not self.accepted:
            uid, seq, envelope = self._update(self._honest())
            await self._send(bus, "setup", envelope, update_id=uid, seq=seq, norm=craft.HONEST_NORM)
        return self.accepted[0] if self.accepted else None

    async def _replay_id(self, bus: Bus) -> None:
        original = await self._accepted_one(bus)
        if original is None:
            self._record("replay_id", _NO_ID, 0.0, None)
            return
        uid = original[0]
        # The accepted update's id again, under a new seq.
        envelope = craft.signed_update(
            self.identity,
            fleet=self.plan.spec.fleet,
            layout=self.layout,
            delta=self._honest(),
            seq=self._next_seq(),
            base_version=self._site_version(),
            update_id=uid,
        )[1]
        await self._send(bus, "replay_id", envelope, update_id=uid, norm=craft.HONEST_NORM)

    async def _replay_seq(self, bus: Bus) -> None:
        original = await self._accepted_one(bus)
        if original is None:
            self._record("replay_seq", _NO_ID, 0.0, None)
            return
        uid, envelope = craft.signed_update(
            self.identity,
            fleet=self.plan.spec.fleet,
            layout=self.layout,
            delta=self._honest(),
            seq=original[1],
            base_version=self._site_version(),
        )
        await self._send(bus, "replay_seq", envelope, update_id=uid, norm=craft.HONEST_NORM)

    async def _other_topic(self, bus: Bus) -> None:
        uid, seq, envelope = self._update(self._honest())
        await self._send(
            bus, "other_topic", envelope, update_id=uid, seq=seq, norm=1.0, to=self.victim
        )

    async def _forged_signature(self, bus: Bus) -> None:
        uid, _, envelope = self._update(self._honest())
        await self._send(bus, "forged_signature", craft.broken_signature(envelope), update_id=uid)

    async def _garbage(self, bus: Bus) -> None:
        await self._send(bus, "garbage", craft.garbage(self.rng))

    async def _oversized(self, bus: Bus) -> None:
        await self._send(bus, "oversized", craft.oversized_header(DEFAULT_LIMITS.max_header_bytes))

    async def _deep_nesting(self, bus: Bus) -> None:
        await self._send(bus, "deep_nesting", craft.deep_header())

    async def _wide_nesting(self, bus: Bus) -> None:
        count = DEFAULT_LIMITS.max_header_bytes - 16
        await self._send(bus, "wide_nesting", craft.wide_header(count))

    async def _flood(self, bus: Bus) -> None:
        count = int(3 * self.options.burst)
        sent: list[bytes] = []
        started = trio.current_time()
        for _ in range(count):
            uid, _, envelope = self._update(self._honest())
            await bus.publish(self.topics.update(self.identity.key_id), envelope)
            sent.append(uid)
        elapsed = trio.current_time() - started
        # The flood's allowance: the bucket's burst plus what it refilled meanwhile.
        allowance = self.options.burst + self.options.rate_per_s * elapsed
        batch = len(self.outcomes)
        for uid in sent:
            receipt = await self.observer.wait(
                self.identity.key_id, uid, self.options.receipt_timeout_s
            )
            self._record("flood", uid, craft.HONEST_NORM, receipt)
            self.outcomes[-1].allowance = allowance
            self.outcomes[-1].batch = batch


class _TierAttacker:
    """A registered edge key sending hostile partials straight to its regional's stream."""

    def __init__(
        self, plan: MeshPlan, nats_url: str, site: str, layout: ModelLayout, version: int
    ) -> None:
        self.plan = plan
        self.nats_url = nats_url
        self.site = site
        self.layout = layout
        self.version = version
        self.identity = load_signing_identity(plan.workdir / "keys" / f"edge-{site}.key")
        region = next(r for r, sites in plan.spec.regions if site in sites)
        self.subject = NatsSubjects(plan.spec.fleet).to_region(region)
        # Far above the real edge's seqs; partials carry no seq check, only ids.
        self.seq = 2**40

    def _partial(
        self,
        inputs: tuple[bytes, ...],
        leaves: tuple[bytes, ...],
        *,
        sample_count: float = 32.0,
        derived: bool = True,
    ) -> tuple[bytes, bytes]:
        from fedtier.tiers.aggregate import partial_id

        self.seq += 1
        pid = partial_id(self.identity.key_id, inputs) if derived else os.urandom(16)
        envelope = craft.signed_partial(
            self.identity,
            fleet=self.plan.spec.fleet,
            layout=self.layout,
            seq=self.seq,
            version=self.version,
            inputs=inputs,
            leaves=leaves,
            partial_id=pid,
            sample_count=sample_count,
        )
        return pid, envelope

    async def run(self, counted_leaf: bytes | None, outcomes: list[Outcome]) -> set[str]:
        """Send every partial of ``TIER_EXPECTED``; returns the leaf ids invented for them."""
        from fedtier.protocol.bus.nats import open_nats_bus

        invented: set[str] = set()
        sends: list[tuple[str, bytes, bytes]] = []
        one = os.urandom(16)
        sends.append(("partial_repeated_inputs", *self._partial((one, one), (one,), derived=False)))
        invented.add(one.hex())
        for _ in range(2):
            leaf = os.urandom(16)
            invented.add(leaf.hex())
            sends.append(
                ("partial_huge_sample_count", *self._partial((leaf,), (leaf,), sample_count=1e308))
            )
        if counted_leaf is not None:
            sends.append(
                ("partial_leaf_counted_twice", *self._partial((os.urandom(16),), (counted_leaf,)))
            )
        config = _nats_config(self.plan.brokers, self.nats_url, f"nats-attacker-edge-{self.site}")
        async with open_nats_bus(config) as bus:
            for attack, pid, envelope in sends:
                await bus.publish(self.subject, envelope, msg_id=pid.hex())
                outcomes.append(
                    Outcome(attack, f"edge-{self.site}", pid.hex(), "published", "", 0.0)
                )
        return invented


def _spec(options: AttackOptions) -> MeshSpec:
    return MeshSpec(
        fleet="attack",
        regions=options.regions,
        devices=options.devices + options.attackers,
        seed=options.seed,
        updates_per_s=options.updates_per_s,
        misbehaving=0,
        # The attackers' keys: planned and registered like any device, never started.
        standalone_devices=options.attackers,
        fleet_duration_s=options.max_run_s + options.drain_timeout_s + 120.0,
        max_norm=options.max_norm,
        edge_validation={
            "norm_bound": "adaptive",
            "max_samples": options.max_samples,
            "rate_per_s": options.rate_per_s,
            "burst": options.burst,
            "max_updates_per_version": options.max_updates_per_version,
            "norm_warmup": options.norm_warmup,
        },
    )


def _lineage_counts(plan: MeshPlan) -> tuple[Counter[str], int]:
    counted: Counter[str] = Counter()
    lineages = read_lineages(plan.workdir / "state" / "central" / "state.sqlite")
    for ids in lineages.values():
        counted.update(i.hex() for i in ids)
    return counted, len(lineages)


def _store_paths(plan: MeshPlan) -> dict[str, Path]:
    names = ["central", *(f"regional-{r}" for r, _ in plan.spec.regions)]
    names += [f"edge-{s}" for s in plan.spec.sites]
    return {name: plan.workdir / "state" / name / "state.sqlite" for name in names}


def _latest_model_finite(plan: MeshPlan) -> tuple[int, bool]:
    """The central's newest version and whether every one of its parameters is finite."""
    from fedtier.protocol.codecs import decode
    from fedtier.protocol.messages import ModelBlob
    from fedtier.tiers.store import read_latest_version

    latest = read_latest_version(plan.workdir / "state" / "central" / "state.sqlite")
    if latest is None:
        return 0, True
    envelope = parse_envelope(latest.record.blob)
    blob = envelope.message
    assert isinstance(blob, ModelBlob)
    values = decode(envelope.payload, blob.codec, blob.num_params)
    return latest.version, bool(np.isfinite(values).all())


def _stored_inputs(plan: MeshPlan, ids: set[str]) -> dict[str, StoredInput]:
    """What the edges stored for the attackers' accepted updates: weight and clip."""
    import sqlite3

    found: dict[str, StoredInput] = {}
    for name, path in _store_paths(plan).items():
        if not name.startswith("edge-"):
            continue
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT input_id, n_samples, clip_scale FROM inputs").fetchall()
        finally:
            conn.close()
        for input_id, n_samples, clip_scale in rows:
            key = bytes(input_id).hex()
            if key in ids:
                found[key] = StoredInput(name, float(n_samples), float(clip_scale))
    return found


def _quarantined(plan: MeshPlan) -> dict[str, str]:
    """Input id (hex) -> the reason it is quarantined with, at any tier."""
    reasons: dict[str, str] = {}
    for path in _store_paths(plan).values():
        try:
            records = read_quarantine(path)
        except StoreError:
            continue
        for record in records:
            if record.input_id is not None:
                reasons[record.input_id.hex()] = record.reason
    return reasons


async def run_attack(options: AttackOptions) -> AttackResult:
    """Run honest devices and attackers on one mesh, drain, check; return the verdict.

    Raises:
        FedtierError: a broker or daemon could not start at all.
    """
    started = time.monotonic()
    out_dir = options.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fedtier-attack-"))
    progress = options.progress or (lambda _line: None)
    try:
        spec = _spec(options)
        tls_for = spec if options.tls else None
        async with open_brokers(workdir / "brokers", tls_for=tls_for) as brokers:
            plan = await trio.to_thread.run_sync(
                lambda: prepare_mesh(spec, workdir / "mesh", out_dir, brokers)
            )
            for stale in plan.device_log_dir.glob("*.jsonl"):
                stale.unlink()
            progress(f"attack: mesh planned in {time.monotonic() - started:.0f} s")
            outcomes: list[Outcome] = []
            crashes: list[str] = []
            honest = _Honest()
            invented: set[str] = set()
            blob: list[BlobAttack] = []
            site_versions: dict[str, int] = {}
            async with open_mesh(plan, stop_grace_s=_STOP_GRACE_S) as mesh:
                drained = await _run_phases(
                    options,
                    plan,
                    mesh,
                    brokers.nats.url,
                    outcomes,
                    invented,
                    blob,
                    site_versions,
                    honest,
                    progress,
                )
                crashes = [c.describe_exit() for c in mesh.group.children if _crashed(c)]
            histories = load_device_logs(sorted(plan.device_log_dir.glob("*.jsonl")))
            counted, versions = _lineage_counts(plan)
            attacker_ids = {o.update_id for o in outcomes if o.update_id is not None}
            attacker_ids |= invented
            honest_counts = Counter({k: v for k, v in counted.items() if k not in attacker_ids})
            report = check(histories, honest_counts, versions)
            accepted_ids = {o.update_id for o in outcomes if o.accepted and o.update_id}
            version, finite = _latest_model_finite(plan)
            result = judge(
                options,
                outcomes,
                report=report,
                updates_in_logs=len(histories),
                honest_accepted=sum(1 for h in histories.values() if h.accepted),
                attacker_counted={k: counted[k] for k in attacker_ids},
                stored=_stored_inputs(plan, accepted_ids),
                quarantined=_quarantined(plan),
                crashes=crashes,
                blob=_blob_verdict(plan, blob, site_versions),
                model=(version, finite),
                drained=drained,
                elapsed_s=time.monotonic() - started,
            )
        (out_dir / "attack.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        return result
    finally:
        if options.keep_workdir:
            progress(f"attack: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _blob_verdict(
    plan: MeshPlan, blob: list[BlobAttack], site_versions: dict[str, int]
) -> dict[str, object] | None:
    """What the edge did with the tampered blob: skipped it (its log says so) and moved on."""
    if not blob:
        return None
    attack = blob[0]
    site = attack.edge.removeprefix("edge-")
    return {
        "edge": attack.edge,
        "tampered_version": attack.version,
        "skipped": _skipped(plan.log_dir / f"{attack.edge}-restarted.log", attack.version),
        "served_after": site_versions.get(site, 0),
    }


def _skipped(log: Path, version: int) -> bool:
    """Whether a follower's log says it refused model ``version`` (tiers._follower's words)."""
    if not log.exists():
        return False
    text = log.read_text(encoding="utf-8", errors="replace")
    return (
        f"model blob v{version} does not verify" in text
        or f"model v{version} could not be fetched" in text
    )


def _crashed(child: object) -> bool:
    from fedtier.simulations.processes import Child

    assert isinstance(child, Child)
    return child.exited.is_set() and not child.stopping


@dataclass(slots=True)
class _Honest:
    """The fleets' latest progress counters, per fleet."""

    accepted: dict[str, int] = field(default_factory=dict)

    def on_line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        if isinstance(event, dict) and event.get("type") in ("progress", "done"):
            self.accepted[str(event.get("fleet"))] = int(event.get("accepted", 0))

    @property
    def total(self) -> int:
        return sum(self.accepted.values())


def _assignments(options: AttackOptions) -> list[list[str]]:
    """Each attacker's attacks: ``ATTACKS`` round-robin, ``rounds`` times, the floods last."""
    plans: list[list[str]] = [[] for _ in range(options.attackers)]
    turn = 0
    for _ in range(options.rounds):
        for attack in ATTACKS:
            plans[turn % options.attackers].append(attack)
            turn += 1
    # A flood empties the attacker's token bucket; what follows it would be rate limited.
    return [[a for a in p if a != "flood"] + [a for a in p if a == "flood"] for p in plans]


async def _run_phases(
    options: AttackOptions,
    plan: MeshPlan,
    mesh: RunningMesh,
    nats_url: str,
    outcomes: list[Outcome],
    invented: set[str],
    blob: list[BlobAttack],
    site_versions: dict[str, int],
    honest: _Honest,
    progress: Callable[[str], None],
) -> bool:
    arrays = np.load(plan.initial_model)
    layout = ModelLayout.from_arrays({name: arrays[name] for name in arrays.files})
    attacker_entries = list(plan.devices[: options.attackers])
    honest_by_site = {d.site: d.key_id for d in reversed(plan.devices[options.attackers :])}
    observer = _Observer(
        watched={d.key_id for d in attacker_entries} | set(honest_by_site.values())
    )
    site_of_key = {d.key_id: d.site for d in plan.devices}
    receipt_topics = [
        MqttTopics(plan.spec.fleet, site_of_key[key]).receipt(key)
        for key in sorted(observer.watched)
    ]
    observer_config = plan.mqtt_config("attack-observer", LAB_OBSERVER)
    async with open_mqtt_bus(observer_config) as bus, trio.open_nursery() as nursery:
        await nursery.start(observer.serve, bus, receipt_topics, plan.spec.fleet)
        await mesh.start_fleets(honest.on_line)
        # Attacks start once honest updates flow: the edges then hold a model and
        # their adaptive norm bounds learnt from honest norms.
        warm = options.norm_warmup * len(plan.spec.sites)
        with trio.move_on_after(options.max_run_s):
            while honest.total < warm:
                await _step(mesh)
        progress(
            f"attack: honest traffic flows at model v{observer.version} "
            f"({observer.seen} receipts of watched devices seen); attacking"
        )
        attackers = [
            _Attacker(
                options,
                plan,
                entry,
                honest_by_site[entry.site],
                layout,
                observer,
                outcomes,
                seed=options.seed * 1000 + index,
            )
            for index, entry in enumerate(attacker_entries)
        ]
        last = time.monotonic()
        with trio.move_on_after(options.max_run_s):
            async with trio.open_nursery() as attacking:
                for attacker, attacks in zip(attackers, _assignments(options), strict=True):
                    attacking.start_soon(attacker.run, attacks)
            if options.tier_attacks:
                progress("attack: device attacks answered; hostile partials from an edge key")
                invented |= await _attack_tiers(plan, nats_url, layout, observer, outcomes)
                blob.append(await _tamper_blob(options, plan, mesh, nats_url, observer, progress))
            site = plan.spec.sites[-1]
            while mesh.failed() is None and (
                honest.total < options.updates
                or (blob and observer.site_versions.get(site, 0) <= blob[0].version)
            ):
                await _step(mesh)
                if time.monotonic() - last > _PROGRESS_EVERY_S:
                    last = time.monotonic()
                    progress(f"attack: {honest.total}/{options.updates} honest updates accepted")
        progress(f"attack: {len(outcomes)} hostile inputs answered; draining")
        drained = await _drain(options, plan, mesh, outcomes)
        site_versions.update(observer.site_versions)
        nursery.cancel_scope.cancel()
    return drained


async def _attack_tiers(
    plan: MeshPlan,
    nats_url: str,
    layout: ModelLayout,
    observer: _Observer,
    outcomes: list[Outcome],
) -> set[str]:
    """Hostile partials from the edge key of a site where an attacker's update was accepted.

    That update, once the central counted it, is the leaf a hostile partial
    carries again: the regional that folded it must refuse it a second time.
    """
    site_of = {d.name: d.site for d in plan.devices}
    accepted = [o for o in outcomes if o.accepted and o.update_id is not None]
    leaf: bytes | None = None
    site = plan.spec.sites[0]
    if accepted:
        site = site_of[accepted[0].device]
        wanted = accepted[0].update_id
        assert wanted is not None
        with trio.move_on_after(30.0):
            while True:
                counted, _ = await trio.to_thread.run_sync(_lineage_counts, plan)
                if wanted in counted:
                    leaf = bytes.fromhex(wanted)
                    break
                await trio.sleep(_POLL_S)
    attacker = _TierAttacker(plan, nats_url, site, layout, observer.version)
    return await attacker.run(leaf, outcomes)


@dataclass(slots=True)
class BlobAttack:
    """The tampered model blob: which edge met it, at which version, and how it fared."""

    edge: str = ""
    version: int = 0
    child: object = None


async def _tamper_blob(
    options: AttackOptions,
    plan: MeshPlan,
    mesh: RunningMesh,
    nats_url: str,
    observer: _Observer,
    progress: Callable[[str], None],
) -> BlobAttack:
    """Make one edge meet a model blob that fails its digest; it must skip it and keep serving.

    The edge is stopped until the central has moved past its model; then the
    central is frozen (SIGSTOP) so the registry's current version stays put,
    that version's blob is replaced by one whose payload no longer hashes to
    the digest its signed pointer names, and the edge is started again: it
    recovers its older model, sees the newer pointer and fetches the tampered
    blob. Once its log says it skipped it, the central resumes and the next
    version is clean.
    """
    from fedtier.protocol.bus.nats import open_nats_bus
    from fedtier.protocol.messages import ModelAnnouncement
    from fedtier.tiers.model_registry import CURRENT_KEY

    site = plan.spec.sites[-1]
    index = next(i for i, c in enumerate(mesh.edges) if c.name == f"edge-{site}")
    edge = mesh.edges[index]
    edge.stopping = True
    await mesh.group.stop([edge], grace_s=_STOP_GRACE_S)
    before = observer.version
    with trio.move_on_after(options.max_run_s):
        while observer.version <= before:
            await observer.changed.park()
    subjects = NatsSubjects(plan.spec.fleet)
    config = _nats_config(plan.brokers, nats_url, "nats-attacker-blob")
    central = mesh.central.process
    central.send_signal(signal.SIGSTOP)
    try:
        async with open_nats_bus(config) as bus:
            kv = await bus.kv_bucket(subjects.model_bucket())
            entry = await kv.get(CURRENT_KEY)
            assert entry is not None
            pointer = parse_envelope(entry[0]).message
            assert isinstance(pointer, ModelAnnouncement)
            version = pointer.version
            name = NatsSubjects.blob_object(version)
            store = await bus.object_store(subjects.blob_store())
            blob = await store.get(name)
            payload = bytes(parse_envelope(blob).payload)
            at = blob.find(payload) + len(payload) // 2
            await store.put(name, blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1 :])
        progress(f"attack: blob of model v{version} tampered; restarting edge-{site}")
        child = await mesh.group.start(f"edge-{site}-restarted", [*edge.argv])
        mesh.edges[index] = child
        with trio.move_on_after(60.0):
            while not _skipped(child.log_path, version):
                if child.exited.is_set():
                    break
                await trio.sleep(_POLL_S)
    finally:
        central.send_signal(signal.SIGCONT)
    return BlobAttack(edge=f"edge-{site}", version=version, child=child)


async def _step(mesh: RunningMesh) -> None:
    """Wait a poll interval, or less when a child changes."""
    with trio.move_on_after(_POLL_S):
        await mesh.group.changed()


async def _drain(
    options: AttackOptions, plan: MeshPlan, mesh: RunningMesh, outcomes: list[Outcome]
) -> bool:
    """Stop the fleets, export their logs, wait until every receipted update is counted."""
    for fleet in mesh.fleets:
        fleet.stopping = True
    await mesh.group.stop(mesh.fleets, grace_s=_STOP_GRACE_S)
    await trio.to_thread.run_sync(export_device_logs, plan)
    histories = load_device_logs(sorted(plan.device_log_dir.glob("*.jsonl")))
    wanted = {uid for uid, h in histories.items() if h.accepted}
    wanted |= {o.update_id for o in outcomes if o.accepted and o.update_id}
    deadline = trio.current_time() + options.drain_timeout_s
    last_total, last_change = -1, trio.current_time()
    while trio.current_time() < deadline and mesh.failed() is None:
        try:
            counted, _ = await trio.to_thread.run_sync(_lineage_counts, plan)
        except StoreError:
            counted = Counter()
        total = sum(counted.values())
        now = trio.current_time()
        if total != last_total:
            last_total, last_change = total, now
        # Accepted attacker updates may end quarantined (outliers): only honest
        # ones are waited for in full; the rest need a quiet lineage.
        complete = wanted <= counted.keys()
        if complete and now - last_change >= _QUIET_S:
            return True
        if now - last_change >= 3 * _QUIET_S:
            return complete or wanted - counted.keys() <= _attacker_ids(outcomes)
        await trio.sleep(_POLL_S)
    return False


def _attacker_ids(outcomes: list[Outcome]) -> set[str]:
    return {o.update_id for o in outcomes if o.update_id is not None}
