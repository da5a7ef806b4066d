"""``fedtier status`` against a running mesh, and the status bucket under the deployed permissions.

The mesh test starts real brokers and daemons (``simulations.mesh``, as
test_mesh.py does, smaller), runs ``fedtier status --json`` as a user does
(a subprocess with a daemon's config), waits with deadlines for every daemon
and for versions to advance, then stops one edge cleanly and kills the other
and sees them turn ``stopped`` and ``stale``. The permissions test runs
deploy/nats/accounts.conf's users: each daemon writes only its own keys,
the ``status`` user only reads, through the command's TLS and nkeys options.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fedtier.protocol.bus.nats import NatsConfig, open_nats_bus
from fedtier.protocol.errors import ConfigError, PublishError
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.mesh import FlushSpec, MeshSpec, open_brokers, open_mesh, prepare_mesh
from fedtier.simulations.testing import (
    CertFiles,
    NatsServerProcess,
    NatsTls,
    NkeyUser,
    TestPki,
    inbox_prefix,
    nats_accounts,
)
from fedtier.tiers._status import STATUS_MAX_AGE_S, StatusSnapshot, encode_snapshot

pytestmark = pytest.mark.brokers

INTERVAL_S = 1.0
"""The daemons' [status] interval here: a dead one is stale after 3 s."""
Doc = dict[str, Any]


def status_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtier", "status", *args]


async def status_once(*args: str) -> tuple[int, Doc]:
    """``fedtier status --json ARGS`` once: its exit status and its document."""
    done = await trio.run_process(
        status_command("--json", *args), capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode in (0, 1), done.stderr.decode()
    return done.returncode, json.loads(done.stdout)


async def watch_until(
    config: Path, accept: Callable[[Doc], bool], what: str, timeout_s: float
) -> Doc:
    """Run ``fedtier status --watch --json`` until a refresh satisfies ``accept``; return it."""
    process = await trio.lowlevel.open_process(
        status_command("--config", str(config), "--json", "--watch", "--every", str(INTERVAL_S)),
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    buffer = b""
    last: Doc | None = None
    try:
        with trio.move_on_after(timeout_s):
            while True:
                chunk = await process.stdout.receive_some(65536)
                assert chunk, f"fedtier status --watch ended; last refresh: {last}"
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    last = json.loads(line)
                    if accept(last):
                        return last
        raise AssertionError(f"{what}: not within {timeout_s} s; last refresh {json.dumps(last)}")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stdout.aclose()


def by_tier(doc: Doc) -> dict[str, list[Doc]]:
    tiers: dict[str, list[Doc]] = {}
    for daemon in doc["daemons"]:
        tiers.setdefault(daemon["tier"], []).append(daemon)
    return tiers


async def test_status_shows_every_daemon_versions_advance_and_stopped_ones_turn_stale(
    tmp_path: Path,
) -> None:
    spec = MeshSpec(
        fleet="stest",
        regions=(("r1", ("s1", "s2")),),
        devices=6,
        updates_per_s=6.0,
        misbehaving=0,
        # Every update makes its own version: versions advance fast.
        edge_flush=FlushSpec(1, 0.2),
        regional_flush=FlushSpec(1, 0.2),
        central_flush=FlushSpec(1, 0.2),
        shutdown_timeout_s=3.0,
    )
    # Deadlines, not waits: each phase ends as soon as it is seen. Under a CPU hog
    # the fleet's first update can take 20 s to come, so they are generous.
    with trio.fail_after(180):
        async with open_brokers(tmp_path / "brokers") as brokers:
            plan = await trio.to_thread.run_sync(
                prepare_mesh, spec, tmp_path, tmp_path / "out", brokers
            )
            configs = [plan.central_config, *plan.regional_configs.values()]
            configs += plan.edge_configs.values()
            for config in configs:
                with config.open("a") as file:
                    file.write(f"\n[status]\ninterval_s = {INTERVAL_S}\n")
            edge_config = plan.edge_configs["s1"]
            async with open_mesh(plan, ready_timeout_s=30, stop_grace_s=10) as mesh:
                await mesh.start_fleets(lambda line: None)

                def all_serving(doc: Doc) -> bool:
                    return doc["ok"] and len(doc["daemons"]) == 4

                first = await watch_until(edge_config, all_serving, "every daemon serving", 45)
                tiers = by_tier(first)
                assert {t: len(d) for t, d in tiers.items()} == {
                    "central": 1,
                    "regional": 1,
                    "edge": 2,
                }
                assert sorted(e["site"] for e in tiers["edge"]) == ["s1", "s2"]
                assert {e["region"] for e in tiers["edge"] + tiers["regional"]} == {"r1"}
                assert first["fleet"] == "stest"
                central_v = tiers["central"][0]["model_version"]

                def advanced(doc: Doc) -> bool:
                    now = by_tier(doc)
                    return (
                        doc["ok"]
                        and now["central"][0]["model_version"] >= central_v + 2
                        and all(e["model_version"] > central_v for e in now["edge"])
                        and sum(e["totals"].get("accepted", 0) for e in now["edge"]) > 0
                    )

                later = await watch_until(edge_config, advanced, "versions advance", 60)
                assert by_tier(later)["regional"][0]["totals"].get("accepted", 0) > 0

                # One-shot, as a user runs it: all fine, exit status 0. On a loaded
                # machine one snapshot may just have gone stale: ask again, with a deadline.
                with trio.fail_after(15):
                    code, doc = await status_once("--config", str(edge_config))
                    while code != 0:
                        code, doc = await status_once("--config", str(edge_config))
                assert [d["health"] for d in doc["daemons"]] == ["ok"] * 4
                assert all(d["age_s"] < 3 * INTERVAL_S for d in doc["daemons"])

                # A clean stop says so; a crash leaves a snapshot that goes stale.
                stopped, crashed = mesh.edges
                await mesh.group.stop([stopped], grace_s=10)
                await mesh.group.stop([crashed], grace_s=0, sig=signal.SIGKILL)
                assert crashed.returncode == -signal.SIGKILL

                def edges_down(doc: Doc) -> bool:
                    health = {e["site"]: e["health"] for e in by_tier(doc)["edge"]}
                    return health == {"s1": "stopped", "s2": "stale"}

                await watch_until(plan.central_config, edges_down, "edges stopped and stale", 30)
                code, doc = await status_once("--config", str(plan.central_config))
                assert code == 1
                assert not doc["ok"]
                assert {d["health"] for d in by_tier(doc)["regional"]} == {"ok"}
                code, doc = await status_once(
                    "--config", str(plan.central_config), "--expect", "edge=3"
                )
                assert code == 1
                assert [d["health"] for d in by_tier(doc)["edge"]].count("missing") == 1
                assert mesh.failed() is None


# -- the deployed permissions ----------------------------------------------------------------

FLEET = "perm"
REGION = "north"
ROLES = ("edge", "regional", "central", "operator", "status")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def users(pki: TestPki) -> dict[str, tuple[NkeyUser, CertFiles]]:
    return {
        role: (pki.issue_nkey_user(f"nats-{role}"), pki.issue_client(f"nats-{role}"))
        for role in ROLES
    }


@pytest.fixture(scope="module")
def secured_nats(
    tmp_path_factory: pytest.TempPathFactory,
    pki: TestPki,
    users: dict[str, tuple[NkeyUser, CertFiles]],
) -> Iterator[NatsServerProcess]:
    server = pki.issue_server("nats")
    accounts = nats_accounts(
        {role: nkey.public_key for role, (nkey, _) in users.items()}, fleet=FLEET, region=REGION
    )
    try:
        process = NatsServerProcess.start(
            tmp_path_factory.mktemp("status-nats"),
            tls=NatsTls(pki.ca_file, server.cert_file, server.key_file),
            accounts=accounts,
        )
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)  # fail, never skip: make test runs it
    try:
        yield process
    finally:
        process.stop()


def connection(
    server: NatsServerProcess, pki: TestPki, users: dict[str, tuple[NkeyUser, CertFiles]], role: str
) -> NatsConfig:
    nkey, cert = users[role]
    return NatsConfig(
        servers=(server.url,),
        name=f"status-test-{role}",
        inbox_prefix=inbox_prefix(role, REGION),
        tls_ca_file=pki.ca_file,
        tls_cert_file=cert.cert_file,
        tls_key_file=cert.key_file,
        nkeys_seed_file=nkey.seed_file,
        manage_streams=False,
        require_sync_always=False,
        connect_attempts=1,
        request_timeout_s=2.0,
    )


def snapshot_bytes(tier: str, daemon_id: str, at_ms: int) -> bytes:
    return encode_snapshot(
        StatusSnapshot(
            tier=tier,
            daemon_id=daemon_id,
            fleet=FLEET,
            region=None if tier == "central" else REGION,
            at_ms=at_ms,
            started_ms=at_ms,
            interval_s=600.0,  # fresh for the whole test
        )
    )


async def test_each_daemon_writes_its_own_keys_and_the_status_user_only_reads(
    nats_loop: None,
    secured_nats: NatsServerProcess,
    pki: TestPki,
    users: dict[str, tuple[NkeyUser, CertFiles]],
) -> None:
    bucket_name = NatsSubjects(FLEET).status_bucket()
    now_ms = time.time_ns() // 1_000_000
    ids = {"edge": "e" * 24, "regional": "r" * 24, "central": "c" * 24}

    def config(role: str) -> NatsConfig:
        return connection(secured_nats, pki, users, role)

    with trio.fail_after(30):
        # The central creates the bucket (only it may) and writes its key.
        async with open_nats_bus(config("central")) as central:
            bucket = await central.kv_bucket(bucket_name, max_age_s=STATUS_MAX_AGE_S)
            await bucket.put(
                f"central.{ids['central']}", snapshot_bytes("central", ids["central"], now_ms)
            )
        for tier in ("edge", "regional"):
            async with open_nats_bus(config(tier)) as bus:
                bucket = await bus.kv_bucket(bucket_name, max_age_s=STATUS_MAX_AGE_S)
                own = f"{tier}.{REGION}.{ids[tier]}"
                await bucket.put(own, snapshot_bytes(tier, ids[tier], now_ms))
                other = "regional" if tier == "edge" else "edge"
                for forged in (
                    f"central.{'d' * 24}",
                    f"{other}.{REGION}.{'d' * 24}",
                    f"{tier}.south.{'d' * 24}",
                ):
                    with pytest.raises(PublishError, match="permissions violation"):
                        await bucket.put(forged, b"forged")
        async with open_nats_bus(config("status")) as reader:
            bucket = await reader.kv_bucket(bucket_name, max_age_s=STATUS_MAX_AGE_S)
            assert sorted(await bucket.keys()) == sorted(
                [
                    f"central.{ids['central']}",
                    f"edge.{REGION}.{ids['edge']}",
                    f"regional.{REGION}.{ids['regional']}",
                ]
            )
            with pytest.raises(PublishError, match="permissions violation"):
                await bucket.put(f"edge.{REGION}.{ids['edge']}", b"forged")

    # The command as an operator runs it: TLS and nkeys options, the status user.
    nkey, cert = users["status"]
    code, doc = await status_once(
        "--fleet",
        FLEET,
        "--nats",
        secured_nats.url,
        "--tls-ca",
        str(pki.ca_file),
        "--tls-cert",
        str(cert.cert_file),
        "--tls-key",
        str(cert.key_file),
        "--nkeys-seed",
        str(nkey.seed_file),
        "--inbox-prefix",
        inbox_prefix("status"),
    )
    assert code == 0, doc
    assert [(d["tier"], d["health"]) for d in doc["daemons"]] == [
        ("central", "ok"),
        ("regional", "ok"),
        ("edge", "ok"),
    ]

    # The table, once and refreshed (not a terminal: plain text, one table per refresh).
    where = ["--fleet", FLEET, "--nats", secured_nats.url, "--tls-ca", str(pki.ca_file)]
    where += ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
    where += ["--nkeys-seed", str(nkey.seed_file), "--inbox-prefix", inbox_prefix("status")]
    for extra, tables in (([], 1), (["--watch", "--every", "0.2", "--count", "2"], 2)):
        done = await trio.run_process(
            status_command(*where, *extra), capture_stdout=True, capture_stderr=True, check=False
        )
        assert done.returncode == 0, done.stderr.decode()
        text = done.stdout.decode()
        headers = [line for line in text.splitlines() if line.startswith("TIER ")]
        assert len(headers) == tables
        assert headers[0].split()[:3] == ["TIER", "NAME", "HEALTH"]
        assert text.count(f"fleet {FLEET}: 3 daemons, all serving") == tables
        assert f"{REGION}/{ids['edge'][:8]}" in text
