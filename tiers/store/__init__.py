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
* ``_schema``: the DDL, the schema description and the migration from version 1.
* ``_records``: the record types (``InputRecord``, ``OutboxEntry``, ...).
* ``_inputs``: the tables every tier writes (inputs, envelopes, senders' marks,
  outbox, meta).
* ``_central``: the central's model versions, lineage and optimizer state.
* ``_store``: ``StateStore``, which assembles them, its recovery, and
  ``open_state_store``.
* ``_lineage``: read-only lineage readers for checkers and the CLI.
"""

from __future__ import annotations

from fedtier.tiers.store._engine import CommitTicket
from fedtier.tiers.store._lineage import read_lineage, read_lineages
from fedtier.tiers.store._records import (
    InputRecord,
    InputState,
    ModelVersionRecord,
    OutboxEntry,
    Recovery,
)
from fedtier.tiers.store._store import StateStore, open_state_store

__all__ = [
    "CommitTicket",
    "InputRecord",
    "InputState",
    "ModelVersionRecord",
    "OutboxEntry",
    "Recovery",
    "StateStore",
    "open_state_store",
    "read_lineage",
    "read_lineages",
]
