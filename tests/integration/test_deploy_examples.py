"""The ``deploy/*.example.toml`` files start as shipped, as docs/operations.md tells an operator.

Each example is copied into one config folder with only the substitutions the
docs' table lists (state and log folders, broker addresses, metrics ports),
next to keys made with ``fedtier keys new`` and registered by copying ``.pub``
files, and the fleet root and central certificate that every example pins
("Key lifecycle", set up once), exactly as "From the examples to a running mesh" and "Onboarding a
device" say. The daemons run as ``python -m fedtier <tier> --config FILE``
from another working directory (every relative path must resolve against the
config file's folder), are waited for by their log lines with a deadline, and
must exit 0 on SIGTERM. The start order is exercised too (an edge started
before the central waits for it, saying so, then serves), and so are signals
during start-up: none of them may end a daemon silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
import pytest
import trio

from fedtier.cli import main as fedtier_main
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.files import load_public_key
from fedtier.simulations.testing import (
    DEPLOY_DIR,
    MosquittoProcess,
    MosquittoTls,
    NatsServerProcess,
    TestPki,
    free_port,
    mosquitto_acl,
)

pytestmark = pytest.mark.brokers

SERVING: Final = r"serving \(epoch \d+, model v\d+\)"
WAITING: Final = (
    r"waiting for JetStream stream FT_ACME_UP and FT_ACME_MODEL \(created by the central\)"
)
DEADLINE_S: Final = 30.0
EDGE_NAME: Final = "edge-plant-3-a"  # the names the examples use
REGIONAL_NAME: Final = "regional-eu-west"
DEVICE_NAME: Final = "veh-0042"

Changes: TypeAlias = Mapping[tuple[str, str], object]
"""(table, key) -> new value; table "" is the top level."""


# -- rendering an example, as the docs' table allows ---------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    assert isinstance(value, list)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def render(example: Path, dest: Path, changes: Changes) -> Path:
    """Copy ``example`` to ``dest`` with the values of ``changes`` replaced; nothing else."""
    table = ""
    done: set[tuple[str, str]] = set()
    out: list[str] = []
    for line in example.read_text().splitlines():
        header = re.match(r"\[([A-Za-z0-9_.]+)\]\s*(#.*)?$", line)
        if header is not None:
            table = header[1]
        setting = re.match(r"(\w+)(\s*=\s*)([^#]*?)(\s*#.*)?$", line)
        if setting is not None and (table, setting[1]) in changes:
            where = (table, setting[1])
            value = _toml_value(changes[where])
            line = f"{setting[1]}{setting[2]}{value}{setting[4] or ''}"
            done.add(where)
        out.append(line)
    missing = set(changes) - done
    assert not missing, f"{example.name} no longer has {sorted(missing)}"
    dest.write_text("\n".join(out) + "\n")
    return dest


def _free_port() -> int:
    return free_port()


def _keys_new(etc: Path, name: str) -> None:
    # `fedtier keys new --name NAME --out keys`, in the config folder.
    assert fedtier_main(["keys", "new", "--name", name, "--out", str(etc / "keys")]) == 0


def prepare_tiers(tmp_path: Path, nats: NatsServerProcess, mqtt_port: int) -> Path:
    """The config folder of "From the examples to a running mesh": examples, keys, version 0."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for tier in ("central", "regional", "edge"):
        changes: dict[tuple[str, str], object] = {
            ("", "state_dir"): tmp_path / "var" / tier,
            ("nats", "servers"): [nats.url],
            ("nats", "monitoring_url"): nats.monitoring_url,
            ("telemetry", "jsonl_dir"): tmp_path / "log",
            ("telemetry", "prometheus_port"): _free_port(),
        }
        if tier == "edge":
            changes[("mqtt", "port")] = mqtt_port
        render(DEPLOY_DIR / f"{tier}.example.toml", etc / f"{tier}.toml", changes)
    for name in ("central", REGIONAL_NAME, EDGE_NAME):
        _keys_new(etc, name)
    # "Key lifecycle", set up once: the fleet root (root.pub is what every example
    # pins) and the root's certificate of the central's key (in its certificates folder).
    keys = etc / "keys"
    assert fedtier_main(["keys", "ca", "--out", str(keys)]) == 0
    assert fedtier_main(["keys", "issue", "--root", str(keys / "root.key"),
                         "--key", str(keys / "central.pub"), "--role", "central",
                         "--name", "central"]) == 0  # fmt: skip
    for folder, pub in (("regionals", REGIONAL_NAME), ("edges", EDGE_NAME), ("devices", None)):
        (etc / "keys" / folder).mkdir()
        if pub is not None:
            shutil.copy(etc / "keys" / f"{pub}.pub", etc / "keys" / folder)
    # Version 0 (what `fedtier model init` writes): named float32 arrays, in layout order.
    (etc / "models").mkdir()
    np.savez(
        etc / "models" / "initial.npz",
        weight=np.zeros((10, 8), np.float32),
        bias=np.zeros(10, np.float32),
    )
    return etc


# -- daemons as processes, waited for by their log lines -------------------------------


class Process:
    """One child process whose stderr lines the test waits for (a deadline, never a sleep)."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self.eof = False
        self._changed = trio.Event()

    async def pump(self) -> None:
        """Read its stderr into ``lines`` until EOF."""
        assert self.process.stderr is not None
        pending = b""
        async for chunk in self.process.stderr:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            self.lines.extend(line.decode("utf-8", "replace") for line in complete)
            self._wake()
        if pending:
            self.lines.append(pending.decode("utf-8", "replace"))
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _tail(self) -> str:
        return " | ".join(self.lines[-8:]) or "(no output)"

    async def expect(self, pattern: str, *, timeout_s: float = DEADLINE_S) -> str:
        """The first stderr line matching ``pattern``, waiting up to ``timeout_s`` for it."""
        regex = re.compile(pattern)
        seen = 0
        with trio.move_on_after(timeout_s):
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if self.eof:
                    break
                await self._changed.wait()
        pytest.fail(
            f"{self.name} logged no line matching {pattern!r} (exit status "
            f"{self.process.returncode}); last lines: {self._tail()}"
        )

    def send(self, signum: int) -> None:
        """Send it ``signum``."""
        self.process.send_signal(signum)

    async def wait(self, *, timeout_s: float = DEADLINE_S) -> int:
        """Its exit status, waiting up to ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            status = await self.process.wait()
            # Its last lines too, for the assertions that follow.
            while not self.eof:
                await self._changed.wait()
            return status
        pytest.fail(f"{self.name} did not exit within {timeout_s:g} s; last lines: {self._tail()}")

    async def stop(self) -> int:
        """SIGTERM, then its exit status."""
        self.send(signal.SIGTERM)
        return await self.wait()


Spawn: TypeAlias = Callable[[str, Sequence[str]], Awaitable[Process]]


@asynccontextmanager
async def open_processes(cwd: Path) -> AsyncIterator[Spawn]:
    """Start children with ``spawn(name, argv)``; whatever still runs at the end is killed."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    started: list[Process] = []
    async with trio.open_nursery() as nursery:

        async def spawn(name: str, argv: Sequence[str]) -> Process:
            process = await trio.lowlevel.open_process(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            child = Process(name, process)
            started.append(child)
            nursery.start_soon(child.pump)
            return child

        try:
            yield spawn
        finally:
            with trio.CancelScope(shield=True):
                for child in started:
                    if child.process.returncode is None:
                        child.process.kill()
                    await child.process.wait()


def fedtier(*args: str | Path) -> list[str]:
    """``python -m fedtier ARGS``: the command the docs give, with this interpreter."""
    return [sys.executable, "-m", "fedtier", *map(str, args)]


# -- the tests -------------------------------------------------------------------------


async def test_the_tier_examples_start_as_shipped(
    tmp_path: Path,
    fresh_nats_server: NatsServerProcess,
    fresh_mosquitto: MosquittoProcess,
) -> None:
    etc = prepare_tiers(tmp_path, fresh_nats_server, fresh_mosquitto.port)
    async with open_processes(tmp_path) as spawn:
        central = await spawn("central", fedtier("central", "--config", etc / "central.toml"))
        await central.expect(SERVING)
        await central.expect(r"model v0 published")
        regional = await spawn("regional", fedtier("regional", "--config", etc / "regional.toml"))
        edge = await spawn("edge", fedtier("edge", "--config", etc / "edge.toml"))
        await regional.expect(SERVING)
        await edge.expect(SERVING)
        await edge.expect(r"relayed model v0 to the devices of site plant-3")
        for daemon in (edge, regional, central):
            assert await daemon.stop() == 0, daemon.lines
            assert any("shut down cleanly" in line for line in daemon.lines)
    # Every relative path resolved against etc/, not the working directory.
    assert not (tmp_path / "keys").exists()
    assert (tmp_path / "var" / "central" / "state.sqlite").exists()


async def test_an_edge_started_before_the_central_waits_then_serves(
    tmp_path: Path,
    fresh_nats_server: NatsServerProcess,
    fresh_mosquitto: MosquittoProcess,
) -> None:
    etc = prepare_tiers(tmp_path, fresh_nats_server, fresh_mosquitto.port)
    async with open_processes(tmp_path) as spawn:
        edge = await spawn("edge", fedtier("edge", "--config", etc / "edge.toml"))
        waiting = await edge.expect(WAITING)
        assert "start the central first" in waiting
        assert edge.process.returncode is None
        central = await spawn("central", fedtier("central", "--config", etc / "central.toml"))
        await central.expect(SERVING)
        await edge.expect(r"JetStream streams .* exist now; continuing")
        await edge.expect(SERVING)
        for daemon in (edge, central):
            assert await daemon.stop() == 0, daemon.lines


async def test_signals_during_start_up_are_handled_never_fatal(
    tmp_path: Path,
    fresh_nats_server: NatsServerProcess,
    fresh_mosquitto: MosquittoProcess,
) -> None:
    etc = prepare_tiers(tmp_path, fresh_nats_server, fresh_mosquitto.port)
    async with open_processes(tmp_path) as spawn:
        edge = await spawn("edge", fedtier("edge", "--config", etc / "edge.toml"))
        await edge.expect(WAITING)  # still starting: no central yet
        # SIGHUP during start-up reloads the key registries, as later.
        _keys_new(etc, DEVICE_NAME)
        shutil.copy(etc / "keys" / f"{DEVICE_NAME}.pub", etc / "keys" / "devices")
        edge.send(signal.SIGHUP)
        await edge.expect(r"SIGHUP: key registry reloaded: 1 device keys")
        assert edge.process.returncode is None
        # SIGTERM during start-up: stops without serving, exit 0, said so.
        edge.send(signal.SIGTERM)
        await edge.expect(r"SIGTERM during start-up: stopping before serving")
        assert await edge.wait() == 0
        assert not any(re.search(SERVING, line) for line in edge.lines)


# Signals that arrive before the event loop listens (during the imports, the
# config): the CLI holds them first thing; this child sends them to itself at
# that very point, so the test does not depend on timing.
_EARLY_SIGNALS = """
import os, signal, sys
from fedtier.tiers._signals import hold_signals
hold_signals()
for name in sys.argv[2:]:
    os.kill(os.getpid(), getattr(signal, name))
from fedtier.tiers.daemon import run_daemon
sys.exit(run_daemon("edge", sys.argv[1]))
"""


async def test_signals_before_the_event_loop_are_held_not_fatal(
    tmp_path: Path,
    fresh_nats_server: NatsServerProcess,
    fresh_mosquitto: MosquittoProcess,
) -> None:
    etc = prepare_tiers(tmp_path, fresh_nats_server, fresh_mosquitto.port)
    config = str(etc / "edge.toml")
    async with open_processes(tmp_path) as spawn:
        hup = await spawn("edge-hup", [sys.executable, "-c", _EARLY_SIGNALS, config, "SIGHUP"])
        await hup.expect(r"SIGHUP during start-up, before the key registries were read")
        await hup.expect(WAITING)  # alive, and starting as usual
        assert await hup.stop() == 0
        term = await spawn(
            "edge-term", [sys.executable, "-c", _EARLY_SIGNALS, config, "SIGHUP", "SIGTERM"]
        )
        assert await term.wait() == 0
        assert any("SIGTERM during start-up: stopping before serving" in x for x in term.lines)


async def test_the_device_example_starts_as_shipped(
    tmp_path: Path, fresh_nats_server: NatsServerProcess
) -> None:
    # Its site's Mosquitto as deploy/mosquitto configures it: TLS, client
    # certificates, the ACL. The edge keys come from the tiers' setup.
    pki = TestPki.create(tmp_path / "pki")
    acl = tmp_path / "acl"
    acl.write_text(mosquitto_acl([EDGE_NAME]))
    server = pki.issue_server("mosquitto")
    try:
        broker = MosquittoProcess.start(
            tmp_path / "mosquitto",
            tls=MosquittoTls(
                pki.ca_file,
                server.cert_file,
                server.key_file,
                acl,
                # Its two listeners: the device's binds its client id to its CN.
                tier_ca_file=TestPki.create(tmp_path / "tier-pki").ca_file,
            ),
        )
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        etc = prepare_tiers(tmp_path, fresh_nats_server, broker.port)
        # "Onboarding a device": its key, the central's and the edge's public
        # keys (already in keys/), its certificate (CN = its key id), its data.
        _keys_new(etc, DEVICE_NAME)
        key_id = load_public_key(etc / "keys" / f"{DEVICE_NAME}.pub").key_id
        cert = pki.issue_client(key_id)
        (etc / "tls").mkdir()
        shutil.copy(pki.ca_file, etc / "tls" / "ca.pem")
        shutil.copy(cert.cert_file, etc / "tls" / "device.crt")
        shutil.copy(cert.key_file, etc / "tls" / "device.key")
        (etc / "data").mkdir()
        rng = np.random.default_rng(0)
        rows = [
            ",".join([*(f"{v:.3f}" for v in rng.normal(size=8)), str(i % 10)]) for i in range(64)
        ]
        header = ",".join([*(f"x{i}" for i in range(8)), "label"])
        (etc / "data" / "device.csv").write_text("\n".join([header, *rows]) + "\n")
        render(
            DEPLOY_DIR / "device.example.toml",
            etc / "device.toml",
            {("mqtt", "host"): "127.0.0.1", ("mqtt", "port"): broker.port},
        )
        async with open_processes(tmp_path) as spawn:
            device = await spawn("device", fedtier("device", "--config", etc / "device.toml"))
            await device.expect(rf"device {key_id} of fleet acme, site plant-3")
            await device.expect(
                rf"mqtt connected: broker=127\.0\.0\.1:{broker.port} client_id={key_id} "
            )
            assert await device.stop() == 0, device.lines
        assert (etc / "state" / "outbox.sqlite").exists()  # relative to etc/, not the cwd
    finally:
        broker.stop()
