"""The durable state store of one tier daemon (sqlite); never imports a bus or protocol messages.

Acceptance is end to end (docs/architecture.md, data guarantees): a daemon acknowledges an input
to its sender (MQTT PUBACK, JetStream ack, receipt) only once the input is
recorded here and the record is on disk. Writes are grouped: callers submit
operations, one committer task gathers what arrives within ``commit_window_s``
and applies it in a single transaction (one fsync), in submission order, on a
worker thread. So an ``accept`` submitted before a ``flush`` is always durable
no later than that flush, and a flush never names an input that is not stored.

One concern a module:

* ``_engine``: the generic grouped-commit sqlite engine (connections and their
  pragmas, the committer, ``CommitTicket``, the crash points); knows no table.
* ``_schema``: the DDL, the schema description and the migrations from versions 1 and 2.
* ``_records``: the record types (``InputRecord``, ``OutboxEntry``, ...).
* ``_inputs``: the tables every tier writes (inputs, envelopes, senders' marks,
  outbox, meta).
* ``_segments``: the append-only, fsync'd log that holds open inputs' and
  pending partials' envelope bytes (the rows keep references).
* ``_quarantine``: inputs acknowledged but not usable (yet), and the offline
  access of ``fedtier quarantine``.
* ``_central``: the central's model versions, lineage, optimizer state and metrics.
* ``_store``: ``StateStore``, which assembles them, its recovery, and
  ``open_state_store``.
* ``_lineage``: read-only lineage readers for checkers and the CLI.
* ``_catalog``: the read-only catalog of model versions for ``fedtier model``.
* ``_admin``: offline writes while no central runs (``fedtier model rollback``).
* ``_retention``: the prune queries of the ``[retention]`` horizons.
"""

from __future__ import annotations

from fedtier.tiers.store._admin import ExclusiveStore, open_store_exclusively
from fedtier.tiers.store._catalog import (
    StoredVersion,
    read_latest_version,
    read_stored_version,
    read_stored_versions,
    read_target_reached,
)
from fedtier.tiers.store._central import RebasedVersion
from fedtier.tiers.store._engine import CommitTicket
from fedtier.tiers.store._inputs import now_ms, prune_segments
from fedtier.tiers.store._lineage import read_lineage, read_lineages
from fedtier.tiers.store._quarantine import (
    QuarantineRecord,
    QuarantineUsage,
    Retry,
    drop_quarantined,
    read_quarantine,
    read_quarantine_dropped,
    release_quarantined,
)
from fedtier.tiers.store._records import (
    InputRecord,
    InputState,
    ModelVersionRecord,
    OutboxEntry,
    Recovery,
    TargetRecord,
)
from fedtier.tiers.store._retention import (
    PruneCounts,
    TableSizes,
    prune_acked_outbox,
    prune_done_inputs,
    prune_version_history,
    table_sizes,
)
from fedtier.tiers.store._store import StateStore, open_state_store

__all__ = [
    "CommitTicket",
    "ExclusiveStore",
    "InputRecord",
    "InputState",
    "ModelVersionRecord",
    "OutboxEntry",
    "PruneCounts",
    "QuarantineRecord",
    "QuarantineUsage",
    "RebasedVersion",
    "Recovery",
    "Retry",
    "StateStore",
    "StoredVersion",
    "TableSizes",
    "TargetRecord",
    "drop_quarantined",
    "now_ms",
    "open_state_store",
    "open_store_exclusively",
    "prune_acked_outbox",
    "prune_done_inputs",
    "prune_segments",
    "prune_version_history",
    "read_latest_version",
    "read_lineage",
    "read_lineages",
    "read_quarantine",
    "read_quarantine_dropped",
    "read_stored_version",
    "read_stored_versions",
    "read_target_reached",
    "release_quarantined",
    "table_sizes",
]
