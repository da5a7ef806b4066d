"""Every topic, subject, stream, bucket and consumer name fedtier uses; built here only.

Name tokens (fleet, site, region) are 1-64 characters from ``a-z 0-9 _ -``,
starting with a letter or digit, so they are safe in MQTT topics, NATS
subjects, stream names and file names alike. Device and daemon ids are key ids
(``protocol.identity``), which are safe by construction.

MQTT (site broker)::

    ft/<fleet>/<site>/up/<device>        device -> edge      signed update, QoS 1
    ft/<fleet>/<site>/receipt/<device>   edge -> device      signed receipt, QoS 1
    ft/<fleet>/<site>/model/current      edge -> devices     signed model pointer, retained
    ft/<fleet>/<site>/model/blob         edge -> devices     signed model blob, retained
    ft/<fleet>/<site>/model/blob/<i>     edge -> devices     part i of a blob above the packet
                                                             limit (protocol.model_parts), retained

NATS / JetStream (regional and central)::

    ft.<fleet>.up.region.<region>   edge -> regional     signed partial  stream FT_<FLEET>_UP
    ft.<fleet>.up.central           regional -> central  signed partial  stream FT_<FLEET>_UP
    ft.<fleet>.model.announce       central -> all       signed pointer  stream FT_<FLEET>_MODEL
    KV bucket ft_<fleet>_models, key "current"         the signed pointer of the current version
    Object store ft_<fleet>_blobs, object "v<version>"  signed model blobs
    KV bucket ft_<fleet>_status, keys "edge.<region>.<id>", "regional.<region>.<id>",
        "central.<id>"                                  each daemon's status snapshot
"""

from __future__ import annotations

import re

from fedtier.protocol.errors import LocalProtocolError
from fedtier.protocol.identity import valid_key_id

__all__ = [
    "MqttTopics",
    "NatsSubjects",
    "check_token",
]

_TOKEN_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_token(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid name token, else raise ``LocalProtocolError``."""
    if not isinstance(value, str) or _TOKEN_RE.fullmatch(value) is None:
        raise LocalProtocolError(
            f"{kind} name {value!r} is invalid; use 1-64 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def _check_device(device: str) -> str:
    if not valid_key_id(device):
        raise LocalProtocolError(f"device id {device!r} is not a key id (24 chars of a-z2-7)")
    return device


class MqttTopics:
    """Topic names on one site's MQTT broker.

    Args:
        fleet: the fleet token.
        site: the site token (one broker, one or more edge daemons).
    """

    __slots__ = ("fleet", "prefix", "site")

    def __init__(self, fleet: str, site: str) -> None:
        self.fleet = check_token("fleet", fleet)
        self.site = check_token("site", site)
        self.prefix = f"ft/{fleet}/{site}"

    def update(self, device: str) -> str:
        """The topic a device publishes its updates on."""
        return f"{self.prefix}/up/{_check_device(device)}"

    def updates_filter(self) -> str:
        """The filter an edge subscribes to for every device of its site."""
        return f"{self.prefix}/up/+"

    def receipt(self, device: str) -> str:
        """The topic an edge sends a device's receipts on."""
        return f"{self.prefix}/receipt/{_check_device(device)}"

    def model_pointer(self) -> str:
        """The retained topic holding the signed pointer to the current model."""
        return f"{self.prefix}/model/current"

    def model_blob(self) -> str:
        """The retained topic holding the signed current model blob."""
        return f"{self.prefix}/model/blob"

    def model_certificate(self) -> str:
        """The retained topic holding the root's certificate of the key that signed the model."""
        return f"{self.prefix}/model/cert"

    def model_blob_part(self, index: int) -> str:
        """The retained topic of part ``index`` of a blob above the broker's packet limit."""
        if index < 0:
            raise LocalProtocolError(f"a blob part index is >= 0, got {index}")
        return f"{self.prefix}/model/blob/{index}"

    def model_blob_parts(self) -> str:
        """The filter a device subscribes to for every part of a parted blob."""
        return f"{self.prefix}/model/blob/+"

    def blob_part_index(self, topic: str) -> int | None:
        """Return the part index of a blob part topic of this site, or None."""
        head = f"{self.prefix}/model/blob/"
        tail = topic[len(head) :] if topic.startswith(head) else ""
        if not tail.isdigit() or len(tail) > 9 or (tail != "0" and tail.startswith("0")):
            return None
        return int(tail)

    def device_of(self, topic: str) -> str | None:
        """Return the device id of an update topic of this site, or None."""
        head = f"{self.prefix}/up/"
        if not topic.startswith(head):
            return None
        device = topic[len(head) :]
        return device if valid_key_id(device) else None


class NatsSubjects:
    """Subjects, streams, KV buckets and consumers of one fleet on NATS.

    Args:
        fleet: the fleet token.
    """

    __slots__ = ("fleet",)

    def __init__(self, fleet: str) -> None:
        self.fleet = check_token("fleet", fleet)

    def to_region(self, region: str) -> str:
        """Where edges of ``region`` send their partials."""
        return f"ft.{self.fleet}.up.region.{check_token('region', region)}"

    def to_central(self) -> str:
        """Where regional daemons send their partials."""
        return f"ft.{self.fleet}.up.central"

    def model_announce(self) -> str:
        """Where the central announces each new signed model version."""
        return f"ft.{self.fleet}.model.announce"

    def up_stream(self) -> tuple[str, str]:
        """Name and subject filter of the JetStream stream holding partials."""
        return f"FT_{self.fleet.upper()}_UP", f"ft.{self.fleet}.up.>"

    def model_stream(self) -> tuple[str, str]:
        """Name and subject filter of the JetStream stream holding announcements."""
        return f"FT_{self.fleet.upper()}_MODEL", f"ft.{self.fleet}.model.>"

    def model_bucket(self) -> str:
        """KV bucket whose key ``current`` holds the signed current pointer."""
        return f"ft_{self.fleet}_models"

    def blob_store(self) -> str:
        """Object store holding signed model blobs."""
        return f"ft_{self.fleet}_blobs"

    @staticmethod
    def blob_object(version: int) -> str:
        """Object name of a model version's blob."""
        if version < 0:
            raise LocalProtocolError(f"model version must be >= 0, got {version}")
        return f"v{version}"

    def status_bucket(self) -> str:
        """KV bucket of the daemons' status snapshots (``fedtier status``)."""
        return f"ft_{self.fleet}_status"

    def lease_bucket(self) -> str:
        """KV bucket of the leases: which instance of a site, region or central is active."""
        return f"ft_{self.fleet}_leases"

    @staticmethod
    def lease_key(tier: str, region: str | None, site: str | None) -> str:
        """Key of one lease: ``edge.<region>.<site>``, ``regional.<region>`` or ``central``."""
        check_token("tier", tier)
        parts = [tier] + [
            check_token(kind, value)
            for kind, value in (("region", region), ("site", site))
            if value is not None
        ]
        return ".".join(parts)

    def forwarded_bucket(self) -> str:
        """KV bucket of the regionals' intents: partials sealed and about to be published."""
        return f"ft_{self.fleet}_forwarded"

    @staticmethod
    def status_key(tier: str, region: str | None, daemon_id: str) -> str:
        """Key of one daemon's snapshot: ``<tier>.<region>.<id>``, or ``central.<id>``.

        The region is part of the key so a NATS user may be allowed to write
        exactly its region's keys (deploy/nats/accounts.conf).
        """
        check_token("tier", tier)
        if not valid_key_id(daemon_id):
            raise LocalProtocolError(f"daemon id {daemon_id!r} is not a key id")
        if region is None:
            return f"{tier}.{daemon_id}"
        return f"{tier}.{check_token('region', region)}.{daemon_id}"

    def regional_consumer(self, region: str) -> str:
        """Durable consumer shared by the regional daemons of ``region``."""
        return f"regional-{check_token('region', region)}"

    @staticmethod
    def central_consumer() -> str:
        """Durable consumer shared by central daemons."""
        return "central"
