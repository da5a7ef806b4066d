"""The state store's DDL and its migrations from schema versions 1 to 6; imports sqlite3 only.

No trio here. Schema (``PRAGMA user_version = 7``; WAL, ``synchronous=FULL``,
``secure_delete=FAST``)::

    meta(key PRIMARY KEY, value)          open_epoch, out_seq, known_version,
                                          model_pointer (signed envelope bytes)
    inputs(pos PRIMARY KEY AUTOINCREMENT  fold order: refolding in pos order
                                          rebuilds the numerator bit for bit
           sender, input_id UNIQUE(...),  device update id or child partial id:
                                          dedupe survives restarts (no window)
           seq, epoch, status,            status: open -> flushed -> done
           partial_id, version,           what the input left in (partial, or
                                          model version at the central)
           base_version, n_samples, tau,  weights used at the fold, so a refold
           discount, clip_scale,          never depends on the policy or the
                                          version known after a restart
           accepted_ms, trace)            traceparent of the input's process span
    input_envelopes(pos PRIMARY KEY,      an open input's signed bytes, to refold
           envelope)                      it after a restart; deleted when its
                                          epoch is flushed (the partial carries it).
                                          Since version 6 a TEXT reference into
                                          the segment log (``_segments``); a BLOB
                                          is the bytes inline (older rows)
    senders(sender PRIMARY KEY, hwm,      per-sender sequence high-water marks,
           pruned_seq)                    and the highest seq the prune deleted
                                          (NULL if none; since version 7): an
                                          unknown update at or below it is a replay
    outbox(partial_id PRIMARY KEY, epoch, seq, subject, envelope, trace,
           state, created_ms, acked_ms)   flushed partials: pending until the
                                          upstream PubAck, then acked (bytes dropped);
                                          since version 6 the envelope is a TEXT
                                          reference into the segment log too
    model_versions(version PRIMARY KEY, blob, pointer, lineage, update_count,
           created_ms, published,         central only: signed blob and pointer
           rollback_of)                   envelopes, lineage = concatenated
                                          16-byte leaf update ids; rollback_of
                                          names the version whose parameters a
                                          rollback version republished (else NULL)
    optimizer_state(name PRIMARY KEY, version, dtype, shape, data)
                                          central only: raw array bytes, no pickle
    model_metrics(version, metric,        central only: what the held-out
           PRIMARY KEY(version, metric),  evaluator measured on each version
           value, evaluated_ms)           (``[evaluation]`` of the central's config)
    quarantine(qid PRIMARY KEY, sender,   inputs a tier acknowledged but could not
           input_id, subject, reason,     use (``tiers.tier``, quarantine): stored
           retry, detail, received_ms,    in the commit its acknowledgement waits
           released, envelope)            for; ``retry`` says when re-admission is
                                          tried (``any``, ``cut``, ``never``); a
                                          re-admitted row moves to
                                          ``quarantine_folded`` in the commit that
                                          records it as an input
    quarantine_folded(pos PRIMARY KEY,    a re-admitted quarantine row, kept with
           qid, ... as quarantine)        the input (``inputs.pos``) it became
                                          until that input is ``done``: an input
                                          a takeover forgets (``forget_unforwarded``)
                                          goes back to the quarantine, since it
                                          was acknowledged and nothing redelivers it
    leaves(update_id PRIMARY KEY, pos)    regional, central: every device update
                                          id inside an accepted child partial,
                                          with the input (``inputs.pos``) that
                                          carried it: a leaf that arrives again
                                          inside another partial is refused

A flush is one transaction: the partial enters the outbox, the inputs of the
flushed epoch become ``flushed``, their envelopes are deleted and the open epoch
moves on. When the partial is acknowledged upstream its inputs become ``done``
and the outbox drops its bytes.

Envelopes live in their own table so that nothing rewrites them: SQLite rewrites
a whole row, overflow pages included, on any update, so a status change on a row
that held a 400 KB envelope cost another 400 KB in the WAL and again at the
checkpoint (``fedtier bench edge`` measured 7.4x the wire bytes written per f32
update with envelopes inline). ``secure_delete=FAST`` keeps deletes from zeroing
freed pages, which Debian's SQLite (built with secure delete on) would otherwise
write once more. Older stores are migrated when opened: version 1 (envelopes
inline) to version 2, then version 2 to 3 (the ``model_metrics`` table and
the ``rollback_of`` column, both empty), then version 3 to 4 (the
``quarantine`` table, empty), then version 4 to 5 (the ``leaves`` index,
filled at a central from its versions' lineage), then version 5 to 6 (new input
and outbox envelopes go to the segment log; rows already inline stay readable),
then version 6 to 7 (the ``senders.pruned_seq`` column, NULL: nothing of an older
store was pruned with a floor, so none is known).
The ``quarantine_folded`` table needs no step: the schema script creates it,
empty, in a store of any version (an older fedtier leaves it alone; it only
ever holds rows of inputs this fedtier re-admitted).
Version 6 is a version of its own so that an older fedtier, which would read a
reference as envelope bytes, refuses the store instead; version 7 so that an
older fedtier, whose prune would delete inputs without raising the floor,
refuses it too.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import StoreError

__all__ = ["READABLE_VERSIONS", "SCHEMA_VERSION", "prepare_schema"]

# The package's name, not this module's: the migration has always logged as the store.
logger = logging.getLogger("fedtier.tiers.store")

SCHEMA_VERSION: Final = 7
READABLE_VERSIONS: Final = (1, 2, 3, 4, 5, 6, 7)
"""Schema versions this fedtier opens (older ones are migrated to ``SCHEMA_VERSION``)."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB
);
CREATE TABLE IF NOT EXISTS inputs (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    input_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'flushed', 'done')),
    partial_id BLOB,
    version INTEGER,
    base_version INTEGER NOT NULL,
    n_samples REAL NOT NULL,
    tau INTEGER NOT NULL,
    discount REAL NOT NULL,
    clip_scale REAL NOT NULL,
    accepted_ms INTEGER NOT NULL,
    trace TEXT NOT NULL DEFAULT '',
    UNIQUE (sender, input_id)
);
CREATE INDEX IF NOT EXISTS inputs_by_epoch ON inputs (epoch, status);
CREATE INDEX IF NOT EXISTS inputs_by_partial ON inputs (partial_id);
CREATE INDEX IF NOT EXISTS inputs_by_sender_seq ON inputs (sender, seq);
CREATE TABLE IF NOT EXISTS input_envelopes (
    pos INTEGER PRIMARY KEY,
    envelope BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS senders (
    sender TEXT PRIMARY KEY,
    hwm INTEGER NOT NULL,
    pruned_seq INTEGER
);
CREATE TABLE IF NOT EXISTS outbox (
    partial_id BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    subject TEXT NOT NULL,
    envelope BLOB,
    trace TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('pending', 'acked')),
    created_ms INTEGER NOT NULL,
    acked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY,
    blob BLOB NOT NULL,
    pointer BLOB NOT NULL,
    lineage BLOB NOT NULL,
    update_count INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    rollback_of INTEGER
);
CREATE TABLE IF NOT EXISTS optimizer_state (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS model_metrics (
    version INTEGER NOT NULL REFERENCES model_versions (version),
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    evaluated_ms INTEGER NOT NULL,
    PRIMARY KEY (version, metric)
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid INTEGER PRIMARY KEY,
    sender TEXT NOT NULL,
    input_id BLOB,
    subject TEXT NOT NULL,
    reason TEXT NOT NULL,
    retry TEXT NOT NULL CHECK (retry IN ('any', 'cut', 'never')),
    detail TEXT NOT NULL DEFAULT '',
    received_ms INTEGER NOT NULL,
    released INTEGER NOT NULL DEFAULT 0,
    envelope BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS quarantine_by_sender ON quarantine (sender);
CREATE TABLE IF NOT EXISTS quarantine_folded (
    pos INTEGER PRIMARY KEY,
    qid INTEGER NOT NULL,
    sender TEXT NOT NULL,
    input_id BLOB,
    subject TEXT NOT NULL,
    reason TEXT NOT NULL,
    retry TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    received_ms INTEGER NOT NULL,
    released INTEGER NOT NULL DEFAULT 0,
    envelope BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS leaves (
    update_id BLOB PRIMARY KEY,
    pos INTEGER
) WITHOUT ROWID;
"""


def prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables of ``path`` (writer connection ``conn``), migrating an older store.

    Raises:
        StoreError: the file has a schema version this fedtier does not read.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, *READABLE_VERSIONS):
        raise StoreError(
            f"state store {path} has schema version {version}; this fedtier "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    conn.executescript(_SCHEMA)
    # One transaction a step: a crash between two leaves a store of the middle
    # version, which the next open migrates on from there.
    if version == 1:
        _migrate_from_v1(conn)
    if version in (1, 2):
        _migrate_from_v2(conn)
    if version in (1, 2, 3):
        _migrate_from_v3(conn)
    if version in (1, 2, 3, 4):
        _migrate_from_v4(conn)
    if version in (1, 2, 3, 4, 5):
        _migrate_from_v5(conn)
    if version in (1, 2, 3, 4, 5, 6):
        _migrate_from_v6(conn)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _migrate_from_v1(conn: sqlite3.Connection) -> None:
    """Move a version 1 store's envelopes out of ``inputs`` (one transaction, to version 2).

    Only open inputs keep theirs (a flushed input's partial is in the outbox); the
    old ``inputs.envelope`` column stays, always NULL, since dropping a column
    rewrites the table.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO input_envelopes (pos, envelope) SELECT pos, envelope FROM inputs"
            " WHERE status = 'open' AND envelope IS NOT NULL"
        )
        conn.execute("UPDATE inputs SET envelope = NULL WHERE envelope IS NOT NULL")
        conn.execute("PRAGMA user_version = 2")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    logger.info("migrated the state store to schema version %d", 2)


def _migrate_from_v2(conn: sqlite3.Connection) -> None:
    """Give a version 2 store the ``rollback_of`` column (one transaction, to version 3).

    ``model_metrics`` needs no step: the schema script above created it, empty.
    Adding a NULL column rewrites no row, so this is quick on any store.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(model_versions)")}
        if "rollback_of" not in columns:
            conn.execute("ALTER TABLE model_versions ADD COLUMN rollback_of INTEGER")
        conn.execute("PRAGMA user_version = 3")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    logger.info("migrated the state store to schema version %d", 3)


def _migrate_from_v3(conn: sqlite3.Connection) -> None:
    """Take a version 3 store to version 4: the ``quarantine`` table (one transaction).

    The schema script above created the table, empty; nothing else changes, so
    the step only records the version (a crash before it leaves a version 3
    store with an empty extra table, which the next open migrates again).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("PRAGMA user_version = 4")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    logger.info("migrated the state store to schema version %d", 4)


def _migrate_from_v4(conn: sqlite3.Connection) -> None:
    """Take a version 4 store to version 5: the ``leaves`` index (one transaction).

    A central fills it from its versions' lineage (16-byte ids, concatenated),
    so a leaf already in a model version is refused when it comes back. Open
    and flushed child partials from before the upgrade are not indexed (their
    leaves sit inside envelopes this module does not parse): their ids are
    still deduplicated as partials, by ``(sender, partial id)``.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        for (lineage,) in conn.execute("SELECT lineage FROM model_versions").fetchall():
            conn.executemany(
                "INSERT OR IGNORE INTO leaves (update_id, pos) VALUES (?, NULL)",
                ((bytes(lineage[i : i + 16]),) for i in range(0, len(lineage), 16)),
            )
        conn.execute("PRAGMA user_version = 5")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    logger.info("migrated the state store to schema version %d", 5)


def _migrate_from_v5(conn: sqlite3.Connection) -> None:
    """Take a version 5 store to version 6: envelopes in the segment log (one transaction).

    Nothing is rewritten: inline envelopes (BLOB) stay readable, and new ones
    are stored as references (TEXT); the step only records the version.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("PRAGMA user_version = 6")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    logger.info("migrated the state store to schema version %d", 6)


def _migrate_from_v6(conn: sqlite3.Connection) -> None:
    """Take a version 6 store to version 7: the ``senders.pruned_seq`` column (one transaction).

    The column starts NULL (no floor): a version 6 prune kept no record of the
    sequence numbers it deleted, so their replays stay guarded by the staleness
    bound only, as before. Adding a NULL column rewrites no row.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(senders)")}
        if "pruned_seq" not in columns:
            conn.execute("ALTER TABLE senders ADD COLUMN pruned_seq INTEGER")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    logger.info("migrated the state store to schema version %d", SCHEMA_VERSION)
