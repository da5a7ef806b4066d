from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio
from trio.testing import MockClock

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.files import save_public_key, save_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.tiers._quarantine import QuarantineLimits
from fedtier.tiers.config import (
    CentralConfig,
    EdgeConfig,
    RegionalConfig,
    load_config,
    load_initial_model,
)
from fedtier.tiers.core import DEFAULT_MAX_SAMPLES
from fedtier.tiers.daemon import KeyValueFormatter, SystemdNotifier
from fedtier.tiers.registry import KeyRegistry, TierKeys, load_verify_key

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_edge_example_loads() -> None:
    config = load_config("edge", DEPLOY / "edge.example.toml")
    assert isinstance(config, EdgeConfig)
    assert (config.fleet, config.site, config.region) == ("acme", "plant-3", "eu-west")
    assert config.identity_key == DEPLOY / "keys/edge-plant-3-a.key"
    assert config.sender_keys == (DEPLOY / "keys/devices",)
    # Relative to the config file's folder, like every path (not the identity key's).
    assert config.root_key == str(DEPLOY / "keys/root.pub")
    assert config.central_key == ""  # the root alone: the central's key may rotate
    assert config.mqtt.client_id == "edge-plant-3-a"
    assert config.flush.max_inputs == 50
    assert config.flush.min_sample_weight is None
    assert config.staleness.max_staleness == 16
    assert config.max_norm == 100.0
    assert config.norm_policy == "clip"
    assert config.partial_codec == CodecSpec("f32")
    assert config.commit_window_s == pytest.approx(0.002)
    assert config.telemetry.prometheus_port == 9464
    assert config.telemetry.prometheus_host == "127.0.0.1"  # loopback unless told
    assert config.store_path == Path("/var/lib/fedtier/edge/state.sqlite")


def test_regional_and_central_examples_load() -> None:
    regional = load_config("regional", DEPLOY / "regional.example.toml")
    assert isinstance(regional, RegionalConfig)
    assert regional.region == "eu-west"
    assert regional.nats.ack_wait_s == 30.0
    central = load_config("central", DEPLOY / "central.example.toml")
    assert isinstance(central, CentralConfig)
    assert central.initial_model == DEPLOY / "models/initial.npz"
    assert central.make_optimizer().name == "fedavg"
    # The partial weight cap: on by default, the edges' default max_samples.
    assert regional.max_samples_per_update == central.max_samples_per_update == DEFAULT_MAX_SAMPLES


def test_regional_validation_max_samples_caps_partial_weight(tmp_path: Path) -> None:
    path = tmp_path / "regional.toml"
    base = (DEPLOY / "regional.example.toml").read_text()
    path.write_text(base.replace("[keys]", "[validation]\nmax_samples = 500\n\n[keys]", 1))
    assert load_config("regional", path).max_samples_per_update == 500
    path.write_text(base.replace("[keys]", "[validation]\nmax_samples = 0\n\n[keys]", 1))
    with pytest.raises(ConfigError, match="max_samples"):
        load_config("regional", path)


EDGE_MINIMAL = """
fleet = "acme"
site = "s1"
region = "r1"
identity_key = "k.pem"
state_dir = "state"
[keys]
senders = "devices.toml"
central = "central.pub"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour = 'red'", "edge.toml: colour is not a known setting"),
        ("[mqtt]\nprot = 1883", "mqtt.prot is not a known setting"),
        ("[mqtt]\nport = 70000", "mqtt.port is 70000"),
        ("[flush]\nmax_inputs = 0", "max_inputs is 0"),
        ("[flush]\nmax_age_s = -1", "max_age_s is -1"),
        ("[staleness]\nkind = 'linear'", "staleness.kind is 'linear'"),
        ("[validation]\nnorm_policy = 'shrink'", "validation.norm_policy is 'shrink'"),
        ("[validation]\nmax_norm = 0", "validation.max_norm is 0"),
        ("[partial]\ncodec = 'f33'", "partial.codec is 'f33'"),
        ("[partial]\ncodec = 'top10+f32'", "partials need a dense codec"),
        ("[telemetry]\nprometheus_port = 'x'", "telemetry.prometheus_port is 'x'"),
        ("[store]\ncommit_window_ms = -1", "store.commit_window_ms is -1"),
        ("[limits]\nmax_ids = 0", "limits.max_ids is 0"),
        ("[nats]\nservers = []", "nats.servers is []"),
        ("[nats]\nack_wait_s = 0", "nats.ack_wait_s is 0"),
        ("intake_capacity = 0", "intake_capacity is 0"),
    ],
)
def test_bad_edge_values_are_named(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "edge.toml"
    # Top-level keys must come before the first table.
    text = EDGE_MINIMAL + "\n" + extra if extra.startswith("[") else extra + "\n" + EDGE_MINIMAL
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("edge", path)


def test_minimal_edge_config_takes_defaults(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(EDGE_MINIMAL)
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    assert config.state_dir == tmp_path / "state"
    assert config.sender_keys == (tmp_path / "devices.toml",)
    # A norm bound is always on: adaptive by default, warming up from 10.
    assert config.max_norm == 10.0
    assert config.influence.adaptive_norm is not None
    assert config.nats.ack_wait_s == 30.0
    assert (config.nats.max_deliver, config.nats.max_hold_s) == (50, 300.0)


def test_quarantine_bounds_come_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(EDGE_MINIMAL)
    assert load_config("edge", path).quarantine == QuarantineLimits()  # the defaults
    path.write_text(
        EDGE_MINIMAL + "\n[quarantine]\nmax_bytes = 1000000\nmax_bytes_per_sender = 5000\n"
        "max_inputs_per_sender = 7\n"
    )
    assert load_config("edge", path).quarantine == QuarantineLimits(
        max_bytes=1_000_000, max_bytes_per_sender=5000, max_inputs_per_sender=7
    )
    path.write_text(EDGE_MINIMAL + "\n[quarantine]\nmax_bytes = 10\nmax_bytes_per_sender = 20\n")
    with pytest.raises(ConfigError, match="max_bytes_per_sender"):
        load_config("edge", path)


def test_nats_and_telemetry_keys_reach_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(
        EDGE_MINIMAL
        + "\n[nats]\nservers = ['nats://127.0.0.1:4222']\nmax_deliver = 7\nmax_hold_s = 0\n"
        + "\n[telemetry]\nprometheus_port = 9464\nprometheus_host = '0.0.0.0'\n"
    )
    config = load_config("edge", path)
    assert (config.nats.max_deliver, config.nats.max_hold_s) == (7, 0.0)
    assert (config.telemetry.prometheus_host, config.telemetry.prometheus_port) == ("0.0.0.0", 9464)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (EDGE_MINIMAL.replace('fleet = "acme"', 'fleet = "Acme!"'), "fleet name 'Acme!'"),
        (EDGE_MINIMAL.replace('site = "s1"', ""), "site is missing"),
        (EDGE_MINIMAL.replace('senders = "devices.toml"', ""), "keys.senders is missing"),
        (EDGE_MINIMAL.replace('central = "central.pub"', 'central = ""'), "keys.central"),
        ("fleet = [", "not valid TOML"),
    ],
)
def test_missing_or_invalid_required_values(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config("edge", path)


def test_central_optimizer_errors_are_named(tmp_path: Path) -> None:
    path = tmp_path / "central.toml"
    path.write_text(
        'fleet = "acme"\nidentity_key = "k"\nstate_dir = "s"\n[keys]\ncentral = "c.pub"\n'
        '[model]\ninitial = "m.npz"\n[optimizer]\nname = "fedadam"\nbeta3 = 0.1\n'
    )
    with pytest.raises(ConfigError, match="beta3"):
        load_config("central", path)


def test_missing_file_and_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("edge", tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="daemon kind"):
        load_config("hub", tmp_path / "nope.toml")  # type: ignore[arg-type]


def test_initial_model_layout_is_file_order_and_pickle_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "m.npz"
    np.savez(good, b=np.ones((2, 3), np.float32), a=np.zeros(4, np.float32))
    layout, flat = load_initial_model(good)
    assert [t.name for t in layout.tensors] == ["b", "a"]
    assert flat.shape == (10,)
    assert flat[:6].tolist() == [1.0] * 6
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ConfigError, match="cannot load initial model"):
        load_initial_model(pickled)
    ints = tmp_path / "i.npz"
    np.savez(ints, x=np.arange(3))
    with pytest.raises(ConfigError, match="cannot form a layout"):
        load_initial_model(ints)


# -- key registries ------------------------------------------------------------------


def test_key_registry_from_toml_and_pem_folder(tmp_path: Path) -> None:
    a, b, c = (SigningIdentity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
    toml = tmp_path / "devices.toml"
    toml.write_text(f'[keys]\nveh-0042 = "{a.verify_key.raw.hex()}"\n')
    folder = tmp_path / "devices.d"
    folder.mkdir()
    save_public_key(b.verify_key, folder / "veh-7.pub")
    registry = KeyRegistry([toml, folder], role="device")
    assert set(registry) == {a.key_id, b.key_id}
    assert registry[a.key_id] == a.verify_key
    assert registry.describe(a.key_id) == f"device 'veh-0042' ({a.key_id[:5]}...)"
    assert registry.describe(c.key_id).startswith("unregistered device")
    assert registry.get(c.key_id) is None
    save_public_key(c.verify_key, folder / "veh-8.pub")
    registry.reload()
    assert c.key_id in registry


def test_bad_key_registry_entries(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[keys]\nveh = "zz"\n')
    with pytest.raises(ConfigError, match="key 'veh' is unusable"):
        KeyRegistry([bad])
    other = tmp_path / "other.toml"
    other.write_text("[devices]\n")
    with pytest.raises(ConfigError, match="unknown table 'devices'"):
        KeyRegistry([other])
    key = SigningIdentity.from_seed(b"\x05" * 32).verify_key.raw.hex()
    twice = tmp_path / "twice.toml"
    twice.write_text(f'[keys]\nx = "{key}"\ny = "{key}"\n')
    with pytest.raises(ConfigError, match="listed as both"):
        KeyRegistry([twice])


def test_tier_keys_load(tmp_path: Path) -> None:
    me = SigningIdentity.from_seed(b"\x09" * 32)
    central = SigningIdentity.from_seed(b"\x0a" * 32)
    (tmp_path / "keys").mkdir()
    save_signing_identity(me, tmp_path / "keys" / "me.key")
    save_public_key(central.verify_key, tmp_path / "keys" / "central.pub")
    (tmp_path / "senders.toml").write_text("[keys]\n")
    keys = TierKeys.load(
        tmp_path / "keys" / "me.key",
        [tmp_path / "senders.toml"],
        "keys/central.pub",
        role="edge",
        base_dir=tmp_path,
    )
    assert keys.identity.key_id == me.key_id
    assert keys.central == central.verify_key
    assert load_verify_key(central.verify_key.raw.hex()) == central.verify_key
    with pytest.raises(ConfigError, match="neither 64 hex digits nor a key file"):
        load_verify_key("nothing-here.pub", base_dir=tmp_path)


# -- daemon helpers ------------------------------------------------------------------


def test_log_lines_are_key_value() -> None:
    record = logging.makeLogRecord(
        {"name": "fedtier.edge", "levelname": "INFO", "msg": 'partial %s "sent"', "args": ("ab",)}
    )
    record.partial_id = "ab12"
    line = KeyValueFormatter().format(record)
    assert "level=info logger=fedtier.edge" in line
    assert 'msg="partial ab \\"sent\\""' in line
    assert line.endswith("partial_id=ab12")


def test_sd_notify_sends_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        notifier = SystemdNotifier.from_environment()
        assert notifier is not None
        assert notifier.watchdog_s == 4.0
        notifier.notify("READY=1")
        notifier.close()
        assert server.recv(64) == b"READY=1"
    finally:
        server.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert SystemdNotifier.from_environment() is None


async def test_edge_waits_for_a_broker_that_is_not_up_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: MockClock
) -> None:
    import fedtier.protocol.bus.mqtt as mqtt_package
    from fedtier.protocol.errors import BusUnavailable
    from fedtier.tiers import daemon

    path = tmp_path / "edge.toml"
    path.write_text(EDGE_MINIMAL)
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    refusals = 3
    tries: list[float] = []
    bus = object()

    @asynccontextmanager
    async def fake_open(mqtt_config: mqtt_package.MqttConfig) -> AsyncIterator[object]:
        tries.append(trio.current_time())
        if len(tries) <= refusals:
            raise BusUnavailable("connection refused")
        yield bus

    # The daemon imports open_mqtt_bus from the public package when it opens the bus.
    monkeypatch.setattr(mqtt_package, "open_mqtt_bus", fake_open)
    async with daemon._open_mqtt(config) as opened:
        assert opened is bus
    assert len(tries) == refusals + 1
    assert tries[1] - tries[0] == pytest.approx(config.retry.initial_backoff_s)

    refusals = daemon.MQTT_CONNECT_ATTEMPTS
    tries.clear()
    with pytest.raises(BusUnavailable):
        async with daemon._open_mqtt(config):
            pass
    assert len(tries) == daemon.MQTT_CONNECT_ATTEMPTS


async def test_registry_open_waits_out_a_nats_restart(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    from fedtier.protocol.errors import BusUnavailable
    from fedtier.simulations.testing import RecordingMetrics
    from fedtier.tiers import daemon

    path = tmp_path / "edge.toml"
    path.write_text(EDGE_MINIMAL)
    config = load_config("edge", path)
    kv, blobs = object(), object()

    class RestartingNats:
        """Answers nothing in time twice (the server is restarting), then works."""

        def __init__(self) -> None:
            self.calls: list[str] = []

        async def _answer(self, what: str, value: object) -> object:
            self.calls.append(what)
            await trio.lowlevel.checkpoint()
            if len(self.calls) <= 2:
                raise BusUnavailable(f"{what}: no reply in time")
            return value

        async def kv_bucket(self, name: str) -> object:
            return await self._answer(f"kv {name}", kv)

        async def object_store(self, name: str) -> object:
            return await self._answer(f"objects {name}", blobs)

    nats = RestartingNats()
    metrics = RecordingMetrics()
    registry = await daemon.open_registry(nats, config, metrics)
    assert (registry._kv, registry._objects) == (kv, blobs)
    assert len(nats.calls) == 4
    assert metrics.calls["retry:open_registry"] == 2
