"""Typed configuration of the tier daemons, loaded from TOML; imports protocol and tiers math only.

No bus, no trio: a config is plain frozen data. ``load_config(kind, path)``
reads a file with ``tomllib``; every unknown key or unusable value raises
``ConfigError`` with one sentence naming it (``edge.toml: flush.max_inputs is 0;
expected an integer >= 1``). Relative paths are relative to the file's folder.
Commented examples live in ``deploy/*.example.toml``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import numpy as np

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits
from fedtier.protocol.names import check_token
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.optimizers import ServerOptimizer, make_optimizer
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.validation import NormPolicy

__all__ = [
    "CentralConfig",
    "EdgeConfig",
    "MqttSettings",
    "NatsSettings",
    "RegionalConfig",
    "RetrySettings",
    "TelemetrySettings",
    "TierConfig",
    "TierKind",
    "load_config",
    "load_initial_model",
]

TierKind: TypeAlias = Literal["edge", "regional", "central"]
TIER_KINDS: Final = ("edge", "regional", "central")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How an edge reaches its site's MQTT broker.

    Attributes:
        host: broker host name or address.
        port: broker port (8883 is usual with TLS).
        client_id: MQTT client id; stable, so the broker keeps the session.
        keepalive_s: MQTT keepalive; well above any consumer stall.
        session_expiry_s: how long the broker keeps the session while away.
        tls_ca_file, tls_cert_file, tls_key_file: PEM files for TLS (client cert auth).
        shared_subscription: share the site's updates with other edges through an
            MQTT v5 shared subscription. Off by default: Mosquitto 2.0 delivers
            nothing new to a shared subscription after a broker restart until it is
            subscribed again (a window in which PUBACKed updates are dropped and
            only the devices' resends recover them), and an update redelivered to
            another edge after a crash would be folded by both (their stores do
            not share dedupe).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "fedtier-edge"
    keepalive_s: int = 60
    session_expiry_s: int = 86_400
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    shared_subscription: bool = False


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """How a daemon reaches NATS.

    Attributes:
        servers: server URLs.
        monitoring_url: HTTP monitoring base URL, read to check ``sync_interval: always``.
        require_sync_always: refuse a server that does not fsync every JetStream write.
        ack_wait_s: how long JetStream waits for this daemon's ack of a delivery
            before redelivering it (set when the durable consumer is created).
        tls_ca_file, tls_cert_file, tls_key_file: PEM files for TLS.
        credentials_file: a ``.creds`` file (user JWT and nkey seed).
        nkeys_seed_file: an nkeys user seed.
        manage_streams: create or update the JetStream streams at start; None
            means only the central does (the others just check they exist), which
            is what the per-user permissions of deploy/nats/nats-server.conf allow.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    monitoring_url: str | None = None
    require_sync_always: bool = True
    ack_wait_s: float = 30.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    credentials_file: Path | None = None
    nkeys_seed_file: Path | None = None
    manage_streams: bool | None = None


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """Where telemetry goes (``OTEL_*`` variables still choose exporters).

    Attributes:
        jsonl_dir: folder of the JSON-lines span file when no OTLP endpoint is set.
        prometheus_port: port of the Prometheus scrape endpoint, or None for none.
    """

    jsonl_dir: Path | None = None
    prometheus_port: int | None = None


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
        central_key: the pinned central public key: 64 hex digits or a PEM path.
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
    """

    fleet: str
    identity_key: Path
    state_dir: Path
    sender_keys: tuple[Path, ...] = ()
    central_key: str = ""
    nats: NatsSettings = field(default_factory=NatsSettings)
    flush: FlushPolicy = field(default_factory=FlushPolicy)
    staleness: StalenessPolicy = field(default_factory=StalenessPolicy)
    limits: Limits = DEFAULT_LIMITS
    commit_window_s: float = 0.002
    intake_capacity: int = 64
    shutdown_timeout_s: float = 30.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

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
        max_norm: L2 bound on device updates, or None for none.
        norm_policy: ``clip`` (scale down, count as anomalous) or ``reject``.
        partial_codec: how partial numerators are encoded upstream.
    """

    site: str
    region: str
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    max_norm: float | None = None
    norm_policy: NormPolicy = "clip"
    partial_codec: CodecSpec = field(default_factory=lambda: CodecSpec("f32"))

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
    """

    region: str
    partial_codec: CodecSpec = field(default_factory=lambda: CodecSpec("f32"))

    def __post_init__(self) -> None:
        TierConfig.__post_init__(self)
        _check_tokens(region=self.region)
        _check_partial_codec(self.partial_codec)


@dataclass(frozen=True, kw_only=True)
class CentralConfig(TierConfig):
    """The central daemon: partials in, signed model versions out.

    Attributes:
        initial_model: ``.npz`` file of version 0 (named float arrays, file order
            is the layout order), loaded without pickle.
        optimizer_name: ``fedavg``, ``fedadam`` or ``fedyogi``.
        optimizer_params: its parameters (``lr``, ``beta1``, ``beta2``, ``tau``).
    """

    initial_model: Path
    optimizer_name: str = "fedavg"
    optimizer_params: Mapping[str, float] = field(default_factory=dict)

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

_REQUIRED: Final = object()
_DEFAULT_NATS: Final = NatsSettings()
_DEFAULT_MQTT: Final = MqttSettings()
_DEFAULT_RETRY: Final = RetrySettings()


class _Table:
    """One TOML table being read: typed getters, then a check that nothing is left over."""

    def __init__(self, data: Mapping[str, Any], name: str, file: Path) -> None:
        self._data = data
        self._name = name
        self._file = file
        self._used: set[str] = set()

    def _where(self, key: str) -> str:
        full = f"{self._name}.{key}" if self._name else key
        return f"{self._file.name}: {full}"

    def _get(self, key: str, default: object) -> Any:
        self._used.add(key)
        if key in self._data:
            return self._data[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self._where(key)} is missing; it is required")
        return default

    def fail(self, key: str, value: object, expected: str) -> ConfigError:
        return ConfigError(f"{self._where(key)} is {value!r}; expected {expected}")

    def has(self, key: str) -> bool:
        return key in self._data

    def str_(self, key: str, default: object = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, str):
            raise self.fail(key, value, "a string")
        return value

    def int_(self, key: str, default: object = _REQUIRED, *, minimum: int = 0) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, value, f"an integer >= {minimum}")
        return value

    def float_(self, key: str, default: object = _REQUIRED, *, allow_off: bool = False) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if allow_off and value is False:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            expected = "a number > 0" + (", or false for none" if allow_off else "")
            raise self.fail(key, value, expected)
        return float(value)

    def bool_(self, key: str, default: object = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, bool):
            raise self.fail(key, value, "true or false")
        return value

    def path(self, key: str, default: object = _REQUIRED) -> Any:
        value = self.str_(key, default)
        if value is default or value is None:
            return value
        if not value:
            raise self.fail(key, value, "a non-empty path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self._file.parent / path

    def paths(self, key: str) -> tuple[Path, ...]:
        value = self._get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, value, "a path or a list of paths")
        out = []
        for item in value:
            path = Path(item).expanduser()
            out.append(path if path.is_absolute() else self._file.parent / path)
        return tuple(out)

    def table(self, key: str) -> _Table:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, value, "a table")
        return _Table(value, f"{self._name}.{key}" if self._name else key, self._file)

    def raw_table(self, key: str) -> dict[str, Any]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, value, "a table")
        return value

    def finish(self) -> None:
        unknown = sorted(k for k in self._data if k not in self._used)
        if unknown:
            raise ConfigError(f"{self._where(unknown[0])} is not a known setting")


def _nats(table: _Table) -> NatsSettings:
    servers = table._get("servers", list(_DEFAULT_NATS.servers))
    if isinstance(servers, str):
        servers = [servers]
    if (
        not isinstance(servers, list)
        or not servers
        or not all(isinstance(s, str) and s for s in servers)
    ):
        raise table.fail("servers", servers, "a non-empty list of NATS URLs")
    monitoring = table.str_("monitoring_url", None)
    if monitoring is not None and not monitoring.startswith(("http://", "https://")):
        raise table.fail("monitoring_url", monitoring, "an http:// or https:// URL")
    settings = NatsSettings(
        servers=tuple(servers),
        monitoring_url=monitoring,
        require_sync_always=table.bool_("require_sync_always", True),
        ack_wait_s=table.float_("ack_wait_s", _DEFAULT_NATS.ack_wait_s),
        tls_ca_file=table.path("tls_ca_file", None),
        tls_cert_file=table.path("tls_cert_file", None),
        tls_key_file=table.path("tls_key_file", None),
        credentials_file=table.path("credentials_file", None),
        nkeys_seed_file=table.path("nkeys_seed_file", None),
        manage_streams=table.bool_("manage_streams", None),
    )
    table.finish()
    return settings


def _mqtt(table: _Table) -> MqttSettings:
    port = table.int_("port", 1883, minimum=1)
    if port > 65535:
        raise table.fail("port", port, "a TCP port (1-65535)")
    client_id = table.str_("client_id", _DEFAULT_MQTT.client_id)
    if not 1 <= len(client_id) <= 128:
        raise table.fail("client_id", client_id, "1-128 characters")
    settings = MqttSettings(
        host=table.str_("host", _DEFAULT_MQTT.host),
        port=port,
        client_id=client_id,
        keepalive_s=table.int_("keepalive_s", _DEFAULT_MQTT.keepalive_s, minimum=5),
        session_expiry_s=table.int_("session_expiry_s", _DEFAULT_MQTT.session_expiry_s, minimum=1),
        tls_ca_file=table.path("tls_ca_file", None),
        tls_cert_file=table.path("tls_cert_file", None),
        tls_key_file=table.path("tls_key_file", None),
        shared_subscription=table.bool_("shared_subscription", False),
    )
    table.finish()
    return settings


def _limits(table: _Table) -> Limits:
    values: dict[str, int] = {}
    for spec in fields(Limits):
        if table.has(spec.name):
            values[spec.name] = table.int_(spec.name, minimum=1)
    table.finish()
    return Limits(**values)


def _telemetry(table: _Table) -> TelemetrySettings:
    port = table._get("prometheus_port", None)
    if port is False:
        port = None
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
    ):
        raise table.fail("prometheus_port", port, "a TCP port (1-65535), or false for none")
    settings = TelemetrySettings(jsonl_dir=table.path("jsonl_dir", None), prometheus_port=port)
    table.finish()
    return settings


def _retry(table: _Table) -> RetrySettings:
    settings = RetrySettings(
        initial_backoff_s=table.float_("initial_backoff_s", _DEFAULT_RETRY.initial_backoff_s),
        max_backoff_s=table.float_("max_backoff_s", _DEFAULT_RETRY.max_backoff_s),
    )
    table.finish()
    return settings


def _codec(table: _Table, key: str) -> CodecSpec:
    name = table.str_(key, "f32")
    try:
        return CodecSpec.parse(name)
    except LocalProtocolError as exc:
        raise table.fail(key, name, f"a codec name such as 'f32', 'f16', 'i8' ({exc})") from exc


def _policies(root: _Table, file: Path) -> dict[str, Any]:
    try:
        flush = FlushPolicy.from_config(root.raw_table("flush"))
        staleness = StalenessPolicy.from_config(root.raw_table("staleness"))
    except ConfigError as exc:
        raise ConfigError(f"{file.name}: {exc}") from exc
    return {"flush": flush, "staleness": staleness}


def _common(root: _Table, file: Path, kind: TierKind) -> dict[str, Any]:
    keys = root.table("keys")
    common: dict[str, Any] = {
        "fleet": root.str_("fleet"),
        "identity_key": root.path("identity_key"),
        "state_dir": root.path("state_dir"),
        "sender_keys": keys.paths("senders"),
        "central_key": keys.str_("central"),
        "nats": _nats(root.table("nats")),
        "limits": _limits(root.table("limits")),
        "intake_capacity": root.int_("intake_capacity", 64, minimum=1),
        "shutdown_timeout_s": root.float_("shutdown_timeout_s", 30.0),
        "retry": _retry(root.table("retry")),
        "telemetry": _telemetry(root.table("telemetry")),
        **_policies(root, file),
    }
    if kind != "central" and not common["sender_keys"]:
        raise ConfigError(f"{file.name}: keys.senders is missing; list at least one key registry")
    if not common["central_key"]:
        raise ConfigError(f"{file.name}: keys.central is empty; pin the central's public key")
    keys.finish()
    store = root.table("store")
    window_ms = store._get("commit_window_ms", 2.0)
    if isinstance(window_ms, bool) or not isinstance(window_ms, int | float) or window_ms < 0:
        raise store.fail("commit_window_ms", window_ms, "a number of milliseconds >= 0")
    common["commit_window_s"] = float(window_ms) / 1000.0
    store.finish()
    return common


def load_config(kind: TierKind, path: Path) -> TierConfig:
    """Read and check the TOML config of a ``kind`` daemon.

    Raises:
        ConfigError: the file is unreadable or a key or value is unusable.
    """
    if kind not in TIER_KINDS:
        raise ConfigError(f"daemon kind {kind!r} is not one of {', '.join(TIER_KINDS)}")
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    root = _Table(data, "", path)
    common = _common(root, path, kind)
    config: TierConfig
    try:
        if kind == "edge":
            validation = root.table("validation")
            policy = validation.str_("norm_policy", "clip")
            if policy not in ("clip", "reject"):
                raise validation.fail("norm_policy", policy, "'clip' or 'reject'")
            max_norm = validation.float_("max_norm", None, allow_off=True)
            validation.finish()
            partial = root.table("partial")
            codec = _codec(partial, "codec")
            partial.finish()
            config = EdgeConfig(
                **common,
                site=root.str_("site"),
                region=root.str_("region"),
                mqtt=_mqtt(root.table("mqtt")),
                max_norm=max_norm,
                norm_policy=policy,
                partial_codec=codec,
            )
        elif kind == "regional":
            partial = root.table("partial")
            codec = _codec(partial, "codec")
            partial.finish()
            config = RegionalConfig(**common, region=root.str_("region"), partial_codec=codec)
        else:
            model = root.table("model")
            initial = model.path("initial")
            model.finish()
            optimizer = root.table("optimizer")
            name = optimizer.str_("name", "fedavg")
            params = {k: v for k, v in optimizer._data.items() if k != "name"}
            optimizer._used.update(params)
            config = CentralConfig(
                **common, initial_model=initial, optimizer_name=name, optimizer_params=params
            )
    except ConfigError as exc:
        message = str(exc)
        if not message.startswith(path.name):
            message = f"{path.name}: {message}"
        raise ConfigError(message) from exc
    root.finish()
    return config
