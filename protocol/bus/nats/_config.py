"""The NATS bus's configuration records (``StreamSpec``, ``NatsConfig``); imports no I/O library."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedtier.protocol.bus._base import subject_matches
from fedtier.protocol.bus.nats._subjects import _check_subject, _pattern_covers
from fedtier.protocol.errors import ConfigError

# JetStream's own bound on the copies of one stream.
_MAX_REPLICAS = 5


_INBOX_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A JetStream stream the bus creates or updates when it connects.

    Attributes:
        name: stream name (no ``.``, ``*``, ``>`` or whitespace).
        subjects: subject patterns the stream captures.
        max_age_s: how long messages are kept; 0 keeps them until other limits.
        duplicate_window_s: how long ``Nats-Msg-Id`` values are remembered for
            dedupe; at most ``max_age_s`` when that is set.
        max_msgs_per_subject: keep only the newest N messages per subject.
        storage: ``"file"`` (survives restarts) or ``"memory"``.
        replicas: copies the servers keep (1, or 3 on a 3-node cluster: a
            PubAck then means a majority of the copies hold it, so losing one
            node loses nothing acknowledged). At start an existing stream with
            fewer copies, or not on file storage when ``storage`` says file,
            is refused.
        max_bytes: the most bytes the stream holds (None: no cap of its own,
            only the account's). Together with ``discard="new"`` a full stream
            refuses a publish (the publisher sees ``BusUnavailable`` and keeps
            the message in its outbox) instead of silently dropping the oldest.
        discard: what a full stream does: ``"old"`` drops its oldest messages,
            ``"new"`` refuses the publish.
        retention: ``"limits"`` keeps messages until ``max_age_s`` or a size
            cap, whoever consumed them; ``"workqueue"`` deletes a message once
            the one consumer whose filter matches it acknowledged it, keeps it
            while no consumer exists yet, and refuses consumers with
            overlapping filters; ``"interest"`` deletes a message once every
            matching consumer acknowledged it, and stores nothing published
            while no consumer matches (nats-server still answers such a publish
            with a normal PubAck: a silent loss unless the consumer exists
            before the first publish). nats-server cannot change a stream to or
            from ``"workqueue"``: an existing stream keeps its retention then
            (with a warning), see ``_connection``.
    """

    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    duplicate_window_s: float
    max_msgs_per_subject: int | None = None
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    max_bytes: int | None = None
    discard: Literal["old", "new"] = "old"
    retention: Literal["limits", "workqueue", "interest"] = "limits"

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ".*> \t\r\n"):
            raise ConfigError(
                f"stream name {self.name!r} must be non-empty without . * > or spaces"
            )
        subjects: object = self.subjects
        if isinstance(subjects, str) or not subjects:
            raise ConfigError(
                f"stream {self.name!r} needs a tuple of subjects, got {self.subjects!r}"
            )
        for subject in self.subjects:
            _check_subject(subject, allow_wildcards=True)
        if self.max_age_s < 0 or self.duplicate_window_s < 0:
            raise ConfigError(
                f"stream {self.name!r} has a negative max_age_s or duplicate_window_s"
            )
        if self.max_age_s and self.duplicate_window_s > self.max_age_s:
            raise ConfigError(
                f"stream {self.name!r}: duplicate_window_s {self.duplicate_window_s} "
                f"exceeds max_age_s {self.max_age_s}"
            )
        if self.storage not in ("file", "memory"):
            raise ConfigError(f"stream {self.name!r}: storage must be 'file' or 'memory'")
        if not 1 <= self.replicas <= _MAX_REPLICAS:
            raise ConfigError(
                f"stream {self.name!r}: replicas must be 1-{_MAX_REPLICAS}, got {self.replicas!r}"
            )
        if self.max_bytes is not None and (
            isinstance(self.max_bytes, bool)
            or not isinstance(self.max_bytes, int)
            or self.max_bytes < 1
        ):
            raise ConfigError(
                f"stream {self.name!r}: max_bytes must be None or an integer >= 1, "
                f"got {self.max_bytes!r}"
            )
        if self.discard not in ("old", "new"):
            raise ConfigError(f"stream {self.name!r}: discard must be 'old' or 'new'")
        if self.retention not in ("limits", "workqueue", "interest"):
            raise ConfigError(
                f"stream {self.name!r}: retention must be 'limits', 'workqueue' or 'interest'"
            )

    def covers(self, subject_filter: str) -> bool:
        """Return True when every subject matching ``subject_filter`` lands in this stream."""
        return any(_pattern_covers(p, subject_filter) for p in self.subjects)


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """How to reach NATS and what JetStream state to expect there.

    Attributes:
        servers: server URLs (``nats://host:4222``, ``tls://...``).
        name: connection name shown in the server's monitoring.
        inbox_prefix: the subject prefix of this connection's reply inboxes
            (JetStream PubAcks and API replies). Give each user of a trust
            level its own (``_INBOX_edge_eu-west``) and allow only that
            prefix to be subscribed: with the shared ``_INBOX`` any user that
            may subscribe to ``_INBOX.>`` reads every other user's replies,
            partials included (deploy/nats/accounts.conf).
        connect_timeout_s: per-server TCP/TLS connect timeout.
        connect_attempts: rounds over ``servers`` for the initial connect
            (nats-py's initial connect does not retry on its own; after it
            succeeds the client reconnects forever).
        connect_backoff_s: first delay between rounds; doubles, capped at 10 s.
        reconnect_wait_s: delay between reconnect attempts to one server.
        request_timeout_s: JetStream API calls, PubAcks, ack confirmations.
        close_timeout_s: bound on the goodbyes (acks, naks, unsubscribe, close).
        tls_ca_file, tls_cert_file, tls_key_file: PEM files; the cert and key
            go together.
        tls_hostname: server name to verify when it differs from the URL host.
        nkeys_seed_file: an nkeys user seed (needs the ``nkeys`` package).
        credentials_file: a ``.creds`` file with user JWT and seed (ditto).
        streams: streams this client uses: publishes to subjects they cover
            go through JetStream, durable subscriptions bind to them.
        manage_streams: create or update ``streams`` on connect (needs the
            JetStream API permissions to do so). False only checks that they
            exist, for least-privilege users (deploy/nats/accounts.conf).
        wait_for_streams: with ``manage_streams`` off, a missing stream is
            waited for (checked every second, a warning logged every 10 s)
            instead of refused with ``ConfigError``: a daemon started before
            the one that creates the streams then waits for it.
        require_sync_always: refuse to start unless every server fsyncs every
            JetStream write (``sync_interval: always``, docs/architecture.md, data
            guarantees). The check fails closed: without a monitoring URL this
            is a ``ConfigError`` here, a server that does not answer is a
            failure at start, and it runs again after every reconnect and every
            ``sync_recheck_s`` (docs/operations.md, NATS clusters).
        monitoring_url: one server's HTTP monitoring base URL
            (``http://127.0.0.1:8222``), read for that check (the client
            protocol does not expose the setting). Kept for one server;
            ``monitoring_urls`` lists every server of a cluster.
        monitoring_urls: the monitoring base URL of every server (a cluster's
            three); checked together with ``monitoring_url``.
        sync_recheck_s: seconds between checks of every server after start (a
            node restarted with another config while this client stayed on
            another node); 0 checks only at start and after reconnects.
        jetstream_domain: the JetStream domain whose streams, KV buckets and
            object stores this client uses, when it connects to a leaf node
            with a JetStream of its own (an edge at a site: ``core``, the
            domain of the cluster the leaf node connects to). None: the
            JetStream of the servers it connects to.
        replicas: copies of each KV bucket and object store this client
            creates (streams carry their own in ``StreamSpec.replicas``); an
            existing bucket with fewer copies or not on file storage is refused.
        ack_wait_s: how long a durable consumer waits for an ack before
            redelivering (set when the consumer is created).
        max_deliver: most deliveries of one message to a durable consumer (set
            when the consumer is created). Past it the server stops redelivering
            and publishes ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<durable>``
            (with the message's stream sequence); the message itself stays in
            the stream (limits retention) until ``max_age``, where an operator
            reads it (docs/operations.md, quarantine). A daemon acknowledges
            every delivery it admits or quarantines, so only one it could
            neither use nor quarantine (a full quarantine) reaches the bound.
        max_hold_s: how long this process keeps one fetched, unacknowledged
            delivery from being redelivered, with an in-progress ack every third
            of the consumer's ack wait: a delivery waiting in a slow daemon is
            not handed to another consumer of the durable meanwhile. Past it (and
            at once when the process stops) the server redelivers after
            ``ack_wait``, as for a delivery the daemon chose not to acknowledge.
            0 sends no in-progress acks.
        max_ack_pending: server-side bound on unacked messages per consumer,
            summed over every process sharing it.
        confirm_acks: ``Delivery.ack()`` of a durable delivery returns once
            the server confirmed it (one round trip per batch of concurrent
            acks). False returns once the ack is queued: faster for a
            consumer that acks one message at a time, but an ack queued just
            before a crash of this process is lost and the message redelivered.
        startup_backoff_s: first delay before retrying a start-up JetStream
            call (the stream check) that got no reply (a server restarting,
            a cluster without a leader yet); doubles on each try.
        startup_max_backoff_s: longest delay between those tries. They go
            on until the server answers or the caller cancels (a daemon's
            stop signal): a daemon started while JetStream is away waits
            for it instead of exiting.
        fetch_batch: most messages one fetch asks for (also bounded by each
            subscription's free capacity).
        fetch_wait_s: how long one pull request lingers when the consumer has
            nothing; a fetch returns as soon as anything arrives.
        object_put_timeout_s: deadline of one object store put, which runs
            shielded from outside cancellation so it never leaves half an object.
        object_get_timeout_s: deadline of one object store get.
        max_parted_bytes: the largest payload a publish to a stream may carry,
            and a durable subscription assembles, when it is above the
            server's ``max_payload``: such a payload travels as numbered parts
            (``protocol.stream_parts``). 0 (the default) keeps parts off: a payload above
            ``max_payload`` is refused. A durable subscription holds the
            parts of at most ``2 x max_parted_bytes`` of incomplete wholes.
    """

    servers: Sequence[str]
    name: str = "fedtier"
    inbox_prefix: str = "_INBOX"
    connect_timeout_s: float = 2.0
    connect_attempts: int = 5
    connect_backoff_s: float = 0.5
    reconnect_wait_s: float = 0.5
    request_timeout_s: float = 5.0
    close_timeout_s: float = 5.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_hostname: str | None = None
    nkeys_seed_file: Path | None = None
    credentials_file: Path | None = None
    streams: tuple[StreamSpec, ...] = ()
    manage_streams: bool = True
    wait_for_streams: bool = False
    require_sync_always: bool = True
    monitoring_url: str | None = None
    monitoring_urls: Sequence[str] = ()
    sync_recheck_s: float = 60.0
    replicas: int = 1
    jetstream_domain: str | None = None
    ack_wait_s: float = 30.0
    max_deliver: int = 50
    max_hold_s: float = 300.0
    max_ack_pending: int = 10_000
    confirm_acks: bool = True
    startup_backoff_s: float = 0.5
    startup_max_backoff_s: float = 10.0
    fetch_batch: int = 256
    fetch_wait_s: float = 5.0
    object_put_timeout_s: float = 60.0
    object_get_timeout_s: float = 60.0
    max_parted_bytes: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.servers, str) or not self.servers:
            raise ConfigError(
                f"NATS servers must be a non-empty list of URLs, got {self.servers!r}"
            )
        object.__setattr__(self, "servers", tuple(self.servers))
        positive = {
            "connect_timeout_s": self.connect_timeout_s,
            "connect_backoff_s": self.connect_backoff_s,
            "reconnect_wait_s": self.reconnect_wait_s,
            "request_timeout_s": self.request_timeout_s,
            "close_timeout_s": self.close_timeout_s,
            "ack_wait_s": self.ack_wait_s,
            "fetch_wait_s": self.fetch_wait_s,
            "object_put_timeout_s": self.object_put_timeout_s,
            "object_get_timeout_s": self.object_get_timeout_s,
            "startup_backoff_s": self.startup_backoff_s,
            "startup_max_backoff_s": self.startup_max_backoff_s,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"NATS setting {key} must be > 0, got {value!r}")
        if not _INBOX_PREFIX.fullmatch(self.inbox_prefix):
            raise ConfigError(
                f"NATS inbox_prefix {self.inbox_prefix!r} must be one subject token of "
                "letters, digits, '_' and '-' (no '.', '*', '>')"
            )
        if not self.max_hold_s >= 0:
            raise ConfigError(f"NATS setting max_hold_s must be >= 0, got {self.max_hold_s!r}")
        if self.max_parted_bytes < 0:
            raise ConfigError(
                f"NATS setting max_parted_bytes must be >= 0, got {self.max_parted_bytes!r}"
            )
        for key, count in {
            "connect_attempts": self.connect_attempts,
            "max_ack_pending": self.max_ack_pending,
            "max_deliver": self.max_deliver,
            "fetch_batch": self.fetch_batch,
        }.items():
            if count < 1:
                raise ConfigError(f"NATS setting {key} must be >= 1, got {count!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("NATS tls_cert_file and tls_key_file must be given together")
        if self.nkeys_seed_file is not None and self.credentials_file is not None:
            raise ConfigError("give NATS either nkeys_seed_file or credentials_file, not both")
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ConfigError(f"NATS stream names repeat: {names}")
        if isinstance(self.monitoring_urls, str):
            raise ConfigError(
                f"NATS monitoring_urls must be a list of URLs, got {self.monitoring_urls!r}"
            )
        object.__setattr__(self, "monitoring_urls", tuple(self.monitoring_urls))
        for url in self.sync_check_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"NATS monitoring URL must be http(s), got {url!r}")
        if self.require_sync_always and not self.sync_check_urls:
            raise ConfigError(
                f"NATS connection {self.name!r} must check that every server runs "
                "'sync_interval: always', but no monitoring URL is set; set [nats] "
                "monitoring_urls (every server's http://host:8222) or, knowingly, "
                "require_sync_always = false"
            )
        if not self.sync_recheck_s >= 0:
            raise ConfigError(
                f"NATS setting sync_recheck_s must be >= 0, got {self.sync_recheck_s!r}"
            )
        if not 1 <= self.replicas <= _MAX_REPLICAS:
            raise ConfigError(
                f"NATS setting replicas must be 1-{_MAX_REPLICAS}, got {self.replicas!r}"
            )
        domain = self.jetstream_domain
        if domain is not None and (not domain or any(c in domain for c in ".*> \t\r\n")):
            raise ConfigError(
                f"NATS jetstream_domain must be a name without . * > or spaces, got {domain!r}"
            )

    @property
    def sync_check_urls(self) -> tuple[str, ...]:
        """Every monitoring base URL the fsync check reads, ``monitoring_url`` first, once each."""
        urls = [self.monitoring_url] if self.monitoring_url is not None else []
        urls += [u for u in self.monitoring_urls if u not in urls]
        return tuple(urls)

    def stream_for_subject(self, subject: str) -> StreamSpec | None:
        """Return the configured stream a concrete subject is published into, if any."""
        for spec in self.streams:
            if any(subject_matches(p, subject, "nats") for p in spec.subjects):
                return spec
        return None

    def stream_covering(self, subject_filter: str) -> StreamSpec | None:
        """Return the configured stream holding every subject the filter matches, if any."""
        for spec in self.streams:
            if spec.covers(subject_filter):
                return spec
        return None
