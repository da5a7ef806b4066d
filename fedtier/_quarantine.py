"""``fedtier quarantine list|show|release|drop``: quarantined inputs of a tier; imports no lab.

A tier stores an input it acknowledged but could not use in its state store's
quarantine (``fedtier.tiers.store``; docs/operations.md, quarantine). These
commands read and write that table with plain sqlite3, while the daemon runs
or not:

* ``list`` and ``show`` read it (``show --out`` writes a row's bytes to a file,
  for forensics).
* ``release`` marks rows for re-admission. It never folds anything itself: the
  daemon runs marked rows through the core's admission at its next start or
  SIGHUP, in the same synchronous pass as every other re-admission, and
  deletes each row in the commit that records it as an input. So a row is
  folded at most once however often it is released, and one the core refuses
  again stays with the new reason.
* ``drop`` deletes rows for good (``--yes`` required) and counts them in the
  store (``dropped`` in ``list --json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtier.protocol.errors import ConfigError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fedtier quarantine`` and its actions to the subcommand table."""
    quarantine = sub.add_parser(
        "quarantine",
        help="inputs a tier acknowledged but could not use: list, show, release, drop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="quarantined inputs: reason, sender, time, size")
    _add_source(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_list)

    show = actions.add_parser("show", help="one quarantined input, optionally its bytes")
    _add_source(show)
    show.add_argument("qid", type=int, help="the row id (from list)")
    show.add_argument("--out", type=Path, default=None, help="write the input's bytes here")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_show)

    release = actions.add_parser(
        "release",
        help="re-admit rows through the core at the daemon's next start or SIGHUP",
    )
    _add_source(release)
    release.add_argument("qids", type=int, nargs="+", help="row ids (from list)")
    release.set_defaults(run=_release)

    drop = actions.add_parser("drop", help="delete rows for good (counted); needs --yes")
    _add_source(drop)
    drop.add_argument("qids", type=int, nargs="+", help="row ids (from list)")
    drop.add_argument("--yes", action="store_true", help="confirm: the inputs are lost")
    drop.set_defaults(run=_drop)


def _add_source(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", type=Path, help="the daemon's state folder")
    where.add_argument("--store", type=Path, help="the daemon's state.sqlite file")


def _store_path(args: argparse.Namespace) -> Path:
    if args.store is not None:
        return Path(args.store)
    return Path(args.state_dir) / "state.sqlite"


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row(record: Any) -> dict[str, object]:
    return {
        "qid": record.qid,
        "reason": record.reason,
        "sender": record.sender,
        "input_id": None if record.input_id is None else record.input_id.hex(),
        "subject": record.subject,
        "received_ms": record.received_ms,
        "retry": record.retry,
        "released": record.released,
        "bytes": record.size,
        "detail": record.detail,
    }


def _list(args: argparse.Namespace) -> int:
    from fedtier.tiers.store import read_quarantine, read_quarantine_dropped

    path = _store_path(args)
    records = read_quarantine(path)
    dropped = read_quarantine_dropped(path)
    if args.json:
        print(json.dumps({"inputs": [_row(r) for r in records], "dropped": dropped}, indent=2))
        return 0
    if not records:
        print(f"(nothing quarantined in {path}; {dropped} dropped so far)")
        return 0
    print(f"{'qid':>6}  {'received (UTC)':19}  {'reason':20}  {'bytes':>9}  retry  sender")
    for r in records:
        retry = r.retry + ("*" if r.released else "")
        print(
            f"{r.qid:>6}  {_when(r.received_ms):19}  {r.reason:20}  {r.size:>9}  "
            f"{retry:5}  {r.sender or '-'}"
        )
    total = sum(r.size for r in records)
    print(f"{len(records)} inputs, {total} bytes; {dropped} dropped so far (* released)")
    return 0


def _show(args: argparse.Namespace) -> int:
    from fedtier.protocol.files import atomic_write
    from fedtier.tiers.store import read_quarantine

    path = _store_path(args)
    records = read_quarantine(path, args.qid)
    if not records:
        raise ConfigError(f"state store {path} has no quarantined row {args.qid}")
    (record,) = records
    if args.out is not None:
        atomic_write(Path(args.out), record.envelope, mode=0o600)
    row = _row(record)
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    for key, value in row.items():
        print(f"{key:12} {value}")
    return 0


def _release(args: argparse.Namespace) -> int:
    from fedtier.tiers.store import release_quarantined

    marked = release_quarantined(_store_path(args), list(args.qids))
    print(
        f"{marked} of {len(args.qids)} rows released: the daemon re-admits them at its next "
        "start or SIGHUP"
    )
    return 0 if marked == len(args.qids) else 1


def _drop(args: argparse.Namespace) -> int:
    from fedtier.tiers.store import drop_quarantined

    if not args.yes:
        print("drop deletes acknowledged inputs for good; add --yes to do it", file=sys.stderr)
        return 2
    dropped = drop_quarantined(_store_path(args), list(args.qids))
    print(f"{dropped} of {len(args.qids)} rows dropped")
    return 0 if dropped == len(args.qids) else 1
