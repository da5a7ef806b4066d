"""Real Mosquitto processes for tests, the demo and benchmarks; must not import tiers or client.

``MosquittoProcess.start(workdir)`` writes a config into ``workdir``, starts
``mosquitto -c`` on a loopback port and returns once the port accepts TCP
connections. The config carries what the project relies on (``docs/transport.md``,
MQTT): ``persistence true`` (without it a restart
forgets sessions and queued QoS 1 messages), ``max_queued_messages`` raised
(Mosquitto silently drops QoS 1 messages past the default 1000, online
clients included), ``set_tcp_nodelay true`` (large QoS 1 messages stall on
small acks without it) and a packet size that fits 8 MiB payloads. The broker
runs with the malloc settings of ``docs/transport.md``. Anonymous access
on loopback only, unless ``start(tls=MosquittoTls(...))`` makes the listener
TLS 1.3 with a client certificate required, its Common Name as the user name,
and an ACL file (``fedtier.simulations.testing.mosquitto_acl`` renders the
deployed one). With ``MosquittoTls(tier_ca_file=...)`` it runs the two
listeners ``deploy/mosquitto/mosquitto.conf`` configures: ``port`` for
devices, where the client id is replaced by the certificate's CN, and
``tier_port`` for the tiers, which accepts only certificates of the tier CA.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.testing._ports import free_port

__all__ = ["MALLOC_ENV", "MosquittoProcess", "MosquittoTls", "find_mosquitto"]

MALLOC_ENV: Final[dict[str, str]] = {
    # Large messages otherwise cost a fresh mmap (and its page faults) each:
    # receive cost fell from 1.0-1.7 to 0.21-0.35 ms per MB. The process keeps
    # its peak memory in exchange.
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "MALLOC_TOP_PAD_": "67108864",
}

_FALLBACK_BINARY: Final = Path("/usr/sbin/mosquitto")
_HOST: Final = "127.0.0.1"
_MAX_PACKET_BYTES: Final = 16 * 1024 * 1024
_MAX_QUEUED_MESSAGES: Final = 100_000
_MAX_QUEUED_BYTES: Final = 2 * 1024 * 1024 * 1024
_MAX_INFLIGHT_MESSAGES: Final = 64
_STOP_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class MosquittoTls:
    """TLS with client certificates and an ACL, as in ``deploy/mosquitto/mosquitto.conf``.

    Attributes:
        ca_file: the CA that signs client certificates (and the broker's).
        cert_file: the broker certificate (PEM); its names must match the
            host clients connect to (127.0.0.1).
        key_file: the broker private key.
        acl_file: the ACL; user names are the client certificates' CN.
        tier_ca_file: the CA of the tiers' certificates: with it, the
            listener on ``port`` is the device listener (client id bound to
            the certificate, certificates of ``ca_file``) and a second one on
            ``tier_port`` takes the tiers (certificates of this CA only, two
            connections per client, no id binding), both with ``acl_file``.
            None: one listener, no id binding (benchmarks, older layouts).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    acl_file: Path
    tier_ca_file: Path | None = None


def find_mosquitto() -> Path:
    """Return the path of the ``mosquitto`` binary.

    Raises:
        ConfigError: it is neither on ``PATH`` nor at ``/usr/sbin/mosquitto``.
    """
    found = shutil.which("mosquitto")
    if found is not None:
        return Path(found)
    if _FALLBACK_BINARY.is_file() and os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise ConfigError(
        "Mosquitto not found: install it with `apt-get install -y mosquitto` (make test does this)"
    )


def _free_port() -> int:
    return free_port(_HOST)


def _tls_listener(port: int, tls: MosquittoTls, ca_file: Path, *, bind_id: bool) -> list[str]:
    return [
        f"listener {port} {_HOST}",
        f"cafile {ca_file.resolve()}",
        f"certfile {tls.cert_file.resolve()}",
        f"keyfile {tls.key_file.resolve()}",
        "tls_version tlsv1.3",
        "require_certificate true",
        # The certificate CN becomes the user name the ACL's %u stands for...
        "use_identity_as_username true",
        # ...and, on the device listener, the client id: a device cannot
        # take over another's session.
        *(["use_username_as_clientid true"] if bind_id else []),
        "allow_anonymous false",
        f"acl_file {tls.acl_file.resolve()}",
    ]


def _listener_lines(port: int, tier_port: int, tls: MosquittoTls | None) -> list[str]:
    if tls is None:
        return [f"listener {port} {_HOST}", "allow_anonymous true"]
    if tls.tier_ca_file is None:
        # One ACL and one authentication setup for the whole broker.
        return [
            "per_listener_settings false",
            *_tls_listener(port, tls, tls.ca_file, bind_id=False),
        ]
    # As deployed: every security setting belongs to the listener above it.
    return [
        "per_listener_settings true",
        *_tls_listener(port, tls, tls.ca_file, bind_id=True),
        *_tls_listener(tier_port, tls, tls.tier_ca_file, bind_id=False),
    ]


def _render_config(
    workdir: Path,
    port: int,
    *,
    autosave_interval: int,
    autosave_on_changes: bool,
    tls: MosquittoTls | None = None,
    tier_port: int | None = None,
) -> str:
    lines = [
        "# Written by fedtier.simulations.testing for a test, demo or benchmark broker.",
        *_listener_lines(port, port if tier_port is None else tier_port, tls),
        "persistence true",
        f"persistence_location {workdir}/",
        "persistence_file mosquitto.db",
        # Seconds between saves, or with autosave_on_changes a count of
        # changes (subscribes, persistent connects, acks; not new messages).
        f"autosave_interval {autosave_interval}",
        f"autosave_on_changes {'true' if autosave_on_changes else 'false'}",
        f"max_queued_messages {_MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {_MAX_QUEUED_BYTES}",
        f"max_inflight_messages {_MAX_INFLIGHT_MESSAGES}",
        f"max_packet_size {_MAX_PACKET_BYTES}",
        "set_tcp_nodelay true",
        f"log_dest file {workdir}/mosquitto.log",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if os.geteuid() == 0:
        # As root Mosquitto switches to the user "mosquitto", which cannot
        # write to a private temporary directory; stay who we are.
        lines.append("user root")
    return "\n".join(lines) + "\n"


class MosquittoProcess:
    """One running Mosquitto; build it with ``MosquittoProcess.start``.

    Attributes:
        host: the loopback address it listens on.
        port: its TCP port (kept across ``restart``); with
            ``MosquittoTls(tier_ca_file=...)`` the device listener.
        tier_port: where the tiers connect: the tier listener with
            ``MosquittoTls(tier_ca_file=...)``, else ``port``.
        workdir: where its config, log and persistence file live.
    """

    host: str = _HOST
    tls: MosquittoTls | None = None

    def __init__(self, binary: Path, workdir: Path, port: int, *, ready_timeout_s: float) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.tier_port = port
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        workdir: Path,
        port: int | None = None,
        *,
        autosave_interval: int = 1,
        autosave_on_changes: bool = False,
        ready_timeout_s: float = 10.0,
        tls: MosquittoTls | None = None,
    ) -> MosquittoProcess:
        """Write a config into ``workdir``, start Mosquitto and wait until it listens.

        Args:
            workdir: directory for the config, log and persistence file
                (created if missing).
            port: loopback TCP port; a free one when None.
            autosave_interval: seconds between persistence saves, or a change
                count with ``autosave_on_changes``.
            autosave_on_changes: count changes instead of seconds. Mosquitto
                2.0.11 counts subscribes, unsubscribes, persistent connects
                and acknowledgements, not new messages: with
                ``autosave_interval=1`` sessions and subscriptions are saved at
                once (kill -9 tests), messages only along with the next such
                change or at ``stop``.
            ready_timeout_s: how long to wait for the port to accept.
            tls: make the listener TLS with client certificates and an ACL
                (clients need ``MqttConfig(ca_file=, cert_file=, key_file=)``),
                two listeners with ``tier_ca_file``; None keeps the anonymous
                plain listener.

        Raises:
            ConfigError: Mosquitto is not installed, exits early, or does not
                listen in time.
        """
        binary = find_mosquitto()
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        chosen = _free_port() if port is None else port
        broker = cls(binary, workdir, chosen, ready_timeout_s=ready_timeout_s)
        broker.tls = tls
        if tls is not None and tls.tier_ca_file is not None:
            broker.tier_port = _free_port()
        broker.config_path.write_text(
            _render_config(
                workdir,
                chosen,
                autosave_interval=autosave_interval,
                autosave_on_changes=autosave_on_changes,
                tls=tls,
                tier_port=broker.tier_port,
            )
        )
        broker._launch()
        return broker

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, or None when not started or stopped."""
        return self._proc.pid if self._proc is not None else None

    def _launch(self) -> None:
        env = {**os.environ, **MALLOC_ENV}
        with open(self.workdir / "mosquitto.stderr", "ab") as stderr:
            # A fixed argument list of a resolved binary: no shell, no input.
            self._proc = subprocess.Popen(  # noqa: S603
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                # Its own process group: a terminal Ctrl-C must reach only the
                # parent, which stops the daemons (they flush through the
                # brokers) before it stops the brokers.
                process_group=0,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._ready_timeout_s
        while True:
            try:
                # Every listener: the tier one opens after the device one.
                for port in dict.fromkeys((self.port, self.tier_port)):
                    with socket.create_connection((self.host, port), timeout=0.5):
                        pass
                return
            except OSError as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"Mosquitto did not listen on {self.host}:{self.port} within"
                    f" {self._ready_timeout_s} s ({last_error}); see {self.log_path}"
                )
            try:
                # Waiting on the process doubles as the pause between
                # attempts and notices at once when it exits (bad config,
                # port taken).
                code = proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            raise ConfigError(
                f"Mosquitto exited with status {code} before listening on {self.host}:{self.port}:"
                f" {self._log_tail()}"
            )

    def _log_tail(self) -> str:
        texts = []
        for path in (self.workdir / "mosquitto.stderr", self.log_path):
            if path.exists():
                texts.extend(path.read_text(errors="replace").strip().splitlines()[-3:])
        return " | ".join(texts) or f"no log in {self.workdir}"

    def kill(self) -> None:
        """Kill the broker with SIGKILL (no chance to save) and reap it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait()

    def stop(self) -> None:
        """Stop the broker with SIGTERM (it saves its persistence file) and reap it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        """Start the broker again on the same port with the same persistence file.

        Stops it first (SIGTERM) if it is still running.

        Raises:
            ConfigError: it exits early or does not listen in time.
        """
        self.stop()
        self._launch()

    def __enter__(self) -> MosquittoProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoProcess({self.host}:{self.port}, pid={self.pid}, workdir={self.workdir})"
