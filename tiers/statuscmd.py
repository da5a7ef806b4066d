"""``fedtier status``: every daemon of a fleet, from the snapshots they publish; no client imports.

Reads the fleet's status bucket (``tiers._status``) over NATS with the same
connection settings as the daemons (a daemon's TOML, or ``--nats`` and the
TLS and credential files), and prints one row per daemon: a table, JSON
(``--json``), or a live view (``--watch``; rich when installed, plain text
otherwise). trio, the NATS client, the snapshot codec and the config loader
are imported only when it runs, so building its parser costs nothing.

Exit status: 0 when every daemon found is serving with a fresh snapshot
(and every ``--expect``-ed one is there), 1 when one is stale, stopped,
starting, unreadable or missing (or none publishes at all), 2 when the
bucket cannot be read (configuration, connection, permissions).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from fedtier.protocol.errors import ConfigError, FedtierError, RemoteProtocolError

# The snapshot codec, the config loader and the names (cryptography) cost a
# daemon-sized import; ``fedtier.cli`` imports this module to build every
# command's parser, so they are imported by the functions that use them.
if TYPE_CHECKING:
    from fedtier.protocol.bus.nats import KvBucket
    from fedtier.tiers._status import StatusSnapshot
    from fedtier.tiers.config import NatsSettings

__all__ = ["DESCRIPTION", "Row", "add_arguments", "gather_rows", "render_table", "run"]

DESCRIPTION: Final = (
    "Show every daemon of a fleet (tier, model version, buffer fill, accept and reject "
    "rates, quarantine, outbox, last error, snapshot age) from the status snapshots they "
    "publish over NATS. Exit status 0: all serving and fresh; 1: a daemon is stale, "
    "stopped, starting, unreadable or missing; 2: the status could not be read."
)
_ORDER: Final = {"central": 0, "regional": 1, "edge": 2}
EXIT_OK: Final = 0
EXIT_UNHEALTHY: Final = 1
EXIT_UNREADABLE: Final = 2


@dataclass(frozen=True, slots=True)
class Row:
    """One daemon as ``fedtier status`` shows it.

    Attributes:
        key: its key in the status bucket (``<tier>.<region>.<id>``).
        health: ``ok``, ``standby``, ``stale``, ``stopped``, ``starting``, ``stopping``,
            ``unreadable`` or ``missing``.
        age_s: seconds since its snapshot, by this machine's clock.
        snapshot: the snapshot, or None (unreadable, missing).
        problem: why it is unreadable or missing.
    """

    key: str
    health: str
    age_s: float | None = None
    snapshot: StatusSnapshot | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """Serving with a fresh snapshot, or a fresh standby (``[lease]``: another is active)."""
        return self.health in ("ok", "standby")

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the snapshot's fields (or its tier), key, health, age_s and problem."""
        data: dict[str, Any] = (
            self.snapshot.to_dict() if self.snapshot is not None else {"tier": _tier_of(self)}
        )
        data.update(key=self.key, health=self.health, age_s=self.age_s, problem=self.problem)
        return data


def health_of(snapshot: StatusSnapshot, now_ms: int) -> str:
    """``stopped`` for a clean stop, ``stale`` past three intervals, else its state (``ok``)."""
    if snapshot.state == "stopped":
        return "stopped"
    if snapshot.is_stale(now_ms):
        return "stale"
    return "ok" if snapshot.state == "serving" else snapshot.state


def _tier_of(row: Row) -> str:
    return row.snapshot.tier if row.snapshot is not None else row.key.split(".", 1)[0]


def _sort_key(row: Row) -> tuple[int, str, str, str]:
    snap = row.snapshot
    if snap is None:
        parts = row.key.split(".")
        return (_ORDER.get(parts[0], 3), parts[1] if len(parts) > 2 else "", "", row.key)
    return (_ORDER.get(snap.tier, 3), snap.region or "", snap.site or "", snap.daemon_id)


def rows_from_entries(
    entries: Sequence[tuple[str, bytes]], now_ms: int, expect: dict[str, int] | None = None
) -> list[Row]:
    """Decode the bucket's ``(key, value)`` pairs into sorted rows; add ``missing`` ones."""
    from fedtier.tiers._status import decode_snapshot

    rows: list[Row] = []
    for key, value in entries:
        try:
            snapshot = decode_snapshot(value)
        except RemoteProtocolError as exc:
            rows.append(Row(key, "unreadable", problem=str(exc)))
            continue
        rows.append(Row(key, health_of(snapshot, now_ms), snapshot.age_s(now_ms), snapshot))
    for tier, wanted in (expect or {}).items():
        # An unreadable snapshot's daemon is there (and unhealthy already): its key names the tier.
        present = sum(1 for r in rows if _tier_of(r) == tier)
        for n in range(present, wanted):
            rows.append(
                Row(
                    f"{tier}.?{n + 1}",
                    "missing",
                    problem=f"--expect {tier}={wanted}: only {present} {tier} daemons publish",
                )
            )
    return sorted(rows, key=_sort_key)


async def gather_rows(
    bucket: KvBucket, now_ms: int | None = None, expect: dict[str, int] | None = None
) -> list[Row]:
    """Read every snapshot of the bucket now."""
    entries: list[tuple[str, bytes]] = []
    for key in await bucket.keys():
        got = await bucket.get(key)
        if got is not None:  # aged out between the listing and the read
            entries.append((key, got[0]))
    return rows_from_entries(entries, now_ms if now_ms is not None else _now_ms(), expect)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- rendering ------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        return "0s"  # the daemon's clock is ahead of ours
    if seconds < 90:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86_400:.0f}d"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n = n / 1024  # type: ignore[assignment]  # float from here on
    return f"{n}B"


def _rate(per_s: float) -> str:
    return f"{per_s:.1f}" if per_s < 100 else f"{per_s:.0f}"


COLUMNS: Final = (
    "TIER",
    "NAME",
    "HEALTH",
    "AGE",
    "VERSION",
    "BUFFER",
    "ACC/S",
    "REJ/S",
    "QUARANTINE",
    "OUTBOX",
    "ERRORS",
    "UPTIME",
)


def row_cells(row: Row) -> list[str]:
    """The row's cells, in ``COLUMNS`` order."""
    snap = row.snapshot
    if snap is None:
        tier = row.key.split(".", 1)[0]
        return [
            tier,
            row.key,
            row.health,
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            row.problem or "",
            "-",
        ]
    place = "/".join(p for p in (snap.region, snap.site) if p)
    name = f"{place}/{snap.daemon_id[:8]}" if place else snap.daemon_id[:8]
    buffer = f"{snap.buffer_inputs}/{snap.flush_max_inputs}"
    if snap.buffer_age_s is not None:
        buffer += f" {_duration(snap.buffer_age_s)}"
    rejected = _rate(snap.rejected_per_s)
    if snap.rejected_per_s_by_reason:
        top = max(snap.rejected_per_s_by_reason.items(), key=lambda item: item[1])[0]
        rejected += f" {top}"
    quarantine = (
        f"{snap.quarantine_inputs} {_bytes(snap.quarantine_bytes)}"
        if snap.quarantine_inputs
        else "0"
    )
    outbox = str(snap.outbox_depth)
    if snap.outbox_oldest_s is not None:
        outbox += f" {_duration(snap.outbox_oldest_s)}"
    errors = str(snap.error_count)
    if snap.errors:
        last = snap.errors[-1]
        errors += f" {_duration((snap.at_ms - last.at_ms) / 1000)} ago: {last.message}"
    return [
        snap.tier,
        name,
        _health_cell(row.health, snap),
        _duration(row.age_s),
        "-" if snap.model_version is None else f"v{snap.model_version}",
        buffer,
        _rate(snap.accepted_per_s),
        rejected,
        quarantine,
        outbox,
        errors,
        _duration(snap.uptime_s),
    ]


def _health_cell(health: str, snap: StatusSnapshot) -> str:
    """The health, with ``[lease]`` how long this instance has been the active one, and a target.

    A takeover is what an operator looks for after a lost machine: a central
    that continued from the registry says from which version. A central that
    stopped at its evaluation target says so, since it makes no version on
    purpose (and with ``[lease]`` takes no partial: they wait in the stream).
    """
    cell = health
    if snap.active_since_ms is not None:
        held = _duration(max(0.0, (snap.at_ms - snap.active_since_ms) / 1000))
        if snap.took_over_version is not None:
            cell = f"{health}, took over at v{snap.took_over_version} {held} ago"
        else:
            cell = f"{health}, active {held}"
    if snap.target_reached_version is not None:
        cell += f", target reached at v{snap.target_reached_version}"
        if snap.input_closed:
            cell += ", input closed"
    return cell


def summary_line(rows: Sequence[Row], fleet: str) -> str:
    """One sentence: how many daemons, how many not ok."""
    bad = [r for r in rows if not r.ok]
    if not rows:
        return f"fleet {fleet}: no daemon publishes its status (is any running? [status] enabled?)"
    if not bad:
        return f"fleet {fleet}: {len(rows)} daemons, all serving"
    kinds = ", ".join(sorted({r.health for r in bad}))
    return f"fleet {fleet}: {len(rows)} daemons, {len(bad)} not ok ({kinds})"


def render_table(rows: Sequence[Row], fleet: str, *, max_error_chars: int = 60) -> str:
    """Plain-text table of ``rows`` (columns padded; the last error cut), with a summary line."""
    cells = [list(COLUMNS)]
    for row in rows:
        line = row_cells(row)
        if len(line[-2]) > max_error_chars:
            line[-2] = line[-2][: max_error_chars - 1] + "…"
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    text = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in cells
    ]
    return "\n".join([*text, "", summary_line(rows, fleet)])


def _rich_table(rows: Sequence[Row], fleet: str) -> Any:
    from rich.table import Table

    table = Table(title=f"fedtier status: fleet {fleet}", caption=summary_line(rows, fleet))
    for name in COLUMNS:
        table.add_column(name, overflow="fold" if name == "ERRORS" else "ellipsis")
    for row in rows:
        style = None if row.ok else ("yellow" if row.health in ("starting", "stopping") else "red")
        table.add_row(*row_cells(row), style=style)
    return table


def to_json(rows: Sequence[Row], fleet: str, now_ms: int) -> str:
    """The ``--json`` document: one object per daemon, plus whether all are ok."""
    from fedtier.tiers._status import SCHEMA, STALE_AFTER_INTERVALS

    return json.dumps(
        {
            "schema": SCHEMA,
            "fleet": fleet,
            "at_ms": now_ms,
            "stale_after_intervals": STALE_AFTER_INTERVALS,
            "ok": bool(rows) and all(r.ok for r in rows),
            "daemons": [r.to_dict() for r in rows],
        },
        sort_keys=True,
    )


# -- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedtier status``."""
    where = parser.add_argument_group("where (as the daemons connect)")
    where.add_argument(
        "--config",
        type=Path,
        help="a daemon's TOML (or a file with just 'fleet' and [nats]): fleet, servers, TLS, keys",
    )
    where.add_argument("--fleet", help="the fleet token (overrides the config's)")
    where.add_argument(
        "--nats",
        action="append",
        metavar="URL",
        help="NATS server URL, repeatable (overrides the config's servers)",
    )
    where.add_argument("--tls-ca", type=Path, help="CA file (PEM) of the server certificate")
    where.add_argument("--tls-cert", type=Path, help="client certificate (PEM)")
    where.add_argument("--tls-key", type=Path, help="client certificate's key (PEM)")
    where.add_argument("--nkeys-seed", type=Path, help="nkeys user seed file")
    where.add_argument("--creds", type=Path, help="NATS .creds file (user JWT and seed)")
    where.add_argument(
        "--inbox-prefix",
        help="reply inbox prefix its NATS user may subscribe to (deploy: _INBOX_status)",
    )
    how = parser.add_argument_group("what")
    how.add_argument("--json", action="store_true", help="print JSON (one document per refresh)")
    how.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    how.add_argument(
        "--every", type=float, default=2.0, metavar="S", help="seconds between refreshes (2)"
    )
    how.add_argument(
        "--count", type=int, default=None, metavar="N", help="with --watch: stop after N refreshes"
    )
    how.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="TIER=N",
        help="at least N daemons of TIER must publish (else 'missing' rows, exit 1); repeatable",
    )
    how.add_argument(
        "--plain", action="store_true", help="with --watch: plain text even if rich is installed"
    )


def _expectations(values: Sequence[str]) -> dict[str, int]:
    from fedtier.tiers.config import TIER_KINDS

    expect: dict[str, int] = {}
    for value in values:
        tier, _, count = value.partition("=")
        if tier not in TIER_KINDS or not count.isdigit():
            raise ConfigError(
                f"--expect {value!r}: use TIER=N with TIER one of edge, regional, central"
            )
        expect[tier] = int(count)
    return expect


def _connection(args: argparse.Namespace) -> tuple[str, NatsSettings]:
    from fedtier.protocol.names import check_token
    from fedtier.tiers.config import NatsSettings, load_nats_settings

    fleet: str | None = None
    settings = NatsSettings()
    if args.config is not None:
        fleet, settings = load_nats_settings(args.config)
    if args.fleet is not None:
        fleet = args.fleet
    if fleet is None:
        raise ConfigError("give --config FILE or --fleet FLEET (and --nats URL)")
    check_token("fleet", fleet)
    overrides: dict[str, Any] = {}
    if args.nats:
        overrides["servers"] = tuple(args.nats)
    for option, name in (
        ("tls_ca", "tls_ca_file"),
        ("tls_cert", "tls_cert_file"),
        ("tls_key", "tls_key_file"),
        ("nkeys_seed", "nkeys_seed_file"),
        ("creds", "credentials_file"),
        ("inbox_prefix", "inbox_prefix"),
    ):
        if getattr(args, option) is not None:
            overrides[name] = getattr(args, option)
    return fleet, replace(settings, **overrides)


def run(args: argparse.Namespace) -> int:
    """Run ``fedtier status``; return its exit status (module docstring)."""
    try:
        expect = _expectations(args.expect)
        fleet, settings = _connection(args)
        if not args.every > 0 or (args.count is not None and args.count < 1):
            raise ConfigError("--every must be > 0 and --count >= 1")
    except FedtierError as exc:
        print(f"fedtier status: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    import trio

    # The bus logs each failed connect attempt as a warning; the one sentence
    # printed below says what failed, so only errors get through.
    logging.basicConfig(level=logging.ERROR, format="fedtier status: %(message)s")
    try:
        return trio.run(_run, args, fleet, settings, expect)
    except KeyboardInterrupt:
        return EXIT_OK
    except FedtierError as exc:
        print(f"fedtier status: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE


async def _run(
    args: argparse.Namespace, fleet: str, settings: NatsSettings, expect: dict[str, int]
) -> int:
    import trio

    from fedtier.protocol.bus.nats import NatsConfig, open_nats_bus
    from fedtier.protocol.names import NatsSubjects
    from fedtier.tiers._status import STATUS_MAX_AGE_S

    config = NatsConfig(
        servers=settings.servers,
        name="fedtier-status",
        inbox_prefix=settings.inbox_prefix,
        tls_ca_file=settings.tls_ca_file,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
        nkeys_seed_file=settings.nkeys_seed_file,
        credentials_file=settings.credentials_file,
        # A reader: no streams to create or check, no fsync to insist on.
        require_sync_always=False,
        manage_streams=False,
        connect_attempts=2,
        # The status bucket is made at the daemons' replicas if status runs first.
        replicas=settings.replicas,
    )
    bucket_name = NatsSubjects(fleet).status_bucket()
    live = _LiveView(sys.stdout, plain=args.plain or args.json) if args.watch else None
    code = EXIT_UNHEALTHY
    async with open_nats_bus(config) as bus:
        # Created when missing (no daemon published yet), as the daemons create it.
        bucket = await bus.kv_bucket(bucket_name, history=1, max_age_s=STATUS_MAX_AGE_S)
        refreshes = 0
        while True:
            now_ms = _now_ms()
            rows = await gather_rows(bucket, now_ms, expect)
            code = EXIT_OK if rows and all(r.ok for r in rows) else EXIT_UNHEALTHY
            if args.json:
                print(to_json(rows, fleet, now_ms), flush=True)
            elif live is not None:
                live.show(rows, fleet)
            else:
                print(render_table(rows, fleet), flush=True)
            refreshes += 1
            if not args.watch or (args.count is not None and refreshes >= args.count):
                break
            await trio.sleep(args.every)
    if live is not None:
        live.close()
    return code


class _LiveView:
    """``--watch`` output: a rich live table when rich is installed and stdout a terminal."""

    def __init__(self, out: TextIO, *, plain: bool) -> None:
        self._out = out
        self._live: Any = None
        self._tty = out.isatty()
        if plain or not self._tty:
            return
        try:
            from rich.live import Live
        except ImportError:  # rich is optional in production: plain text then
            return
        self._live = Live(auto_refresh=False)
        self._live.start()

    def show(self, rows: Sequence[Row], fleet: str) -> None:
        if self._live is not None:
            self._live.update(_rich_table(rows, fleet), refresh=True)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        prefix = "\x1b[H\x1b[2J" if self._tty else ""
        print(f"{prefix}{stamp}\n{render_table(rows, fleet)}\n", file=self._out, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
