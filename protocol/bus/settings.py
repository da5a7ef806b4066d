"""The ``[mqtt]`` table of edge and device config files as plain data; imports no trio, no paho.

An edge daemon and a device reach their site broker with the same settings,
read by the same function; each maps them onto the MQTT adapter's
``MqttConfig`` where it opens the bus (a ``client_id`` of None becomes the
device's key id or the edge's default there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import ConfigError
from fedtier.protocol.files import ConfigTable

__all__ = ["MqttSettings", "parse_mqtt_settings"]

_MAX_CLIENT_ID_CHARS: Final = 128
_MIN_KEEPALIVE_S: Final = 5


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How a participant reaches its site's MQTT broker.

    Attributes:
        host: broker host name or address.
        port: broker port (1883 plain, 8883 with TLS by convention).
        client_id: MQTT client id; stable, so the broker keeps the session. None
            means the participant's default: a device's key id, an edge's
            fixed name.
        keepalive_s: MQTT keepalive; well above any consumer stall.
        session_expiry_s: how long the broker keeps the session while away.
        connect_timeout_s: deadline of one connect attempt (TCP, TLS and
            CONNACK). Mosquitto answers no CONNECT while it writes its
            persistence file, which takes seconds when it retains a large
            model's blob: raise this with the broker's ``autosave_interval``.
        tls_ca_file: CA bundle that signs the broker's certificate; None for
            plain TCP.
        tls_cert_file: the client's TLS certificate (client certificate auth).
        tls_key_file: that certificate's private key.
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
    client_id: str | None = None
    keepalive_s: int = 60
    session_expiry_s: int = 86_400
    connect_timeout_s: float = 5.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    shared_subscription: bool = False


def parse_mqtt_settings(
    table: ConfigTable, defaults: MqttSettings, *, host_required: bool = False
) -> MqttSettings:
    """Read an ``[mqtt]`` table; absent keys take ``defaults``; then reject unknown keys.

    The TLS files are ``tls_ca_file``, ``tls_cert_file`` and ``tls_key_file``;
    device files spell them ``ca_file``, ``cert_file`` and ``key_file``, which
    are read as the same settings.

    Args:
        table: the ``[mqtt]`` table.
        defaults: the participant's defaults.
        host_required: refuse a table without ``host`` (a device must name its
            site's broker; an edge defaults to a broker on its own host).

    Raises:
        ConfigError: a key is missing, unknown or has an unusable value.
    """
    client_id = table.string("client_id", defaults.client_id)
    if client_id is not None and len(client_id) > _MAX_CLIENT_ID_CHARS:
        raise table.fail("client_id", f"1-{_MAX_CLIENT_ID_CHARS} characters")
    settings = MqttSettings(
        host=table.string("host") if host_required else table.string("host", defaults.host),
        port=table.port("port", defaults.port),
        client_id=client_id,
        keepalive_s=table.integer("keepalive_s", defaults.keepalive_s, low=_MIN_KEEPALIVE_S),
        session_expiry_s=table.integer("session_expiry_s", defaults.session_expiry_s, low=1),
        connect_timeout_s=table.number(
            "connect_timeout_s", defaults.connect_timeout_s, low=0.0, low_open=True
        ),
        tls_ca_file=_tls_file(table, "ca_file", defaults.tls_ca_file),
        tls_cert_file=_tls_file(table, "cert_file", defaults.tls_cert_file),
        tls_key_file=_tls_file(table, "key_file", defaults.tls_key_file),
        shared_subscription=table.boolean("shared_subscription", defaults.shared_subscription),
    )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ConfigError(
            f"{table.where}: a client certificate needs its key; set both tls_cert_file and "
            "tls_key_file (cert_file and key_file), or neither"
        )
    table.finish()
    return settings


def _tls_file(table: ConfigTable, name: str, default: Path | None) -> Path | None:
    key = f"tls_{name}"
    if table.has(name):
        if table.has(key):
            raise ConfigError(f"{table.where}: {key} and {name} are the same setting; keep {key}")
        key = name
    return table.path(key, default)
