"""What ``prepare_mesh`` writes is what daemons, fleets and devices read (no process started)."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedtier.client.config import load_device_settings
from fedtier.protocol.errors import ConfigError
from fedtier.simulations.fleet import load_fleet_config
from fedtier.simulations.mesh import Brokers, MeshSpec, prepare_mesh
from fedtier.simulations.testing import TestPki
from fedtier.tiers.config import EdgeConfig, load_config, load_initial_model


def _fake_brokers(pki: TestPki | None = None) -> Brokers:
    # prepare_mesh reads only addresses (and, with TLS, the CA) from the brokers;
    # no process is started.
    mosquitto: Any = SimpleNamespace(host="127.0.0.1", port=1883, tier_port=1883)
    nats: Any = SimpleNamespace(url="nats://127.0.0.1:4222", monitoring_url="http://127.0.0.1:8222")
    return Brokers(mosquitto, nats, pki)


def test_every_written_config_loads(tmp_path: Path) -> None:
    spec = MeshSpec(devices=13, standalone_devices=1, misbehaving=2)
    plan = prepare_mesh(spec, tmp_path / "work", tmp_path / "out", _fake_brokers())

    central = load_config("central", plan.central_config)
    assert central.flush.max_inputs == spec.central_flush.max_inputs
    for config in plan.regional_configs.values():
        load_config("regional", config)
    edges = {site: load_config("edge", path) for site, path in plan.edge_configs.items()}
    assert set(edges) == set(spec.sites)

    fleets = {site: load_fleet_config(path) for site, path in plan.fleet_configs.items()}
    in_fleets = [d for f in fleets.values() for d in f.devices]
    assert len(in_fleets) == 12  # one device runs on its own
    assert {d.kind for d in in_fleets} == {"vehicle", "factory", "iot"}
    assert sum(d.misbehave_every_s is not None for d in in_fleets) == 2
    assert all(d.site == site for site, f in fleets.items() for d in f.devices)

    (device_config,) = plan.device_configs.values()
    settings = load_device_settings(device_config)
    assert settings.device.rounds == spec.standalone_rounds
    assert settings.training.model == "mlp"

    layout, params = load_initial_model(plan.initial_model)
    assert [t.name for t in layout.tensors] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert params.size == 64 * 32 + 32 + 32 * 10 + 10

    key = plan.workdir / "keys" / "central.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sum(d.n_examples for d in plan.devices) == len(plan.split.y_train)


def test_with_tls_every_client_gets_a_certificate_named_for_its_identity(
    tmp_path: Path,
) -> None:
    pki = TestPki.create(tmp_path / "pki")
    spec = MeshSpec(devices=6, standalone_devices=1, misbehaving=0)
    plan = prepare_mesh(spec, tmp_path / "work", tmp_path / "out", _fake_brokers(pki))
    for site, path in plan.edge_configs.items():
        edge = load_config("edge", path)
        assert isinstance(edge, EdgeConfig)
        assert edge.mqtt.tls_ca_file == pki.ca_file
        assert edge.mqtt.tls_cert_file is not None
        assert _common_name(edge.mqtt.tls_cert_file) == f"edge-{site}"
        assert edge.nats.tls_cert_file is not None
    key_ids = {d.name: d.key_id for d in plan.devices}
    for fleet_file in plan.fleet_configs.values():
        fleet = load_fleet_config(fleet_file)
        assert fleet.ca_file == pki.ca_file
        for device in fleet.devices:
            assert device.cert_file is not None
            assert device.key_file is not None
            # The ACL's %u is the certificate's CN: it must be the device's key id.
            assert _common_name(device.cert_file) == key_ids[device.name]
    (device_config,) = plan.device_configs.values()
    settings = load_device_settings(device_config)
    assert settings.mqtt.tls_cert_file is not None
    assert settings.mqtt.tls_ca_file == pki.ca_file


def _common_name(cert_file: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    (attribute,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def test_base_interval_scales_with_the_fleet() -> None:
    small, large = MeshSpec(devices=24), MeshSpec(devices=240)
    assert large.base_interval_s() == pytest.approx(10 * small.base_interval_s())


def test_too_few_fleet_devices_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot cover 4 sites"):
        prepare_mesh(MeshSpec(devices=3), tmp_path, tmp_path / "out", _fake_brokers())
