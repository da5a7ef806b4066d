"""The independent exactly-once checker: device logs against the central lineage; reads files.

Every simulated device writes its own log (``client.outbox.Outbox.export_log``:
one JSON line per event ``sent``, ``resent``, ``receipt_accepted``,
``receipt_duplicate``, ``receipt_rejected``). The central records, per model
version, the ids of the device updates inside it (``tiers.store.read_lineages``).
The checker joins the two and classifies every update id:

==========  ======================  ===================  =========
class       receipt (accepted or    counted in versions  verdict
            duplicate)
==========  ======================  ===================  =========
ok          yes                     exactly once         fine
lost        yes                     never                failure
duplicated  any                     more than once       failure
unknown     no                      never                fine: the device was never told
recovered   no                      exactly once         fine: accepted, receipt lost
rejected    rejected receipt only   never                fine
unexpected  never sent              at least once        failure
==========  ======================  ===================  =========

A rejected update that was counted anyway is ``duplicated`` if counted more
than once and otherwise reported as ``rejected_but_counted`` (a failure: the
device was told it was not used).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtier.protocol.errors import FedtierError

__all__ = [
    "FAILURES",
    "CheckReport",
    "DeviceHistory",
    "check",
    "load_device_logs",
    "load_lineage_counts",
    "main",
    "render_report",
]

CLASSES = (
    "ok",
    "lost",
    "duplicated",
    "unknown",
    "recovered",
    "rejected",
    "rejected_but_counted",
    "unexpected",
)
FAILURES = frozenset({"lost", "duplicated", "unexpected", "rejected_but_counted"})
_ACCEPTING = {"receipt_accepted", "receipt_duplicate"}


@dataclass(slots=True)
class DeviceHistory:
    """What the device logs say about one update id."""

    sent: bool = False
    accepted: bool = False
    rejected: bool = False
    devices: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class CheckReport:
    """The checker's verdict.

    Attributes:
        counts: updates per class (every class present, zeros included).
        examples: up to five update ids (hex) per failing class.
        versions: model versions read from the central.
        counted: device updates inside those versions (with repeats).
    """

    counts: Mapping[str, int]
    examples: Mapping[str, Sequence[str]]
    versions: int
    counted: int

    @property
    def failed(self) -> bool:
        """True when any update was lost, duplicated, unexpected or counted after rejection."""
        return any(self.counts[c] for c in FAILURES)

    def to_json(self) -> dict[str, object]:
        """The report as JSON-ready data."""
        return {
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "versions": self.versions,
            "counted": self.counted,
            "failed": self.failed,
        }


def load_device_logs(paths: Iterable[Path]) -> dict[str, DeviceHistory]:
    """Read device logs (JSON lines, one file per device) into a history per update id.

    A torn last line (a device killed while writing) is skipped.

    Raises:
        FedtierError: a file cannot be read.
    """
    histories: dict[str, DeviceHistory] = {}
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise FedtierError(f"cannot read device log {path}: {exc.strerror}") from exc
        for line in lines:
            try:
                entry = json.loads(line)
                update_id, event = str(entry["update_id"]), str(entry["event"])
            except (ValueError, KeyError, TypeError):
                continue
            history = histories.setdefault(update_id, DeviceHistory())
            history.devices.add(path.stem)
            if event in ("sent", "resent"):
                history.sent = True
            elif event in _ACCEPTING:
                history.accepted = True
            elif event == "receipt_rejected":
                history.rejected = True
    return histories


def load_lineage_counts(central_store: Path) -> tuple[Counter[str], int]:
    """How often each device update id appears across the central's model versions.

    Returns:
        The counts by update id (hex) and the number of versions read.
    """
    from fedtier.tiers.store import read_lineages

    lineages = read_lineages(central_store)
    counted: Counter[str] = Counter()
    for ids in lineages.values():
        counted.update(i.hex() for i in ids)
    return counted, len(lineages)


def check(
    histories: Mapping[str, DeviceHistory], counted: Counter[str], versions: int
) -> CheckReport:
    """Classify every update id seen in the device logs or the lineage."""
    counts: Counter[str] = Counter({c: 0 for c in CLASSES})
    examples: dict[str, list[str]] = {}
    for update_id in sorted(set(histories) | set(counted)):
        history = histories.get(update_id)
        times = counted.get(update_id, 0)
        if history is None or not history.sent:
            verdict = "unexpected" if times else "unknown"
        elif times > 1:
            verdict = "duplicated"
        elif history.accepted:
            verdict = "ok" if times == 1 else "lost"
        elif history.rejected:
            verdict = "rejected_but_counted" if times else "rejected"
        else:
            verdict = "recovered" if times else "unknown"
        counts[verdict] += 1
        if verdict in FAILURES and len(examples.setdefault(verdict, [])) < 5:
            examples[verdict].append(update_id)
    return CheckReport(counts, examples, versions, sum(counted.values()))


def render_report(report: CheckReport, updates_in_logs: int) -> list[str]:
    """The verdict as the lines ``fedtier sim check`` prints."""
    lines = [
        f"{updates_in_logs} updates in device logs, {report.counted} counted in "
        f"{report.versions} model versions"
    ]
    for name in CLASSES:
        mark = "  <- FAILURE" if name in FAILURES and report.counts[name] else ""
        lines.append(f"  {name:21} {report.counts[name]:8d}{mark}")
    for name, ids in report.examples.items():
        lines.append(f"  e.g. {name}: {', '.join(ids)}")
    lines.append("FAILED" if report.failed else "OK: nothing lost, nothing counted twice")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier sim check --device-logs DIR --central-store FILE [--json]``.

    Returns:
        0 when nothing was lost, duplicated or unexpected; 1 otherwise; 2 for
        unusable arguments.
    """
    parser = argparse.ArgumentParser(
        prog="fedtier sim check",
        description="Classify every update: device logs against the central's lineage.",
    )
    parser.add_argument("--device-logs", type=Path, required=True, help="folder of *.jsonl logs")
    parser.add_argument("--central-store", type=Path, required=True, help="central state.sqlite")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        if not args.device_logs.is_dir():
            raise FedtierError(f"device log folder {args.device_logs} does not exist")
        histories = load_device_logs(sorted(args.device_logs.rglob("*.jsonl")))
        counted, versions = load_lineage_counts(args.central_store)
    except FedtierError as exc:
        print(f"fedtier sim check: {exc}", file=sys.stderr)
        return 2
    report = check(histories, counted, versions)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(render_report(report, len(histories))))
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
