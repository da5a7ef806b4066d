"""The shared local-file rules: one TOML table reader, one atomic write, one MQTT table."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from fedtier.protocol.bus import MqttSettings, parse_mqtt_settings
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.files import ConfigTable, atomic_write, read_toml


def _table(text: str, tmp_path: Path) -> ConfigTable:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return ConfigTable.load(path)


def test_getters_take_defaults_and_resolve_paths(tmp_path: Path) -> None:
    t = _table('name = "a"\nport = 80\nkeys = ["k.pem", "/abs.pem"]\n[sub]\nn = 2.5\n', tmp_path)
    assert t.string("name") == "a"
    assert t.string("other", None) is None
    assert t.port("port") == 80
    assert t.paths("keys") == (tmp_path / "k.pem", Path("/abs.pem"))
    assert t.integer("absent", 7) == 7
    sub = t.table("sub")
    assert sub.number("n", low=0.0, low_open=True) == 2.5
    assert sub.optional_number("gone") is None
    sub.finish()
    t.finish()


@pytest.mark.parametrize(
    ("text", "read", "message"),
    [
        ("a = 0", lambda t: t.integer("a", low=1), "x.toml: a is 0; expected an integer >= 1"),
        ("a = true", lambda t: t.number("a", 1.0), "x.toml: a is true; expected a finite number"),
        ("a = nan", lambda t: t.number("a", 1.0, low=0.0), "expected a number >= 0"),
        ("a = 'z'", lambda t: t.choice("a", ("x", "y")), "a is 'z'; expected one of 'x', 'y'"),
        ("a = 0", lambda t: t.optional_number("a"), "expected a number > 0, or false for none"),
        (
            "[s]\na = 1",
            lambda t: t.table("s").string("a"),
            "x.toml: s.a is 1; expected a non-empty",
        ),
        ("", lambda t: t.table("s").path("p"), "x.toml: s.p is missing; it is required"),
        ("a = [1]", lambda t: t.tables("a"), "a is [1]; expected an array of tables"),
    ],
)
def test_bad_values_name_the_file_and_the_dotted_key(
    tmp_path: Path, text: str, read: Callable[[ConfigTable], object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        read(_table(text, tmp_path))


def test_unknown_keys_are_named_with_the_known_ones(tmp_path: Path) -> None:
    t = _table("[mqtt]\nhost = 'h'\nprot = 1\n", tmp_path)
    mqtt = t.table("mqtt")
    mqtt.string("host")
    with pytest.raises(ConfigError) as info:
        mqtt.finish()
    assert str(info.value) == (
        "x.toml: mqtt.prot is not a known setting (unknown key 'prot'; known keys: host)"
    )


def test_false_switches_an_optional_setting_off(tmp_path: Path) -> None:
    t = _table("a = false\nb = false\n", tmp_path)
    assert t.optional_number("a") is None
    assert t.optional_port("b") is None


def test_remaining_takes_free_form_keys(tmp_path: Path) -> None:
    t = _table('name = "fedadam"\nlr = 0.1\nbeta1 = 0.9\n', tmp_path)
    assert t.string("name") == "fedadam"
    assert t.remaining() == {"lr": 0.1, "beta1": 0.9}
    t.finish()


def test_tokens_are_checked_where_the_key_can_be_named(tmp_path: Path) -> None:
    t = _table('fleet = "demo"\nname = "Bad Name"\nsite = ""\n', tmp_path)
    assert t.token("fleet") == "demo"
    assert t.token("region", None) is None
    with pytest.raises(ConfigError) as info:
        t.token("name", kind="device")
    assert str(info.value).startswith("x.toml: name: device name 'Bad Name' is invalid; use 1-64")
    with pytest.raises(ConfigError, match=r"x\.toml: site is ''; expected a non-empty string"):
        t.token("site")


def test_required_lists_refuse_absent_and_empty(tmp_path: Path) -> None:
    t = _table('keys = "k.pem"\nnone = []\n[[dev]]\nn = 1\n', tmp_path)
    assert t.paths("keys", required=True) == (tmp_path / "k.pem",)
    assert [d.integer("n") for d in t.tables("dev", required=True)] == [1]
    assert t.paths("none") == ()
    assert t.tables("none") == []
    with pytest.raises(ConfigError, match=r"x\.toml: none is \[\]; expected a path or a non-empty"):
        t.paths("none", required=True)
    with pytest.raises(ConfigError, match=r"none is \[\]; expected a non-empty array of tables"):
        t.tables("none", required=True)
    with pytest.raises(ConfigError, match=r"x\.toml: gone is missing; it is required"):
        t.paths("gone", required=True)
    with pytest.raises(ConfigError, match=r"x\.toml: gone is missing; it is required"):
        t.tables("gone", required=True)


def test_read_toml_errors_say_what_the_file_is(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read scenario file"):
        read_toml(tmp_path / "none.toml", what="scenario file")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"a = [")
    with pytest.raises(ConfigError, match=r"config file .* is not valid TOML"):
        read_toml(bad)


def test_mqtt_table_takes_defaults_and_both_tls_spellings(tmp_path: Path) -> None:
    t = _table("[mqtt]\nhost = 'b'\nca_file = 'ca.pem'\n", tmp_path)
    settings = parse_mqtt_settings(t.table("mqtt"), MqttSettings(session_expiry_s=60))
    assert settings == MqttSettings(host="b", session_expiry_s=60, tls_ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=r"mqtt\.host is missing"):
        parse_mqtt_settings(
            _table("[mqtt]\n", tmp_path).table("mqtt"), MqttSettings(), host_required=True
        )
    with pytest.raises(ConfigError, match=r"mqtt\.keepalive_s is 2; expected an integer >= 5"):
        parse_mqtt_settings(
            _table("[mqtt]\nkeepalive_s = 2\n", tmp_path).table("mqtt"), MqttSettings()
        )
    slow = _table("[mqtt]\nconnect_timeout_s = 60\n", tmp_path).table("mqtt")
    assert parse_mqtt_settings(slow, MqttSettings()).connect_timeout_s == 60.0
    with pytest.raises(ConfigError, match=r"mqtt\.connect_timeout_s"):
        parse_mqtt_settings(
            _table("[mqtt]\nconnect_timeout_s = 0\n", tmp_path).table("mqtt"), MqttSettings()
        )


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.blob"
    atomic_write(path, b"one")
    atomic_write(path, memoryview(b"two"))
    assert path.read_bytes() == b"two"
    secret = tmp_path / "k.pem"
    atomic_write(secret, b"s", mode=0o600, overwrite=False)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        atomic_write(secret, b"other", overwrite=False)
    assert secret.read_bytes() == b"s"
    assert sorted(os.listdir(tmp_path)) == ["k.pem", "model.blob"]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "missing" / "f", b"x")
