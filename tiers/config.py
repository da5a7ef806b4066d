"""Typed configuration of the tier daemons, loaded from TOML; imports protocol and tiers math only.

No trio here: a config is plain frozen data. ``load_config(kind, path)``
reads a file through ``protocol.files.ConfigTable`` (the ``[mqtt]`` table
through ``protocol.bus.settings``, shared with devices); every unknown key or
unusable value raises ``ConfigError`` with one sentence naming it
(``edge.toml: flush.max_inputs is 0; expected an integer >= 1``). Relative
paths are relative to the file's folder. Commented examples live in
``deploy/*.example.toml``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import numpy as np

from fedtier.protocol.bus.settings import MqttSettings, parse_mqtt_settings
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.protocol.files import ConfigTable
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits
from fedtier.protocol.names import check_token
from fedtier.tiers._quarantine import QuarantineLimits
from fedtier.tiers.core import (
    DEFAULT_BURST,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_MAX_UPDATES_PER_VERSION,
    DEFAULT_RATE_PER_S,
    DEFAULT_WARMUP_NORM,
    OUTLIER_SCORES,
    ROBUST_RULES,
    AdaptiveNorm,
    InfluenceRules,
    ReputationRules,
    RobustRules,
)
from fedtier.tiers.faults import unsafe_requested
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.optimizers import ServerOptimizer, make_optimizer
from fedtier.tiers.registry import is_hex_key
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.validation import NormPolicy

__all__ = [
    "EVALUATION_METRICS",
    "CentralConfig",
    "EdgeConfig",
    "EvaluationSettings",
    "EvaluationTarget",
    "LeaseSettings",
    "MqttSettings",
    "NatsSettings",
    "RegionalConfig",
    "RetentionSettings",
    "RetrySettings",
    "StatusSettings",
    "TelemetrySettings",
    "TierConfig",
    "TierKind",
    "load_config",
    "load_initial_model",
    "load_nats_settings",
    "parse_reputation",
]

TierKind: TypeAlias = Literal["edge", "regional", "central"]
TIER_KINDS: Final = ("edge", "regional", "central")


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """How a daemon reaches NATS.

    Attributes:
        servers: server URLs (every node of a cluster).
        monitoring_url: one server's HTTP monitoring base URL, read to check
            ``sync_interval: always`` (a single server; kept for old configs).
        monitoring_urls: every server's monitoring base URL (a cluster's three);
            the check reads each, with ``monitoring_url``.
        require_sync_always: refuse a server that does not fsync every JetStream
            write; with it on, the daemon refuses to start without a monitoring URL.
        replicas: copies of every stream, KV bucket and object store the daemon
            creates (1 on one server, 3 on a 3-node cluster); an existing one
            with fewer copies is refused at start.
        jetstream_domain: the JetStream domain of the streams and buckets, for a
            daemon connected to a site's leaf node (``core`` with
            deploy/nats/cluster/); None uses the JetStream of the servers it
            connects to.
        ack_wait_s: how long JetStream waits for this daemon's ack of a delivery
            before redelivering it (set when the durable consumer is created).
        max_deliver: most deliveries of one message (set at consumer creation).
        inbox_prefix: the prefix of this daemon's reply inboxes; each NATS user
            its own, matching its subscribe permission (deploy/nats/accounts.conf).
        max_hold_s: how long in-progress acks keep a delivery this daemon holds
            from redelivery (0: none).
        tls_ca_file, tls_cert_file, tls_key_file: PEM files for TLS.
        credentials_file: a ``.creds`` file (user JWT and nkey seed).
        nkeys_seed_file: an nkeys user seed.
        manage_streams: create or update the JetStream streams at start; None
            means only the central does (the others just check they exist), which
            is what the per-user permissions of deploy/nats/accounts.conf allow.
        max_parted_bytes: the largest partial this daemon sends or takes; one
            above the server's ``max_payload`` travels as numbered parts on the
            UP stream (a large model's partials). A consumer holds the parts of
            at most twice this in incomplete partials. 0 turns parts off.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    monitoring_url: str | None = None
    monitoring_urls: tuple[str, ...] = ()
    require_sync_always: bool = True
    replicas: int = 1
    jetstream_domain: str | None = None
    ack_wait_s: float = 30.0
    inbox_prefix: str = "_INBOX"
    max_deliver: int = 50
    max_hold_s: float = 300.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    credentials_file: Path | None = None
    nkeys_seed_file: Path | None = None
    manage_streams: bool | None = None
    max_parted_bytes: int = 2**30


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """Where telemetry goes (``OTEL_*`` variables still choose exporters).

    Attributes:
        jsonl_dir: folder of the JSON-lines span file when no OTLP endpoint is set.
        prometheus_port: port of the Prometheus scrape endpoint, or None for none.
        prometheus_host: address it listens on: loopback by default, since the
            series name devices and daemons; the host's address (or ``0.0.0.0``)
            for a Prometheus on another machine.
    """

    jsonl_dir: Path | None = None
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class StatusSettings:
    """The status snapshot a daemon publishes for ``fedtier status`` (docs/operations.md).

    Attributes:
        enabled: publish at all (off only where the NATS user may not write the bucket).
        interval_s: seconds between snapshots; a reader calls one stale after three.
        rate_window_s: the window the accepted/rejected rates are averaged over.
    """

    enabled: bool = True
    interval_s: float = 2.0
    rate_window_s: float = 30.0


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """``[lease]``: one active instance per site, region and central (docs/operations.md).

    Off by default: a fleet that runs one process per tier needs no lease, and
    a lease costs a KV write every third of ``ttl_s`` plus up to ``ttl_s`` of
    idle time after a crash before the restarted process may take input again.

    Attributes:
        enabled: take input only while holding the lease; others wait as standby.
        ttl_s: how long a lease outlives its last refresh (the KV bucket's
            ``max_age``); also the longest a standby waits after the holder died.
        instance: this instance's name in the lease; empty means ``host:pid``.
    """

    enabled: bool = False
    ttl_s: float = 10.0
    instance: str = ""


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """``[retention]``: how long each table, stream and file keeps what it no longer needs.

    Every bound is a horizon or a byte cap (docs/operations.md, retention and
    limits). The dedupe horizon is the one that guards exactly-once: an input's
    ``(sender, id)`` stays known at least that long after it was accepted, so
    it must exceed the longest time a copy of the input can still arrive: the
    UP stream's ``up_stream_max_age_s`` (a partial redelivered from the stream)
    plus the time a sender keeps resending it (its outbox).

    Attributes:
        interval_s: seconds between two prune passes of a daemon.
        dedupe_horizon_s: age (since acceptance) after which a finished input's
            row, and with it its dedupe key and leaf ids, may be deleted; at
            least ``up_stream_max_age_s``.
        outbox_horizon_s: age (since the upstream PubAck) after which an
            acknowledged outbox row is deleted (its bytes went at the ack).
        prune_batch: most rows one prune transaction deletes per table: the
            store has one writer, so a long delete would hold intake commits.
        up_stream_max_age_s: the UP stream's ``max_age``: the outer horizon of
            a partial waiting for a consumer that is down.
        up_stream_max_bytes: the UP stream's byte cap (discard new: a full
            stream refuses publishes, which stay in the publisher's outbox).
        span_file_max_bytes: a JSON-lines span file is rotated past this size.
        span_files_keep: rotated span files kept besides the current one.
        version_history_s: the central's model version rows (signed pointer,
            lineage, evaluation metrics) made longer ago than this go, once
            ``keep_versions`` dropped their parameters: ``fedtier trace`` and
            ``fedtier model list`` then know them no more.
    """

    interval_s: float = 300.0
    dedupe_horizon_s: float = 14 * 86_400.0
    outbox_horizon_s: float = 86_400.0
    prune_batch: int = 5_000
    up_stream_max_age_s: float = 7 * 86_400.0
    up_stream_max_bytes: int = 2**30
    span_file_max_bytes: int = 64 * 2**20
    span_files_keep: int = 4
    version_history_s: float = 90 * 86_400.0

    def __post_init__(self) -> None:
        if self.dedupe_horizon_s < self.up_stream_max_age_s:
            raise ConfigError(
                f"retention.dedupe_horizon_s is {self.dedupe_horizon_s:g}; it must be at least "
                f"retention.up_stream_max_age_s ({self.up_stream_max_age_s:g}): a partial "
                "redelivered from the stream must still be recognised as a duplicate"
            )


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Backoff for transient publish failures (``BusUnavailable``, ``PublishError``).

    Attributes:
        initial_backoff_s: first wait; doubles on each retry.
        max_backoff_s: longest wait between tries.
    """

    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0


@dataclass(frozen=True, kw_only=True)
class TierConfig:
    """What every tier daemon is configured with.

    Attributes:
        fleet: the fleet token.
        identity_key: this daemon's private key (PEM, mode 0600).
        state_dir: folder of the state store (``state.sqlite``) and, at the
            central, the model files.
        sender_keys: key registry sources (TOML files, PEM folders) of whom this
            daemon accepts inputs from.
        central_key: the pinned central public key: 64 hex digits or a PEM path;
            empty when ``root_key`` is set (then optional: an extra pin).
        root_key: ``[keys] root``: the pinned fleet root key (hex or PEM path), empty
            for none; with it, models signed by any central key it certified verify.
        certificates: ``[keys] certificates``: certificate files of central keys, or
            folders of ``*.cert`` files (the central publishes them beside its models).
        revocations: ``[keys] revocations``: a signed revocation list file, or None.
        revocation_poll_s: ``[keys] revocation_poll_s``: how often the file and the
            registry's list are read again (the bound on how late a revocation applies).
        nats: NATS connection settings.
        flush: when the open buffer is flushed upstream.
        staleness: staleness function and bound (at a regional or the central the
            bound only marks a partial as late: partials are never refused).
        limits: decoding caps.
        commit_window_s: how long a grouped commit waits for company.
        intake_capacity: most inputs held unacknowledged at once.
        shutdown_timeout_s: how long a clean shutdown waits for upstream PubAcks.
        retry: backoff for transient publish failures.
        telemetry: where telemetry goes.
        status: the status snapshot published for ``fedtier status``.
        quarantine: how much the quarantine holds, in all and per sender.
        retention: ``[retention]``: prune horizons and byte caps.
        lease: ``[lease]``: active/standby instances (off by default).
        max_samples_per_update: ``[validation] max_samples`` at a regional or the
            central: the fleet's cap on one device update's weight (at least the
            edges'); a child partial whose ``sample_count`` exceeds its
            ``update_count`` times it is refused as ``inconsistent_partial``.
            None: unchecked (the default of a config built in code; a config
            file gets ``DEFAULT_MAX_SAMPLES``).
    """

    fleet: str
    identity_key: Path
    state_dir: Path
    sender_keys: tuple[Path, ...] = ()
    central_key: str = ""
    root_key: str = ""
    certificates: tuple[Path, ...] = ()
    revocations: Path | None = None
    revocation_poll_s: float = 30.0
    nats: NatsSettings = field(default_factory=NatsSettings)
    flush: FlushPolicy = field(default_factory=FlushPolicy)
    staleness: StalenessPolicy = field(default_factory=StalenessPolicy)
    limits: Limits = DEFAULT_LIMITS
    commit_window_s: float = 0.002
    intake_capacity: int = 64
    shutdown_timeout_s: float = 30.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    quarantine: QuarantineLimits = field(default_factory=QuarantineLimits)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    max_samples_per_update: int | None = None

    def __post_init__(self) -> None:
        try:
            check_token("fleet", self.fleet)
        except LocalProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        if self.flush.max_inputs > self.limits.max_ids:
            raise ConfigError(
                f"flush.max_inputs is {self.flush.max_inputs}; a partial lists at most "
                f"limits.max_ids = {self.limits.max_ids} inputs"
            )
        if not self.intake_capacity >= 1:
            raise ConfigError(f"intake_capacity is {self.intake_capacity}; expected >= 1")

    @property
    def store_path(self) -> Path:
        """The sqlite state store file."""
        return self.state_dir / "state.sqlite"


@dataclass(frozen=True, kw_only=True)
class EdgeConfig(TierConfig):
    """An edge daemon: devices of one site in over MQTT, partials out to its region.

    Attributes:
        site: the site token (its MQTT broker).
        region: the region token of the regional daemon it sends to.
        mqtt: MQTT connection settings.
        max_norm: L2 bound on device updates (the adaptive bound's warm-up value
            when ``influence.adaptive_norm`` is set), or None for none.
        norm_policy: ``clip`` (scale down, count as anomalous) or ``reject``.
        partial_codec: how partial numerators are encoded upstream.
        influence: the per-device bounds (weight cap, adaptive norm, contribution
            cap, rate limit, ``future_base``). The dataclass default turns them
            all off, as the simulator does (tests that compare the two rely on
            it); ``load_config`` turns them on unless the TOML says otherwise.
        robust: ``[robust]``: robust aggregation within each cut (default off).
    """

    site: str
    region: str
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    max_norm: float | None = None
    norm_policy: NormPolicy = "clip"
    partial_codec: CodecSpec = field(default_factory=lambda: CodecSpec("f32"))
    influence: InfluenceRules = field(default_factory=InfluenceRules)
    robust: RobustRules = field(default_factory=RobustRules)

    def __post_init__(self) -> None:
        TierConfig.__post_init__(self)
        _check_tokens(site=self.site, region=self.region)
        _check_partial_codec(self.partial_codec)


@dataclass(frozen=True, kw_only=True)
class RegionalConfig(TierConfig):
    """A regional daemon: edge partials of one region in, partials out to the central.

    Attributes:
        region: its region token.
        partial_codec: how partial numerators are encoded upstream.
        robust: ``[robust]``: robust aggregation within each cut (default off).
    """

    region: str
    partial_codec: CodecSpec = field(default_factory=lambda: CodecSpec("f32"))
    robust: RobustRules = field(default_factory=RobustRules)

    def __post_init__(self) -> None:
        TierConfig.__post_init__(self)
        _check_tokens(region=self.region)
        _check_partial_codec(self.partial_codec)


EVALUATION_METRICS: Final[Mapping[str, Literal["max", "min"]]] = {
    "accuracy": "max",
    "r2": "max",
    "loss": "min",
    "mse": "min",
    "rmse": "min",
    "mae": "min",
}
"""The metrics the central's evaluator computes, and which way is better.

``fedtier.client.evaluation`` computes them (its test checks both lists agree);
the central only needs the direction, to tell when a target is reached.
"""
_CLASSIFICATION_METRICS: Final = frozenset({"accuracy", "loss"})
_REGRESSION_METRICS: Final = frozenset({"r2", "loss", "mse", "rmse", "mae"})
_TASKS: Final[tuple[Literal["classification", "regression"], ...]] = (
    "classification",
    "regression",
)


@dataclass(frozen=True, slots=True)
class EvaluationTarget:
    """Early stopping: the value of one metric at which the central stops making versions.

    Attributes:
        metric: one of the evaluated metrics.
        value: reached when a version scores ``>= value`` (accuracy, r2) or
            ``<= value`` (loss, mse, rmse, mae).
    """

    metric: str
    value: float

    def reached_by(self, metrics: Mapping[str, float]) -> bool:
        """Whether ``metrics`` (one version's) meet the target."""
        score = metrics.get(self.metric)
        if score is None:
            return False
        if EVALUATION_METRICS[self.metric] == "max":
            return score >= self.value
        return score <= self.value

    def describe(self) -> str:
        """``accuracy >= 0.95``."""
        sign = ">=" if EVALUATION_METRICS[self.metric] == "max" else "<="
        return f"{self.metric} {sign} {self.value:g}"


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """The central's held-out evaluation (the ``[evaluation]`` table).

    The model and data are named in the plug-in syntax of devices and
    scenarios; the composition root (``fedtier central``) builds the evaluator
    from them, so the central itself never imports the client.

    Attributes:
        model: a built-in (``"mlp"``, ``"logreg"``) or ``"package.module:factory"``.
        args: keyword arguments of the factory.
        data: a data file (resolved against the config's folder) or
            ``"package.module:loader"`` (called with ``split="test"``,
            ``device="central"``).
        data_args: keyword arguments of a loader.
        label: a table's label column (name or index); default the last one.
        task: ``"classification"`` or ``"regression"``; None infers it from the labels.
        metrics: what to compute; empty means the task's defaults
            (``accuracy, loss`` or ``r2, mse``).
        every_versions: evaluate versions whose number is a multiple of it.
        target: early stopping, or None.
        base_dir: the config file's folder (a loader's ``DataRequest.base_dir``).
    """

    model: str
    data: str
    args: Mapping[str, object] = field(default_factory=dict)
    data_args: Mapping[str, object] = field(default_factory=dict)
    label: str | int | None = None
    task: Literal["classification", "regression"] | None = None
    metrics: tuple[str, ...] = ()
    every_versions: int = 1
    target: EvaluationTarget | None = None
    base_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in self.metrics:
            if name not in EVALUATION_METRICS:
                raise ConfigError(
                    f"evaluation metric {name!r} is not one of {', '.join(EVALUATION_METRICS)}"
                )
        if self.task is not None:
            allowed = (
                _CLASSIFICATION_METRICS if self.task == "classification" else _REGRESSION_METRICS
            )
            wrong = [name for name in self.metrics if name not in allowed]
            if wrong:
                raise ConfigError(
                    f"evaluation metric {wrong[0]!r} does not apply to {self.task}; "
                    f"use {', '.join(sorted(allowed))}"
                )
        if self.every_versions < 1:
            raise ConfigError(f"evaluation every_versions is {self.every_versions}; expected >= 1")
        target = self.target
        if target is not None:
            if target.metric not in EVALUATION_METRICS:
                raise ConfigError(
                    f"evaluation target metric {target.metric!r} is not one of "
                    f"{', '.join(EVALUATION_METRICS)}"
                )
            if self.metrics and target.metric not in self.metrics:
                raise ConfigError(
                    f"evaluation target metric {target.metric!r} is not among the evaluated "
                    f"metrics ({', '.join(self.metrics)})"
                )

    def evaluates(self, version: int) -> bool:
        """Whether model ``version`` is due for evaluation (0, n, 2n, ...)."""
        return version % self.every_versions == 0


@dataclass(frozen=True, kw_only=True)
class CentralConfig(TierConfig):
    """The central daemon: partials in, signed model versions out.

    Attributes:
        initial_model: ``.npz`` file of version 0 (named float arrays, file order
            is the layout order), loaded without pickle.
        optimizer_name: ``fedavg``, ``fedadam`` or ``fedyogi``.
        optimizer_params: its parameters (``lr``, ``beta1``, ``beta2``, ``tau``).
        evaluation: the held-out evaluation of each version, or None for none.
        keep_versions: ``[retention] keep_versions``: how many of the newest
            versions keep their parameters in the store, on disk and in the
            registry (older ones keep pointer, lineage and metrics); 0 keeps all.
    """

    initial_model: Path
    optimizer_name: str = "fedavg"
    optimizer_params: Mapping[str, float] = field(default_factory=dict)
    evaluation: EvaluationSettings | None = None
    keep_versions: int = 200

    def __post_init__(self) -> None:
        TierConfig.__post_init__(self)
        self.make_optimizer()

    def make_optimizer(self) -> ServerOptimizer:
        """A fresh optimizer as configured.

        Raises:
            ConfigError: unknown optimizer or parameter.
        """
        return make_optimizer(self.optimizer_name, **dict(self.optimizer_params))


def _check_tokens(**tokens: str) -> None:
    for kind, value in tokens.items():
        try:
            check_token(kind, value)
        except LocalProtocolError as exc:
            raise ConfigError(str(exc)) from exc


def _check_partial_codec(codec: CodecSpec) -> None:
    if codec.k is not None:
        # A top-k numerator would silently drop most of the sum.
        raise ConfigError(f"partial codec {codec} is sparse; partials need a dense codec")


def load_initial_model(path: Path) -> tuple[ModelLayout, np.ndarray[Any, np.dtype[np.float32]]]:
    """Read an ``.npz`` of named float arrays: the layout (file order) and the flat vector.

    Raises:
        ConfigError: unreadable, not an npz, pickled objects, or no float arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ConfigError(f"initial model {path} is a single array; expected an .npz")
            arrays = {name: data[name] for name in data.files}
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load initial model {path}: {exc}") from exc
    if not arrays:
        raise ConfigError(f"initial model {path} holds no arrays")
    try:
        layout = ModelLayout.from_arrays(arrays)
        flat = layout.flatten(arrays)
    except LocalProtocolError as exc:
        raise ConfigError(f"initial model {path} cannot form a layout: {exc}") from exc
    if not bool(np.isfinite(flat).all()):
        raise ConfigError(f"initial model {path} holds NaN or infinite values")
    return layout, flat


# -- loading ------------------------------------------------------------------------

_DEFAULT_NATS: Final = NatsSettings()
# ``package.module:attribute``: the plug-in syntax of models and data loaders
# (``fedtier.client.plugins`` reads it the same way); anything else is a path.
_IMPORT_PATH: Final = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_DEFAULT_MQTT: Final = MqttSettings()
_DEFAULT_RETRY: Final = RetrySettings()
_NORM_POLICIES: Final[tuple[NormPolicy, ...]] = ("clip", "reject")


_NORM_BOUNDS: Final = ("adaptive", "fixed", "none")
# The edge's defaults (DEFAULT_MAX_SAMPLES and the rest) live in tiers.core._influence,
# shared with the simulator's [defences]; imported above and re-exported by this module.


_ADAPTIVE: Final = AdaptiveNorm()


def _edge_validation(table: ConfigTable) -> tuple[float | None, InfluenceRules]:
    """The edge's ``[validation]``: the norm bound and the per-device influence bounds.

    ``max_norm = <number>`` alone keeps its old meaning, a fixed bound;
    ``norm_bound = "adaptive"`` (the default otherwise) uses it as the warm-up
    value. No bound at all needs the unsafe switch ``no_norm_bound``.
    """
    explicit_off = table.raw("max_norm", None) is False
    max_norm = table.optional_number("max_norm")
    default_mode = "fixed" if max_norm is not None else "none" if explicit_off else "adaptive"
    mode = table.choice("norm_bound", _NORM_BOUNDS, default_mode)
    if mode == "none" or (mode == "fixed" and max_norm is None):
        if not unsafe_requested("no_norm_bound"):
            raise table.fail(
                "norm_bound" if table.has("norm_bound") else "max_norm",
                "a norm bound (no bound needs FEDTIER_UNSAFE=no_norm_bound)",
            )
        max_norm = None
    adaptive: AdaptiveNorm | None = None
    if mode == "adaptive":
        if max_norm is None:
            max_norm = DEFAULT_WARMUP_NORM
        adaptive = AdaptiveNorm(
            quantile=table.number(
                "norm_quantile", _ADAPTIVE.quantile, low=0.0, high=1.0, low_open=True
            ),
            factor=table.number("norm_factor", _ADAPTIVE.factor, low=0.0, low_open=True),
            window=table.integer("norm_window", _ADAPTIVE.window, low=1, high=1_000_000),
            warmup=table.integer("norm_warmup", _ADAPTIVE.warmup, low=1, high=1_000_000),
        )
        if adaptive.warmup > adaptive.window:
            raise table.fail("norm_warmup", f"an integer <= norm_window ({adaptive.window})")
    # "declared" (the default): a device without a declared size in the key
    # registry is capped at the median declared size, or DEFAULT_MAX_SAMPLES when
    # none is declared; a number caps those devices there. Declared sizes always
    # cap their own devices (tiers.core._influence).
    derive_cap = table.raw("max_samples", "declared") == "declared"
    max_samples = (
        DEFAULT_MAX_SAMPLES
        if derive_cap
        else table.integer("max_samples", DEFAULT_MAX_SAMPLES, low=1)
    )
    contributions = table.raw("max_updates_per_version", DEFAULT_MAX_UPDATES_PER_VERSION)
    per_version = (
        None
        if contributions is False
        else table.integer("max_updates_per_version", DEFAULT_MAX_UPDATES_PER_VERSION, low=1)
    )
    rate = table.optional_number("rate_per_s") if table.has("rate_per_s") else DEFAULT_RATE_PER_S
    burst = table.number("burst", DEFAULT_BURST, low=1.0)
    return max_norm, InfluenceRules(
        max_samples=max_samples,
        adaptive_norm=adaptive,
        max_updates_per_version=per_version,
        rate_per_s=rate,
        burst=burst,
        reject_future_base=True,
        derive_cap=derive_cap,
    )


def _partial_weight_cap(table: ConfigTable) -> int:
    """``[validation] max_samples`` of a regional or the central: the edges' weight cap.

    A registered edge (or regional) that lies about ``sample_count`` would
    otherwise weigh as much as it likes, as a device did before the edges
    capped ``n_samples``; a partial may claim at most ``update_count`` times
    this. Set it to at least every edge's ``max_samples``.
    """
    cap = table.integer("max_samples", DEFAULT_MAX_SAMPLES, low=1)
    table.finish()
    return cap


def parse_reputation(table: ConfigTable) -> ReputationRules | None:
    """The edge's ``[reputation]`` (docs/operations.md, reputation); None when ``enabled = false``.

    ``exempt`` lists device key ids never down-weighted: how an operator
    releases a device the score flagged wrongly (a config reload or restart).
    """
    default = ReputationRules()
    enabled = table.boolean("enabled", default.enabled)
    rules = ReputationRules(
        enabled=enabled,
        min_updates=table.integer("min_updates", default.min_updates, low=1),
        threshold=table.number("threshold", default.threshold, low=-1.0, high=0.99),
        low_weight=table.integer("low_weight", default.low_weight, low=1),
        sketch_dim=table.integer("sketch_dim", default.sketch_dim, low=16, high=1 << 16),
        exempt=frozenset(table.strings("exempt")),
    )
    table.finish()
    return rules if enabled else None


def _robust(table: ConfigTable) -> RobustRules:
    """``[robust]`` of an edge or a regional (docs/operations.md, robust aggregation)."""
    default = RobustRules()
    trim = table.number("trim", default.trim, low=0.0, high=0.5)
    if trim >= 0.5:
        raise table.fail("trim", "a fraction in [0, 0.5)")
    rules = RobustRules(
        rule=table.choice("rule", ROBUST_RULES, default.rule),
        trim=trim,
        outlier_score=table.choice("outlier_score", OUTLIER_SCORES, default.outlier_score),
        threshold=table.number("threshold", default.threshold, low=1.0, high=1e6),
        min_ratio=table.number("min_ratio", default.min_ratio, low=1.0, high=1e6),
        min_inputs=table.integer("min_inputs", default.min_inputs, low=3),
    )
    table.finish()
    return rules


def _nats(table: ConfigTable) -> NatsSettings:
    servers = table.raw("servers", list(_DEFAULT_NATS.servers))
    if isinstance(servers, str):
        servers = [servers]
    if (
        not isinstance(servers, list)
        or not servers
        or not all(isinstance(s, str) and s for s in servers)
    ):
        raise table.fail("servers", "a non-empty list of NATS URLs")
    monitoring = table.string("monitoring_url", None)
    if monitoring is not None and not monitoring.startswith(("http://", "https://")):
        raise table.fail("monitoring_url", "an http:// or https:// URL")
    monitorings = table.raw("monitoring_urls", [])
    if not isinstance(monitorings, list) or not all(
        isinstance(u, str) and u.startswith(("http://", "https://")) for u in monitorings
    ):
        raise table.fail("monitoring_urls", "a list of http:// or https:// URLs")
    settings = NatsSettings(
        servers=tuple(servers),
        monitoring_url=monitoring,
        monitoring_urls=tuple(monitorings),
        require_sync_always=table.boolean("require_sync_always", True),
        replicas=table.integer("replicas", _DEFAULT_NATS.replicas, low=1, high=5),
        jetstream_domain=table.string("jetstream_domain", None),
        ack_wait_s=table.number("ack_wait_s", _DEFAULT_NATS.ack_wait_s, low=0.0, low_open=True),
        max_deliver=table.integer("max_deliver", _DEFAULT_NATS.max_deliver, low=1),
        inbox_prefix=table.string("inbox_prefix", _DEFAULT_NATS.inbox_prefix),
        max_hold_s=table.number("max_hold_s", _DEFAULT_NATS.max_hold_s, low=0.0),
        tls_ca_file=table.path("tls_ca_file", None),
        tls_cert_file=table.path("tls_cert_file", None),
        tls_key_file=table.path("tls_key_file", None),
        credentials_file=table.path("credentials_file", None),
        nkeys_seed_file=table.path("nkeys_seed_file", None),
        manage_streams=table.boolean("manage_streams", None),
        max_parted_bytes=table.integer(
            "max_parted_bytes", _DEFAULT_NATS.max_parted_bytes, low=0, high=2**40
        ),
    )
    table.finish()
    return settings


def _limits(table: ConfigTable) -> Limits:
    values: dict[str, int] = {}
    for spec in fields(Limits):
        if table.has(spec.name):
            values[spec.name] = table.integer(spec.name, low=1)
    table.finish()
    return Limits(**values)


def _telemetry(table: ConfigTable) -> TelemetrySettings:
    settings = TelemetrySettings(
        jsonl_dir=table.path("jsonl_dir", None),
        prometheus_port=table.optional_port("prometheus_port"),
        prometheus_host=table.string("prometheus_host", "127.0.0.1"),
    )
    table.finish()
    return settings


def _status(table: ConfigTable) -> StatusSettings:
    default = StatusSettings()
    settings = StatusSettings(
        enabled=table.boolean("enabled", default.enabled),
        interval_s=table.number("interval_s", default.interval_s, low=0.1, high=3600.0),
        rate_window_s=table.number(
            "rate_window_s", default.rate_window_s, low=0.0, high=86_400.0, low_open=True
        ),
    )
    table.finish()
    return settings


def _lease(table: ConfigTable) -> LeaseSettings:
    default = LeaseSettings()
    settings = LeaseSettings(
        enabled=table.boolean("enabled", default.enabled),
        # Below 1 s a refresh every third of it races ordinary bus latency.
        ttl_s=table.number("ttl_s", default.ttl_s, low=1.0, high=3600.0),
        instance=table.string("instance", default.instance, nonempty=False),
    )
    table.finish()
    return settings


def _retention(table: ConfigTable, kind: TierKind) -> tuple[RetentionSettings, int]:
    """``[retention]`` and the central's ``keep_versions``.

    Elsewhere ``keep_versions`` is refused as an unknown key: only the central
    keeps model versions.
    """
    default = RetentionSettings()
    day = 86_400.0
    keep = CentralConfig.keep_versions
    history = default.version_history_s
    if kind == "central":
        keep = table.integer("keep_versions", keep, low=0)
        history = table.number(
            "version_history_s", history, low=0.0, high=3650 * day, low_open=True
        )
    dedupe = table.number(
        "dedupe_horizon_s", default.dedupe_horizon_s, low=0.0, high=3650 * day, low_open=True
    )
    max_age = table.number(
        "up_stream_max_age_s", default.up_stream_max_age_s, low=1.0, high=3650 * day
    )
    if dedupe < max_age:
        raise table.fail("dedupe_horizon_s", f"at least up_stream_max_age_s ({max_age:g})")
    settings = RetentionSettings(
        interval_s=table.number("interval_s", default.interval_s, low=0.0, low_open=True),
        dedupe_horizon_s=dedupe,
        outbox_horizon_s=table.number(
            "outbox_horizon_s", default.outbox_horizon_s, low=0.0, high=3650 * day
        ),
        prune_batch=table.integer("prune_batch", default.prune_batch, low=1, high=1_000_000),
        up_stream_max_age_s=max_age,
        up_stream_max_bytes=table.integer(
            "up_stream_max_bytes", default.up_stream_max_bytes, low=1 << 20
        ),
        span_file_max_bytes=table.integer(
            "span_file_max_bytes", default.span_file_max_bytes, low=1 << 12
        ),
        span_files_keep=table.integer("span_files_keep", default.span_files_keep, low=0),
        version_history_s=history,
    )
    table.finish()
    return settings, keep


def _retry(table: ConfigTable) -> RetrySettings:
    settings = RetrySettings(
        initial_backoff_s=table.number(
            "initial_backoff_s", _DEFAULT_RETRY.initial_backoff_s, low=0.0, low_open=True
        ),
        max_backoff_s=table.number(
            "max_backoff_s", _DEFAULT_RETRY.max_backoff_s, low=0.0, low_open=True
        ),
    )
    table.finish()
    return settings


def _codec(table: ConfigTable, key: str) -> CodecSpec:
    name = table.string(key, "f32")
    try:
        return CodecSpec.parse(name)
    except LocalProtocolError as exc:
        raise table.fail(key, f"a codec name such as 'f32', 'f16', 'i8' ({exc})") from exc


def _policies(root: ConfigTable) -> dict[str, Any]:
    flush = FlushPolicy.from_config(root.mapping("flush"), section=root.locate("flush"))
    staleness = StalenessPolicy.from_config(
        root.mapping("staleness"), section=root.locate("staleness")
    )
    return {"flush": flush, "staleness": staleness}


def _pinned_key(table: ConfigTable, key: str) -> str:
    """A pinned public key as written: 64 hex digits, or a path resolved like every other path."""
    value = table.string(key, "", nonempty=False)  # absent: the caller says what is missing
    if not value or is_hex_key(value):
        return value
    return str(table.resolve(value))


def _quarantine(table: ConfigTable) -> QuarantineLimits:
    """``[quarantine]``: the bounds past which a daemon leaves an input to its broker."""
    default = QuarantineLimits()
    limits = QuarantineLimits(
        max_bytes=table.integer("max_bytes", default.max_bytes, low=1),
        max_bytes_per_sender=table.integer(
            "max_bytes_per_sender", default.max_bytes_per_sender, low=1
        ),
        max_inputs_per_sender=table.integer(
            "max_inputs_per_sender", default.max_inputs_per_sender, low=1
        ),
    )
    table.finish()
    if limits.max_bytes_per_sender > limits.max_bytes:
        raise table.fail(
            "max_bytes_per_sender", f"at most quarantine.max_bytes ({limits.max_bytes})"
        )
    return limits


def _common(root: ConfigTable, kind: TierKind) -> dict[str, Any]:
    keys = root.table("keys")
    common: dict[str, Any] = {
        "fleet": root.string("fleet"),
        "identity_key": root.path("identity_key"),
        "state_dir": root.path("state_dir"),
        "sender_keys": keys.paths("senders"),
        "central_key": _pinned_key(keys, "central"),
        "root_key": _pinned_key(keys, "root") if keys.has("root") else "",
        "certificates": keys.paths("certificates"),
        "revocations": keys.path("revocations", None),
        "revocation_poll_s": keys.number("revocation_poll_s", 30.0, low=0.0, low_open=True),
        "nats": _nats(root.table("nats")),
        "limits": _limits(root.table("limits")),
        "intake_capacity": root.integer("intake_capacity", 64, low=1),
        "shutdown_timeout_s": root.number("shutdown_timeout_s", 30.0, low=0.0, low_open=True),
        "retry": _retry(root.table("retry")),
        "telemetry": _telemetry(root.table("telemetry")),
        "status": _status(root.table("status")),
        "quarantine": _quarantine(root.table("quarantine")),
        "lease": _lease(root.table("lease")),
        **_policies(root),
    }
    if kind != "central" and not common["sender_keys"]:
        raise ConfigError(f"{keys.locate('senders')} is missing; list at least one key registry")
    if not common["central_key"] and not common["root_key"]:
        # With the fleet root pinned, every central key is taken by its certificate.
        raise ConfigError(
            f"{keys.locate('central')} is empty; pin the fleet root ([keys] root), "
            "the central's public key, or both"
        )
    keys.finish()
    common["retention"], common["_keep_versions"] = _retention(root.table("retention"), kind)
    store = root.table("store")
    common["commit_window_s"] = store.number("commit_window_ms", 2.0, low=0.0) / 1000.0
    store.finish()
    return common


def _evaluation(table: ConfigTable) -> EvaluationSettings:
    model = table.string("model")
    args = dict(table.mapping("args"))
    data = table.string("data")
    data_args = dict(table.mapping("data_args"))
    label_raw = table.raw("label", None)
    if label_raw is not None and (
        isinstance(label_raw, bool) or not isinstance(label_raw, (str, int)) or label_raw == ""
    ):
        raise table.fail("label", "a column name or a 0-based column index")
    label: str | int | None = label_raw
    task: Literal["classification", "regression"] | None = None
    if table.has("task"):
        task = table.choice("task", _TASKS)
    metrics = table.strings("metrics")
    every = table.integer("every_versions", 1, low=1)
    target: EvaluationTarget | None = None
    if table.has("target"):
        spec = table.table("target")
        target = EvaluationTarget(
            spec.choice("metric", tuple(EVALUATION_METRICS)), spec.number("value")
        )
        spec.finish()
    # A loader stays a string (it is imported by the evaluator); a file is resolved
    # like every other path of the file.
    if not _IMPORT_PATH.fullmatch(data):
        data = str(table.resolve(data))
    settings = EvaluationSettings(
        model=model,
        args=args,
        data=data,
        data_args=data_args,
        label=label,
        task=task,
        metrics=metrics,
        every_versions=every,
        target=target,
        base_dir=table.resolve("."),
    )
    table.finish()
    return settings


def load_config(kind: TierKind, path: Path) -> TierConfig:
    """Read and check the TOML config of a ``kind`` daemon.

    Raises:
        ConfigError: the file is unreadable or a key or value is unusable.
    """
    if kind not in TIER_KINDS:
        raise ConfigError(f"daemon kind {kind!r} is not one of {', '.join(TIER_KINDS)}")
    path = Path(path)
    root = ConfigTable.load(path)
    common = _common(root, kind)
    keep = common.pop("_keep_versions")
    config: TierConfig
    try:
        if kind == "edge":
            validation = root.table("validation")
            policy = validation.choice("norm_policy", _NORM_POLICIES, "clip")
            max_norm, influence = _edge_validation(validation)
            validation.finish()
            partial = root.table("partial")
            codec = _codec(partial, "codec")
            partial.finish()
            config = EdgeConfig(
                **common,
                site=root.string("site"),
                region=root.string("region"),
                mqtt=parse_mqtt_settings(root.table("mqtt"), _DEFAULT_MQTT),
                max_norm=max_norm,
                norm_policy=policy,
                partial_codec=codec,
                influence=replace(influence, reputation=parse_reputation(root.table("reputation"))),
                robust=_robust(root.table("robust")),
            )
        elif kind == "regional":
            partial = root.table("partial")
            codec = _codec(partial, "codec")
            partial.finish()
            config = RegionalConfig(
                **common,
                max_samples_per_update=_partial_weight_cap(root.table("validation")),
                region=root.string("region"),
                partial_codec=codec,
                robust=_robust(root.table("robust")),
            )
        else:
            model = root.table("model")
            initial = model.path("initial")
            model.finish()
            optimizer = root.table("optimizer")
            name = optimizer.string("name", "fedavg")
            # Parameter names are the optimizer's to check (make_optimizer names
            # an unknown one); here they only have to be numbers.
            params = {key: optimizer.number(key) for key in optimizer.remaining()}
            evaluation = _evaluation(root.table("evaluation")) if root.has("evaluation") else None
            config = CentralConfig(
                **common,
                max_samples_per_update=_partial_weight_cap(root.table("validation")),
                initial_model=initial,
                optimizer_name=name,
                optimizer_params=params,
                evaluation=evaluation,
                keep_versions=keep,
            )
    except ConfigError as exc:
        message = str(exc)
        if not message.startswith(path.name):
            message = f"{path.name}: {message}"
        raise ConfigError(message) from exc
    root.finish()
    return config


def load_nats_settings(path: Path) -> tuple[str, NatsSettings]:
    """The fleet and ``[nats]`` table of a TOML file, for a NATS client that is no daemon.

    ``fedtier status`` reads any daemon's config this way (or an operator's
    file holding only ``fleet`` and ``[nats]``): it connects as that file says,
    without the daemon's keys, store or policies.

    Raises:
        ConfigError: the file is unreadable, or ``fleet`` or ``[nats]`` is unusable.
    """
    path = Path(path)
    root = ConfigTable.load(path)
    try:
        fleet = root.string("fleet")
        _check_tokens(fleet=fleet)
        settings = _nats(root.table("nats"))
    except ConfigError as exc:
        message = str(exc)
        if not message.startswith(path.name):
            message = f"{path.name}: {message}"
        raise ConfigError(message) from exc
    return fleet, settings
