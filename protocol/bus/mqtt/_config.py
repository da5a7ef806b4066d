"""How to reach one MQTT broker (``MqttConfig``) and its TLS context; no paho, nats or tiers."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from fedtier.protocol.errors import ConfigError

__all__ = ["MqttConfig"]


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """How to reach one MQTT v5 broker.

    Attributes:
        host: broker host name or address.
        port: broker TCP port.
        client_id: names the persistent session; the same id resumes it. The
            publishing connection uses ``<client_id>.pub`` (none with
            ``single_connection``).
        keepalive_s: MQTT keepalive; keep it above the longest consumer stall.
        session_expiry_s: how long the broker keeps the session (subscriptions,
            unacknowledged and queued messages) after a disconnect.
        receive_maximum: most unacknowledged deliveries this process holds on
            the subscribing connection (also sent as Receive Maximum).
        connect_timeout_s: TCP/TLS connect and CONNACK deadline per attempt.
        reconnect_backoff_min_s: first delay between reconnect attempts.
        reconnect_backoff_max_s: cap of the doubling delay.
        ca_file: CA bundle that signs the broker certificate; enables TLS.
        cert_file: client certificate (PEM); enables TLS.
        key_file: client private key, when not inside ``cert_file``.
        username: optional user name.
        password: optional password (needs ``username``).
        shared_durables: True (the default): ``durable=name`` subscribes
            ``$share/<name>/<filter>`` so several clients share the load.
            False: an exclusive subscription in this client's session (one
            consumer, but no loss window when the broker restarts; see
            ``docs/transport.md``).
        single_connection: False (the default): two connections, publishes
            over ``<client_id>.pub``. True: one connection, the session
            ``<client_id>``, carries publishes too: what a device needs on a
            broker listener that replaces the client id by the certificate's
            name (two connections would then share one id and disconnect
            each other). Safe for a client whose consumers never wait on its
            own publishes; see ``_single`` and ``docs/transport.md``.
        fresh_session: False (the default): every connect resumes the
            session the broker kept. True: the first connect of this bus
            starts a new session (the broker discards what it queued for
            this client id), later reconnects resume it: for an instance that
            must not be handed what the broker queued for it while another
            instance was doing its work (a leased edge).
    """

    host: str
    port: int
    client_id: str
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    receive_maximum: int = 64
    connect_timeout_s: float = 5.0
    reconnect_backoff_min_s: float = 0.1
    reconnect_backoff_max_s: float = 10.0
    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    shared_durables: bool = True
    single_connection: bool = False
    fresh_session: bool = False

    def __post_init__(self) -> None:
        where = f"MQTT client {self.client_id!r} for {self.host}:{self.port}"
        checks = [
            (bool(self.host), "host is empty"),
            (1 <= self.port <= 65_535, f"port {self.port} is outside 1..65535"),
            (bool(self.client_id), "client_id is empty"),
            (0 <= self.keepalive_s <= 65_535, f"keepalive_s {self.keepalive_s} not in 0..65535"),
            (
                1 <= self.session_expiry_s <= 0xFFFF_FFFF,
                f"session_expiry_s {self.session_expiry_s} is outside 1..4294967295",
            ),
            (
                1 <= self.receive_maximum <= 65_535,
                f"receive_maximum {self.receive_maximum} is outside 1..65535",
            ),
            (self.connect_timeout_s > 0, f"connect_timeout_s {self.connect_timeout_s} is not > 0"),
            (
                0 < self.reconnect_backoff_min_s <= self.reconnect_backoff_max_s,
                f"reconnect backoff {self.reconnect_backoff_min_s}"
                f"..{self.reconnect_backoff_max_s} s is not 0 < min <= max",
            ),
            (
                self.key_file is None or self.cert_file is not None,
                "key_file is set without cert_file",
            ),
            (
                self.password is None or self.username is not None,
                "password is set without username",
            ),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(f"{where}: {problem}")

    @property
    def uses_tls(self) -> bool:
        """True when a CA bundle or a client certificate is configured."""
        return self.ca_file is not None or self.cert_file is not None


def _tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    if not config.uses_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
        if config.cert_file is not None:
            context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the TLS files of MQTT client {config.client_id!r}"
            f" for {config.host}:{config.port}: {exc}"
        ) from exc
    return context
