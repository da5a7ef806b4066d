"""The central's key rotated and a device revoked on a running mesh, nothing acknowledged lost.

An in-process mesh on in-memory buses (edge -> regional -> central, the
daemons themselves) whose followers and device pin only the fleet root.
Mid-run the operator rotates the central's key as docs/operations.md says:
``fedtier keys rotate --install`` writes the next key over the central's
``identity_key`` and its certificate into the ``[keys] certificates`` folder,
and the central gets SIGHUP (``systemctl reload``) through the daemon's own
signal handler; it keeps serving, publishes the certificate, then signs with
the new key. ``fedtier keys revoke`` then revokes a device whose earlier
update was already accepted. The exactly-once checker joins what the devices
were told with the central's lineage, after a restart of the central with
the same config shows that it starts with the installed key.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from trio.testing import MockClock

from fedtier.cli import main
from fedtier.client.model_store import ModelStore, OfferStatus
from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.certificates import ModelSigners
from fedtier.protocol.envelope import open_envelope, parse_envelope
from fedtier.protocol.files import load_public_key, load_signing_identity, save_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.messages import Receipt, ReceiptStatus
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.checker import DeviceHistory, check, load_lineage_counts
from fedtier.simulations.testing import SimDevice, TestPki, free_port
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import CentralConfig, EdgeConfig, RegionalConfig, load_initial_model
from fedtier.tiers.daemon import _Lifecycle
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys, load_certificates

FLEET, REGION, SITE = "acme", "eu", "north"
NOW_MS = 1_764_288_000_000  # 2025-11-28
REGIONAL = SigningIdentity.from_seed(b"\x62" * 32)
EDGE = SigningIdentity.from_seed(b"\x63" * 32)
POLL_S = 0.5


def write_model(path: Path) -> None:
    rng = np.random.default_rng(3)
    np.savez(path, w=rng.standard_normal((3, 4)).astype(np.float32))


def cli(*argv: str) -> dict[str, object]:
    """Run ``fedtier ARGV --json`` as an operator would; its JSON answer."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    answer = json.loads(out.getvalue())
    assert isinstance(answer, dict)
    return answer


class RecordingRegistry(MemoryModelRegistry):
    """The in-memory registry, noting in order each certificate put and each pointer set."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    async def put_certificate(self, key_id: str, certificate: bytes) -> None:
        await super().put_certificate(key_id, certificate)
        self.events.append(("certificate", key_id))

    def _set(self, version: int | None, pointer: bytes) -> None:
        self.events.append(("pointer", parse_envelope(pointer).sender))
        super()._set(version, pointer)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    with trio.fail_after(60, shield=False):
        while not condition():
            await trio.sleep(0.05)  # virtual time (autojump clock)
    assert condition(), what


async def test_rotation_without_restart_and_revocation_on_a_running_mesh(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    keys_dir = tmp_path / "keys"
    identity_key = keys_dir / "central.key"  # the central's identity_key, rewritten by --install
    root_info = cli("keys", "ca", "--out", str(keys_dir))
    root_pub = load_public_key(Path(str(root_info["public_key_file"])))

    def rotate(not_before: str, *extra: str) -> dict[str, object]:
        return cli(
            "keys", "rotate", "--role", "central", "--name", "central",
            "--out", str(keys_dir), "--root", str(keys_dir / "root.key"),
            "--not-before", not_before, "--install", str(identity_key), *extra,
        )  # fmt: skip

    first = rotate("2025-11-01T00:00:00Z", "--days", "60")
    central_1 = load_signing_identity(Path(str(first["private_key_file"])))
    assert load_signing_identity(identity_key).key_id == central_1.key_id
    model_file = tmp_path / "init.npz"
    write_model(model_file)
    layout, _ = load_initial_model(model_file)
    nats, mqtt, registry = MemoryBroker("nats"), MemoryBroker("mqtt"), RecordingRegistry()
    devices = [
        SimDevice(SigningIdentity.from_seed(bytes([70 + i]) * 32), FLEET, layout) for i in range(4)
    ]
    revocations_file = tmp_path / "revocations.bin"
    state = tmp_path / "central"
    regionals = tmp_path / "regionals.toml"  # a file source: SIGHUP re-reads it
    regionals.write_text(f'[keys]\n{REGION} = "{REGIONAL.verify_key.raw.hex()}"\n')
    # The central as central.toml configures it: no [keys] central, the root, and the
    # key folder as its certificates (every *.cert there).
    config = CentralConfig(
        fleet=FLEET,
        identity_key=identity_key,
        state_dir=state,
        root_key=root_pub.raw.hex(),
        certificates=(keys_dir,),
        initial_model=model_file,
        flush=FlushPolicy(max_inputs=1, max_age_s=None),
        commit_window_s=0.001,
        revocations=revocations_file,
        revocation_poll_s=POLL_S,
    )
    central = CentralDaemon(
        config,
        nats=MemoryBus(nats),
        registry=registry,
        keys=TierKeys(
            load_signing_identity(identity_key),
            KeyRegistry([regionals], role="regional"),
            root=root_pub,
            certificates=load_certificates(config.certificates, root_pub),
        ),
        clock_ms=lambda: NOW_MS,
        store_in_thread=False,
    )
    # Followers pin only the root.
    regional = RegionalDaemon(
        RegionalConfig(
            fleet=FLEET,
            region=REGION,
            identity_key=tmp_path / "unused.pem",
            state_dir=tmp_path / "regional",
            root_key=root_pub.raw.hex(),
            flush=FlushPolicy(max_inputs=1, max_age_s=None),
            commit_window_s=0.001,
            revocation_poll_s=POLL_S,
        ),
        nats=MemoryBus(nats),
        registry_store=registry,
        keys=TierKeys(
            REGIONAL,
            KeyRegistry.from_keys({SITE: EDGE.verify_key}, role="edge"),
            root=root_pub,
        ),
        clock_ms=lambda: NOW_MS,
        store_in_thread=False,
    )
    edge = EdgeDaemon(
        EdgeConfig(
            fleet=FLEET,
            site=SITE,
            region=REGION,
            identity_key=tmp_path / "unused.pem",
            state_dir=tmp_path / "edge",
            root_key=root_pub.raw.hex(),
            flush=FlushPolicy(max_inputs=1, max_age_s=None),
            commit_window_s=0.001,
            revocation_poll_s=POLL_S,
        ),
        mqtt=MemoryBus(mqtt),
        nats=MemoryBus(nats),
        registry_store=registry,
        keys=TierKeys(
            EDGE,
            KeyRegistry.from_keys(
                {f"veh-{i}": d.identity.verify_key for i, d in enumerate(devices)}, role="device"
            ),
            root=root_pub,
        ),
        clock_ms=lambda: NOW_MS,
        store_in_thread=False,
    )
    topics = MqttTopics(FLEET, SITE)
    bus = MemoryBus(mqtt)
    histories: dict[str, DeviceHistory] = {}
    # The device pins the root only: a rotated central needs no change on it.
    device_store = ModelStore(ModelSigners(root=root_pub), layout, FLEET)

    async def send(device: SimDevice) -> Receipt:
        values = np.full(layout.num_params, 0.01, np.float32)
        message, data = device.update(values, base_version=edge.known_version)
        history = histories.setdefault(message.update_id.hex(), DeviceHistory())
        history.sent = True
        async with bus.subscribe(topics.receipt(device.key_id)) as receipts:
            await bus.publish(topics.update(device.key_id), data)
            delivery = await receipts.receive()
        receipt = open_envelope(delivery.payload, {EDGE.key_id: EDGE.verify_key}).message
        assert isinstance(receipt, Receipt)
        assert receipt.update_id == message.update_id
        history.accepted = receipt.status is ReceiptStatus.ACCEPTED
        history.rejected = receipt.status is ReceiptStatus.REJECTED
        return receipt

    async def device_loads_newest(version: int) -> None:
        """The device takes the edge's retained model and, beside it, the signer's certificate.

        Blob and pointer first: a model signed by a key not yet certified waits in
        the store, and loads when the certificate arrives (any order works).
        """
        with trio.fail_after(30):
            await _device_loads_newest(version)

    async def _device_loads_newest(version: int) -> None:
        async with bus.subscribe(topics.model_pointer()) as pointers:
            while True:
                pointer = (await pointers.receive()).payload
                noted = device_store.offer_pointer(pointer)
                if noted.status is OfferStatus.REJECTED:
                    break  # signed by a key the device has no certificate for yet
                if noted.version is not None and noted.version >= version:
                    break
        async with bus.subscribe(topics.model_blob()) as blobs:
            offer = device_store.offer_blob((await blobs.receive()).payload)
        if offer.status is not OfferStatus.LOADED:
            assert offer.reason == "unknown_sender", offer
            async with bus.subscribe(topics.model_certificate()) as certs:
                offer = device_store.offer_certificate((await certs.receive()).payload)
        assert offer.status is OfferStatus.LOADED, offer
        assert device_store.version is not None
        assert device_store.version >= version

    # The daemon's own SIGHUP handler (what `systemctl reload` sends).
    life = _Lifecycle(None)
    life.keys, life.daemon = central.keys, central

    async with trio.open_nursery() as nursery:
        await nursery.start(central.serve)
        await nursery.start(regional.serve)
        await nursery.start(edge.serve)

        # Phase 1: the first key. Every device's update is accepted.
        for device in devices[:3]:
            assert (await send(device)).status is ReceiptStatus.ACCEPTED
        await wait_for(lambda: edge.known_version >= 3, "three versions from the first key")
        await device_loads_newest(3)

        # Phase 2: rotate without a restart. The operator makes key 2, its
        # certificate (in the certificates folder) and installs it as identity_key,
        # then reloads the central; a device update is in flight meanwhile.
        second = rotate("2025-11-27T00:00:00Z")
        assert second["private_key_file"] == str(keys_dir / "central-2.key")
        central_2 = load_signing_identity(keys_dir / "central-2.key")
        assert load_signing_identity(identity_key).key_id == central_2.key_id
        assert central.keys.identity.key_id == central_1.key_id  # nothing read yet
        life.on_signal(signal.SIGHUP)
        assert (await send(devices[0])).status is ReceiptStatus.ACCEPTED
        await wait_for(lambda: central.identity_reload.rotations == 1, "the central rotates")
        assert central.keys.identity.key_id == central_2.key_id
        assert not central.identity_reload.refused
        assert (await send(devices[3])).status is ReceiptStatus.ACCEPTED
        await wait_for(lambda: edge.known_version >= 5, "versions signed by the rotated key")
        assert edge.keys.models.knows(central_2.key_id)
        assert regional.keys.models.knows(central_2.key_id)
        await device_loads_newest(5)
        assert parse_envelope((await registry.current_pointer()) or b"").sender == central_2.key_id
        assert device_store.rejected["unknown_sender"] >= 1  # the wait that the certificate ended
        # The certificate was in the registry before any pointer the new key signed.
        events = registry.events
        first_new = events.index(("pointer", central_2.key_id))
        assert ("certificate", central_2.key_id) in events[:first_new], events

        # Phase 3: revoke device 1, whose update of phase 1 is inside a version.
        revoked = cli(
            "keys",
            "revoke",
            "--signer",
            str(keys_dir / "root.key"),
            "--fleet",
            FLEET,
            "--out",
            str(revocations_file),
            "--key-id",
            devices[1].key_id,
        )
        assert revoked["serial"] == 1
        await wait_for(
            lambda: edge.revocations is not None and edge.revocations.current is not None,
            "the edge applies the list the central published",
        )
        refused = await send(devices[1])
        assert refused.status is ReceiptStatus.REJECTED
        assert refused.reason == "revoked"
        assert (await send(devices[2])).status is ReceiptStatus.ACCEPTED
        await wait_for(lambda: edge.known_version >= 6, "the version after the revocation")
        nursery.cancel_scope.cancel()

    # A restart reads the same config: the installed key, certified by a file in the
    # certificates folder, starts and reads back what both keys signed.
    restarted = CentralDaemon(
        config, nats=MemoryBus(nats), registry=registry, clock_ms=lambda: NOW_MS,
        store_in_thread=False,
    )  # fmt: skip
    assert restarted.keys.identity.key_id == central_2.key_id
    assert restarted.keys.central is None
    async with trio.open_nursery() as nursery:
        await nursery.start(restarted.serve)
        assert restarted.known_version == 6
        nursery.cancel_scope.cancel()

    counted, versions = load_lineage_counts(state / "state.sqlite")
    report = check(histories, counted, versions)
    assert report.counts["ok"] == 6, report.to_json()
    assert report.counts["rejected"] == 1, report.to_json()
    assert not report.failed, report.to_json()


def _handshake(port: int, ca: Path, cert: Path, key: Path) -> str:
    """TLS handshake and an MQTT 3.1.1 CONNECT; ``connack`` or why the broker refused."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    connect = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 1]) + b"x"
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(connect)
            answer = tls.recv(4)
    except (ssl.SSLError, OSError) as exc:
        return f"refused ({type(exc).__name__})"
    return "connack" if answer[:1] == b"\x20" and answer[3:4] == b"\x00" else f"closed {answer!r}"


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.brokers
def test_revoke_writes_a_crl_that_mosquitto_applies_on_sighup(tmp_path: Path) -> None:
    """Measured on Mosquitto 2.0: a rewritten crlfile applies to new connections at SIGHUP."""
    ca_dir = tmp_path / "pki"
    cli("keys", "ca", "--out", str(ca_dir), "--tls")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    pki = TestPki(ca_dir, ca_key, ca_cert, dt.timedelta(days=1))
    broker, alice, bob = (
        pki.issue_server("broker"),
        pki.issue_client("alice"),
        pki.issue_client("bob"),
    )
    port = free_port()
    log = tmp_path / "mosquitto.log"
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        "per_listener_settings false\nallow_anonymous false\n"
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"listener {port} 127.0.0.1\ncafile {ca_dir / 'ca.pem'}\n"
        f"certfile {broker.cert_file}\nkeyfile {broker.key_file}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        f"crlfile {ca_dir / 'crl.pem'}\nlog_dest file {log}\nlog_type all\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(config)])
    try:
        _wait_for(lambda: log.exists() and "Opening ipv4" in log.read_text(), "broker up")

        def answer(who: Any) -> str:
            return _handshake(port, ca_dir / "ca.pem", who.cert_file, who.key_file)

        _wait_for(lambda: answer(alice) == "connack", "alice connects before revocation")
        signer = tmp_path / "root.key"
        save_signing_identity(SigningIdentity.from_seed(b"\x65" * 32), signer)
        revoked = cli(
            "keys", "revoke", "--signer", str(signer), "--fleet", FLEET,
            "--out", str(tmp_path / "revocations.bin"), "--name", "alice",
            "--tls-ca", str(ca_dir), "--tls-cert", str(alice.cert_file),
        )  # fmt: skip
        assert revoked["crl_file"] == str(ca_dir / "crl.pem")
        # The new CRL is on disk, but the broker still uses the one it read.
        assert answer(alice) == "connack"
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "Reloading config" in log.read_text(), "the broker reloads")
        assert answer(alice).startswith("refused")
        assert answer(bob) == "connack"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
