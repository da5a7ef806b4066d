"""Transport security on real brokers run with the rules of ``deploy/``.

Mosquitto runs the two TLS listeners of ``deploy/mosquitto/mosquitto.conf``:
the device listener requires a certificate of the fleet CA, takes its CN as
the user name and as the client id; the tier listener requires a certificate
of the tier CA and binds no client id (an edge opens two connections). Both
apply ``deploy/mosquitto/acl`` (edge user blocks rendered for this test's
edge). nats-server runs TLS with ``verify: true`` and the ``accounts`` block of
``deploy/nats/accounts.conf`` (its nkeys replaced by this test's, fleet and
region renamed). So these tests check the deployed rules themselves, not a
copy of them.

"Nothing arrived" is proved without waiting for silence: the refused message
is followed by an allowed one on the same ordered path (one MQTT
subscription, one JetStream stream), and the first thing the observer gets
must be the allowed one.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
from fedtier.protocol.bus.nats import NatsConfig, StreamSpec, open_nats_bus
from fedtier.protocol.errors import BusUnavailable, ConfigError, FedtierError, PublishError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.names import MqttTopics, NatsSubjects
from fedtier.simulations.testing import (
    CertFiles,
    MosquittoProcess,
    MosquittoTls,
    NatsServerProcess,
    NatsTls,
    NkeyUser,
    TestPki,
    inbox_prefix,
    mosquitto_acl,
    nats_accounts,
)
from fedtier.tiers._lease import Lease
from fedtier.tiers.regional import FORWARDED_MAX_AGE_S

pytestmark = pytest.mark.brokers

DEADLINE_S = 10
FLEET = "sec"
REGION = "north"
EDGE_CN = "edge-sec-1"
NATS_ROLES = ("edge", "regional", "central", "operator", "status")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_device_id() -> str:
    return SigningIdentity.generate().key_id


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tier_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """The tier CA: it signs the edges' MQTT certificates only."""
    return TestPki.create(tmp_path_factory.mktemp("tier-pki"))


@pytest.fixture(scope="module")
def tls_mosquitto(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, tier_pki: TestPki
) -> Iterator[MosquittoProcess]:
    workdir = tmp_path_factory.mktemp("tls-mosquitto")
    acl_file = workdir / "acl"
    acl_file.write_text(mosquitto_acl([EDGE_CN]))
    server = pki.issue_server("mosquitto")
    tls = MosquittoTls(
        pki.ca_file, server.cert_file, server.key_file, acl_file, tier_ca_file=tier_pki.ca_file
    )
    try:
        broker = MosquittoProcess.start(workdir / "broker", tls=tls)
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)  # fail, never skip: make test runs it
    try:
        yield broker
    finally:
        broker.stop()


def mqtt_config(
    broker: MosquittoProcess,
    ca_file: Path,
    client_id: str,
    cert: CertFiles | None,
    *,
    tier: bool = False,
    receive_maximum: int = 64,
) -> MqttConfig:
    """A device's config (one connection, device listener) or, with ``tier``, an edge's."""
    return MqttConfig(
        host=broker.host,
        port=broker.tier_port if tier else broker.port,
        client_id=client_id,
        ca_file=ca_file,
        cert_file=cert.cert_file if cert is not None else None,
        key_file=cert.key_file if cert is not None else None,
        connect_timeout_s=5.0,
        receive_maximum=receive_maximum,
        single_connection=not tier,
    )


def edge_config(broker: MosquittoProcess, pki: TestPki, tier_pki: TestPki) -> MqttConfig:
    cert = tier_pki.issue_client(EDGE_CN)
    return mqtt_config(broker, pki.ca_file, unique("edge"), cert, tier=True)


# -- MQTT ---------------------------------------------------------------------


async def test_device_publishes_its_updates_and_reads_its_receipts_and_the_model(
    tls_mosquitto: MosquittoProcess, pki: TestPki, tier_pki: TestPki
) -> None:
    topics = MqttTopics(FLEET, unique("site"))
    device, other = new_device_id(), new_device_id()
    edge_cfg = edge_config(tls_mosquitto, pki, tier_pki)
    device_cfg = mqtt_config(tls_mosquitto, pki.ca_file, device, pki.issue_client(device))
    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(edge_cfg) as edge,
            open_mqtt_bus(device_cfg) as dev,
            edge.subscribe(topics.updates_filter()) as updates,
            dev.subscribe(f"{topics.prefix}/receipt/+") as receipts,
            dev.subscribe(f"{topics.prefix}/model/#") as models,
        ):
            await dev.publish(topics.update(device), b"update-1")
            got = await updates.receive()
            assert (got.subject, got.payload) == (topics.update(device), b"update-1")
            await got.ack()

            # Both receipts match the device's filter; the broker's read
            # check lets only its own through, in publish order.
            await edge.publish(topics.receipt(other), b"receipt-for-other")
            await edge.publish(topics.receipt(device), b"receipt-for-device")
            got = await receipts.receive()
            assert (got.subject, got.payload) == (topics.receipt(device), b"receipt-for-device")
            await got.ack()

            await edge.publish(topics.model_pointer(), b"pointer-v1", retain=True)
            await edge.publish(topics.model_blob(), b"blob-v1", retain=True)
            seen = []
            for _ in range(2):
                got = await models.receive()
                seen.append((got.subject, got.payload))
                await got.ack()
            assert seen == [
                (topics.model_pointer(), b"pointer-v1"),
                (topics.model_blob(), b"blob-v1"),
            ]


async def test_a_device_s_one_connection_gets_its_pubacks_while_its_receipts_wait(
    tls_mosquitto: MosquittoProcess, pki: TestPki, tier_pki: TestPki
) -> None:
    """Publishes and deliveries share the device's connection; neither blocks the other.

    The receipt subscription is full (its capacity held unacknowledged) when
    the device publishes: the PUBACK still arrives, and what the reader took
    meanwhile stays within the Receive Maximum the device announced.
    """
    topics = MqttTopics(FLEET, unique("site"))
    device = new_device_id()
    receive_maximum, capacity, receipts_sent = 4, 2, 10
    device_cfg = mqtt_config(
        tls_mosquitto,
        pki.ca_file,
        device,
        pki.issue_client(device),
        receive_maximum=receive_maximum,
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(edge_config(tls_mosquitto, pki, tier_pki)) as edge,
            open_mqtt_bus(device_cfg) as dev,
            dev.subscribe(
                topics.receipt(device), durable=f"receipts-{device}", capacity=capacity
            ) as receipts,
            edge.subscribe(topics.updates_filter()) as updates,
        ):
            for i in range(receipts_sent):
                await edge.publish(topics.receipt(device), b"receipt-%d" % i)
            held = [await receipts.receive() for _ in range(capacity)]
            await dev.publish(topics.update(device), b"update")  # its PUBACK came
            got = await updates.receive()
            assert got.payload == b"update"
            await got.ack()
            assert capacity <= dev.stats().held_peak <= receive_maximum
            for delivery in held:
                await delivery.ack()
            payloads = [d.payload for d in held]
            while len(payloads) < receipts_sent:
                delivery = await receipts.receive()
                payloads.append(delivery.payload)
                await delivery.ack()
            assert payloads == [b"receipt-%d" % i for i in range(receipts_sent)]
            assert dev.stats().reconnects_total == 0


@pytest.mark.parametrize("target", ["another device's update", "model pointer", "model blob"])
async def test_device_cannot_publish_outside_its_update_topic(
    tls_mosquitto: MosquittoProcess, pki: TestPki, tier_pki: TestPki, target: str
) -> None:
    topics = MqttTopics(FLEET, unique("site"))
    device, other = new_device_id(), new_device_id()
    forbidden = {
        "another device's update": topics.update(other),
        "model pointer": topics.model_pointer(),
        "model blob": topics.model_blob(),
    }[target]
    device_cfg = mqtt_config(tls_mosquitto, pki.ca_file, device, pki.issue_client(device))
    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(edge_config(tls_mosquitto, pki, tier_pki)) as edge,
            open_mqtt_bus(device_cfg) as dev,
            # One subscription sees updates and models in the order routed.
            edge.subscribe(f"{topics.prefix}/#") as observer,
        ):
            with pytest.raises(PublishError) as refused:
                await dev.publish(forbidden, b"forged")
            assert forbidden in str(refused.value)
            assert "Not authorized" in str(refused.value)

            await dev.publish(topics.update(device), b"allowed")
            got = await observer.receive()
            assert (got.subject, got.payload) == (topics.update(device), b"allowed")
            await got.ack()


async def test_another_device_s_client_id_is_replaced_by_the_certificate_s(
    tls_mosquitto: MosquittoProcess, pki: TestPki, tier_pki: TestPki
) -> None:
    """A device that connects under another's client id gets its own session, not the other's.

    Mosquitto 2.0.11 (``use_username_as_clientid`` on the device listener)
    replaces the client id by the certificate's CN: the owner stays
    connected and keeps getting its receipts, and the impostor keeps only
    its own rights.
    """
    topics = MqttTopics(FLEET, unique("site"))
    owner, impostor = new_device_id(), new_device_id()
    owner_cfg = mqtt_config(tls_mosquitto, pki.ca_file, owner, pki.issue_client(owner))
    # The impostor's certificate, the owner's client id.
    impostor_cfg = mqtt_config(tls_mosquitto, pki.ca_file, owner, pki.issue_client(impostor))
    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(edge_config(tls_mosquitto, pki, tier_pki)) as edge,
            open_mqtt_bus(owner_cfg) as dev,
            dev.subscribe(topics.receipt(owner), durable=f"receipts-{owner}") as receipts,
        ):
            async with open_mqtt_bus(impostor_cfg) as thief:
                with pytest.raises(PublishError, match="Not authorized"):
                    await thief.publish(topics.update(owner), b"forged")
                await thief.publish(topics.update(impostor), b"allowed")
                await edge.publish(topics.receipt(owner), b"owner's receipt")
                got = await receipts.receive()
                assert got.payload == b"owner's receipt"
                await got.ack()
            # Had the impostor taken the session, the owner would have had to
            # reconnect before that receipt could reach it.
            assert dev.stats().reconnects_total == 0
    log = tls_mosquitto.log_path.read_text()
    assert f"as {impostor} " in log


@pytest.mark.parametrize(
    "credential",
    ["no certificate", "certificate of another CA", "device certificate on the tier listener"],
)
async def test_client_without_a_valid_certificate_cannot_connect(
    tls_mosquitto: MosquittoProcess, pki: TestPki, tmp_path: Path, credential: str
) -> None:
    device = new_device_id()
    cert = None
    if credential == "certificate of another CA":
        cert = TestPki.create(tmp_path / "rogue-ca").issue_client(device)
    tier = credential == "device certificate on the tier listener"
    if tier:
        cert = pki.issue_client(device)
    cfg = mqtt_config(tls_mosquitto, pki.ca_file, device, cert, tier=tier)
    with trio.fail_after(DEADLINE_S), pytest.raises(BusUnavailable, match="before CONNACK"):
        async with open_mqtt_bus(cfg):
            pass


# -- NATS ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NatsUsers:
    """Per role: the nkeys user and the TLS client certificate."""

    nkeys: dict[str, NkeyUser]
    certs: dict[str, CertFiles]


@pytest.fixture(scope="module")
def nats_users(pki: TestPki) -> NatsUsers:
    return NatsUsers(
        nkeys={role: pki.issue_nkey_user(f"nats-{role}") for role in NATS_ROLES},
        certs={role: pki.issue_client(f"nats-{role}") for role in NATS_ROLES},
    )


@pytest.fixture(scope="module")
def tls_nats(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPki, nats_users: NatsUsers
) -> Iterator[NatsServerProcess]:
    server = pki.issue_server("nats")
    accounts = nats_accounts(
        {role: user.public_key for role, user in nats_users.nkeys.items()},
        fleet=FLEET,
        region=REGION,
    )
    try:
        process = NatsServerProcess.start(
            tmp_path_factory.mktemp("tls-nats"),
            tls=NatsTls(pki.ca_file, server.cert_file, server.key_file),
            accounts=accounts,
        )
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)  # fail, never skip: make test runs it
    try:
        yield process
    finally:
        process.stop()


def streams() -> tuple[StreamSpec, ...]:
    # The streams every tier daemon declares (tiers/daemon.py).
    subjects = NatsSubjects(FLEET)
    up_name, up_filter = subjects.up_stream()
    model_name, model_filter = subjects.model_stream()
    return (
        StreamSpec(up_name, (up_filter,), max_age_s=3600.0, duplicate_window_s=600.0),
        StreamSpec(
            model_name,
            (model_filter,),
            max_age_s=3600.0,
            duplicate_window_s=600.0,
            max_msgs_per_subject=16,
        ),
    )


def nats_config(
    server: NatsServerProcess, pki: TestPki, users: NatsUsers, role: str, **overrides: object
) -> NatsConfig:
    base = NatsConfig(
        servers=(server.url,),
        name=f"test-{role}",
        inbox_prefix=inbox_prefix(role, REGION),
        tls_ca_file=pki.ca_file,
        tls_cert_file=users.certs[role].cert_file,
        tls_key_file=users.certs[role].key_file,
        nkeys_seed_file=users.nkeys[role].seed_file,
        streams=streams(),
        # Only the central may create or update streams (deploy permissions).
        manage_streams=role == "central",
        monitoring_url=server.monitoring_url,
        connect_attempts=1,
        reconnect_wait_s=0.05,
        request_timeout_s=2.0,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


async def test_an_edge_publishes_partials_to_its_region_only(
    nats_loop: None, tls_nats: NatsServerProcess, pki: TestPki, nats_users: NatsUsers
) -> None:
    subjects = NatsSubjects(FLEET)

    def config(role: str) -> NatsConfig:
        return nats_config(tls_nats, pki, nats_users, role)

    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config("central")) as central:
            async with open_nats_bus(config("edge")) as edge:
                await edge.publish(subjects.to_region(REGION), b"edge-partial", msg_id=unique("p"))
                for subject in (
                    subjects.to_central(),
                    subjects.to_region("south"),
                    subjects.model_announce(),
                ):
                    with pytest.raises(PublishError, match="permissions violation") as refused:
                        await edge.publish(subject, b"forged", msg_id=unique("f"))
                    assert subject in str(refused.value)

            async with open_nats_bus(config("regional")) as regional:
                async with regional.subscribe(
                    subjects.to_region(REGION), durable=subjects.regional_consumer(REGION)
                ) as partials:
                    got = await partials.receive()
                    assert got.payload == b"edge-partial"
                    await got.ack()
                await regional.publish(subjects.to_central(), b"regional-partial", msg_id="r1")

            # The edge's forged partial would sit before this one in the stream.
            async with central.subscribe(
                subjects.to_central(), durable=subjects.central_consumer()
            ) as inbox:
                got = await inbox.receive()
                assert got.payload == b"regional-partial"
                await got.ack()


async def test_only_the_central_writes_the_model_registry(
    nats_loop: None, tls_nats: NatsServerProcess, pki: TestPki, nats_users: NatsUsers
) -> None:
    subjects = NatsSubjects(FLEET)
    blob = bytes(range(256)) * 1024

    def config(role: str) -> NatsConfig:
        return nats_config(tls_nats, pki, nats_users, role)

    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config("central")) as central:
            pointers = await central.kv_bucket(subjects.model_bucket())
            blobs = await central.object_store(subjects.blob_store())
            await blobs.put(subjects.blob_object(1), blob)
            revision = await pointers.put("current", b"pointer-v1")
            await central.publish(subjects.model_announce(), b"announce-v1", msg_id=unique("a"))

            for role in ("regional", "edge"):
                async with open_nats_bus(config(role)) as reader:
                    their_pointers = await reader.kv_bucket(subjects.model_bucket())
                    their_blobs = await reader.object_store(subjects.blob_store())
                    # What a ModelRegistryReader does: read and watch the
                    # pointer, read the blob.
                    assert await their_pointers.get("current") == (b"pointer-v1", revision)
                    async with their_pointers.watch("current") as watch:
                        entry = await anext(watch)
                        assert (entry.value, entry.revision) == (b"pointer-v1", revision)
                    assert await their_blobs.get(subjects.blob_object(1)) == blob

                    with pytest.raises(PublishError, match="permissions violation"):
                        await their_pointers.put("current", b"forged")
                    with pytest.raises(PublishError, match="permissions violation"):
                        await their_pointers.update("current", b"forged", revision)
                    with pytest.raises(PublishError, match="permissions violation"):
                        await their_blobs.put(subjects.blob_object(2), b"forged")

            assert await pointers.get("current") == (b"pointer-v1", revision)


async def test_a_tier_other_than_the_central_may_not_manage_streams(
    nats_loop: None, tls_nats: NatsServerProcess, pki: TestPki, nats_users: NatsUsers
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(nats_config(tls_nats, pki, nats_users, "central")):
            pass  # the streams exist
        config = nats_config(tls_nats, pki, nats_users, "regional", manage_streams=True)
        with pytest.raises(ConfigError, match="refused it"):
            async with open_nats_bus(config):
                pass


@pytest.mark.parametrize(
    ("credential", "error", "match"),
    [
        ("no nkey", ConfigError, "refused the credentials"),
        ("an nkey the server does not know", ConfigError, "refused the credentials"),
        # The TLS alert ("certificate required", "unknown ca") is named only
        # when the client reads it before its write fails: not asserted.
        ("no client certificate", BusUnavailable, "cannot connect to NATS"),
        ("a certificate of another CA", BusUnavailable, "cannot connect to NATS"),
    ],
)
async def test_a_connection_without_credentials_is_refused(
    nats_loop: None,
    tls_nats: NatsServerProcess,
    pki: TestPki,
    nats_users: NatsUsers,
    tmp_path: Path,
    credential: str,
    error: type[Exception],
    match: str,
) -> None:
    by_credential: dict[str, dict[str, object]] = {
        "no nkey": {"nkeys_seed_file": None},
        "an nkey the server does not know": {
            "nkeys_seed_file": pki.issue_nkey_user(unique("stranger")).seed_file
        },
        "no client certificate": {"tls_cert_file": None, "tls_key_file": None},
        "a certificate of another CA": {},
    }
    overrides = by_credential[credential]
    if credential == "a certificate of another CA":
        rogue = TestPki.create(tmp_path / "rogue-ca").issue_client("nats-edge")
        overrides = {"tls_cert_file": rogue.cert_file, "tls_key_file": rogue.key_file}
    config = nats_config(tls_nats, pki, nats_users, "edge", **overrides)
    with trio.fail_after(DEADLINE_S), pytest.raises(error, match=match):
        async with open_nats_bus(config):
            pass


async def test_each_user_reads_replies_on_its_own_inbox_prefix_only(
    nats_loop: None, tls_nats: NatsServerProcess, pki: TestPki, nats_users: NatsUsers
) -> None:
    # With one shared _INBOX.> any credential could read every reply of the
    # account, the partials a regional fetches included.
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(nats_config(tls_nats, pki, nats_users, "central")):
            pass  # the streams exist
        for foreign in ("_INBOX", inbox_prefix("regional", REGION), inbox_prefix("central")):
            # A connection each, so one refusal's -ERR cannot be taken for another's.
            async with open_nats_bus(nats_config(tls_nats, pki, nats_users, "edge")) as edge:
                with pytest.raises(ConfigError, match="refused") as refused:
                    async with edge.subscribe(f"{foreign}.>"):
                        pass
            assert foreign in str(refused.value)
        # An edge left on the shared prefix gets no JetStream reply: it does not start.
        shared = nats_config(tls_nats, pki, nats_users, "edge", inbox_prefix="_INBOX")
        with pytest.raises(FedtierError):
            async with open_nats_bus(shared):
                pass


async def test_the_lease_and_intent_buckets_take_each_user_s_own_keys_only(
    nats_loop: None, tls_nats: NatsServerProcess, pki: TestPki, nats_users: NatsUsers
) -> None:
    # [lease] with the deployed users (docs/operations.md, "Run a standby"):
    # whichever instance comes first creates the buckets; each user takes its
    # own lease key and, a regional, writes and lists its own region's intents.
    subjects = NatsSubjects(FLEET)
    forged_by_role = {
        "edge": [f"regional.{REGION}", "edge.south.s1", "central"],
        "regional": ["regional.south", f"edge.{REGION}.s1", "central"],
        "central": [],
    }
    own_key = {"edge": f"edge.{REGION}.s1", "regional": f"regional.{REGION}", "central": "central"}

    def config(role: str) -> NatsConfig:
        return nats_config(tls_nats, pki, nats_users, role)

    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config("central")):
            pass  # the streams exist
        for role in ("regional", "edge", "central"):
            async with open_nats_bus(config(role)) as bus:
                kv = await bus.kv_bucket(subjects.lease_bucket(), max_age_s=10.0)
                lease = Lease(kv, own_key[role], ttl_s=10.0, instance=f"test-{role}")
                assert await lease.try_acquire()
                assert lease.is_held
                for forged in forged_by_role[role]:
                    with pytest.raises(PublishError, match="permissions violation"):
                        await kv.update(forged, b"forged", 0)
        async with open_nats_bus(config("regional")) as regional:
            intents = await regional.kv_bucket(
                subjects.forwarded_bucket(), max_age_s=FORWARDED_MAX_AGE_S, leader_reads=True
            )
            mine = f"{REGION}.{'ab' * 16}"
            await intents.put(mine, b"sealed partial")
            assert await intents.get(mine) == (b"sealed partial", 1)
            assert await intents.keys() == [mine]
            await intents.delete(mine)
            assert await intents.get(mine) is None
            with pytest.raises(PublishError, match="permissions violation"):
                await intents.put(f"south.{'ab' * 16}", b"forged")
        # A leased edge writes and lists its site's intents, never a regional's.
        async with open_nats_bus(config("edge")) as edge:
            intents = await edge.kv_bucket(
                subjects.forwarded_bucket(), max_age_s=FORWARDED_MAX_AGE_S, leader_reads=True
            )
            mine = f"edge.{REGION}.s1.{'cd' * 16}"
            await intents.put(mine, b"sealed edge partial")
            assert await intents.get(mine) == (b"sealed edge partial", 3)
            assert mine in await intents.keys()
            await intents.delete(mine)
            assert await intents.get(mine) is None  # read from the leader: the delete marker
            for forged in (f"{REGION}.{'cd' * 16}", f"edge.south.s1.{'cd' * 16}"):
                with pytest.raises(PublishError, match="permissions violation"):
                    await intents.put(forged, b"forged")
