"""A fleet file reads into typed settings, and each bad one is one sentence naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.protocol.files import save_public_key
from fedtier.protocol.identity import SigningIdentity
from fedtier.simulations.fleet import load_fleet_config

_FLEET = """\
fleet = "demo"
name = "fleet-a"
state_dir = "state"
log_dir = "logs"

[mqtt]
port = 1883

[central]
public_key = "central.pub"

[kinds.vehicle]
min_interval_s = 1.0
online_mean_s = false

[sites.harbour]
edge_keys = ["edge.pub"]

[[devices]]
name = "veh-1"
kind = "vehicle"
site = "harbour"
identity_key = "veh-1.key"
data = "veh-1.npz"
"""

_DEVICE = """
[[devices]]
name = "veh-2"
kind = "vehicle"
site = "harbour"
identity_key = "veh-2.key"
data = "veh-2.npz"
"""


def _write(tmp_path: Path, text: str) -> Path:
    for name in ("central.pub", "edge.pub"):
        if not (tmp_path / name).exists():
            save_public_key(SigningIdentity.generate().verify_key, tmp_path / name)
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_defaults_fill_in_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load_fleet_config(_write(tmp_path, _FLEET))
    assert (config.fleet, config.name, config.mqtt_host, config.mqtt_port) == (
        "demo",
        "fleet-a",
        "127.0.0.1",
        1883,
    )
    assert config.duration_s is None
    assert config.trace_dir is None
    assert config.state_dir == tmp_path / "state"
    assert config.send.codec == "i8"
    assert config.training.num_classes == 10
    assert config.kinds["vehicle"].online_mean_s is None
    assert len(config.edge_keys["harbour"]) == 1
    (device,) = config.devices
    assert (device.kind, device.data) == ("vehicle", tmp_path / "veh-1.npz")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('fleet = "demo"', 'fleet = "Demo"', "fleet.toml: fleet: fleet name 'Demo' is invalid"),
        ("port = 1883", "port = 70000", "fleet.toml: mqtt.port is 70000; expected a TCP port"),
        ("port = 1883", "prot = 1883", "fleet.toml: mqtt.port is missing; it is required"),
        ("min_interval_s = 1.0", "min_interval_s = -1", "kinds.vehicle.min_interval_s is -1"),
        ("[sites.harbour]", "[sites.Harbour]", "fleet.toml: sites: site name 'Harbour' is"),
        ('["edge.pub"]', "[]", "sites.harbour.edge_keys is []; expected a path or a non-empty"),
        ('["edge.pub"]', '["none.pub"]', "sites.harbour.edge_keys[0]: cannot read public key"),
        ('kind = "vehicle"', 'kind = "iot"', "devices[0]: kind 'iot' has no [kinds.iot] table"),
        ('site = "harbour"', 'site = "dock"', "devices[0]: site 'dock' has no [sites.dock] table"),
        ('name = "veh-1"', 'name = "veh 1"', "devices[0].name: device name 'veh 1' is invalid"),
        ('data = "veh-1.npz"', 'data = "veh-1.npz"\ncolour = 1', "devices[0].colour is not a"),
        ('name = "veh-2"', 'name = "veh-1"', "devices[1]: device name 'veh-1' is listed twice"),
        ('log_dir = "logs"', 'log_dir = "logs"\nlogdir = 1', "fleet.toml: logdir is not a known"),
        (
            'log_dir = "logs"',
            'log_dir = "logs"\nduration_s = 0',
            "duration_s is 0; expected a number",
        ),
    ],
)
def test_a_bad_fleet_file_is_one_sentence_naming_the_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = (_FLEET + _DEVICE).replace(old, new, 1)
    assert text != _FLEET + _DEVICE
    with pytest.raises(ConfigError) as info:
        load_fleet_config(_write(tmp_path, text))
    assert message in str(info.value)
