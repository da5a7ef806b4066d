"""What a chaos run did: ``ChaosResult``, its summary lines and JSON; must not import trio."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fedtier.simulations.chaos._plan import FaultPlan
from fedtier.simulations.checker import CheckReport


@dataclass(slots=True)
class ChaosResult:
    """What a chaos run did and what the checker found.

    Attributes:
        report: the checker's verdict.
        updates_in_logs: distinct update ids in the device logs.
        faults: faults injected, by kind.
        skipped: faults not injected (their target never came up), by kind.
        exits: daemon and fleet exits, ``<tier>:<killed|crash_point|failed>``.
        failures: how the ``failed`` exits ended (last log lines).
        sent: updates the devices sent (first sends).
        receipted: updates the devices hold an accepted or duplicate receipt for.
        drained: every receipted update was counted before the daemons stopped.
        elapsed_s: wall time of the run.
        phase_s: wall time of each phase (setup, start, faults, drain, stop).
        unsafe: the safeties that were off.
        crash_at: the crash points armed.
        topology: ``single`` or ``ha``.
        missing_records: (``ha``) published versions whose record could not
            be read or verified: their lineage is unknown, so the run fails.
    """

    report: CheckReport
    updates_in_logs: int
    faults: Counter[str]
    skipped: Counter[str]
    exits: Counter[str]
    failures: list[str]
    sent: int
    receipted: int
    drained: bool
    elapsed_s: float
    phase_s: dict[str, float]
    unsafe: frozenset[str]
    crash_at: str
    topology: str = "single"
    missing_records: list[int] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when the checker found an update lost, duplicated or unexpected.

        Also when a published version's lineage could not be read: the checker
        cannot vouch for what it does not see.
        """
        return self.report.failed or bool(self.missing_records)

    def summary_lines(self) -> list[str]:
        """The fault summary as printed lines."""
        lines = [
            f"chaos run: {self.elapsed_s:.0f} s, {self.sent} updates sent, "
            f"{self.receipted} receipted, drained: {'yes' if self.drained else 'no'}",
            f"  topology: {self.topology}"
            + (
                f"; versions without a readable record: {self.missing_records[:10]}  <- FAILURE"
                if self.missing_records
                else ""
            ),
            "  phases: " + ", ".join(f"{name} {s:g} s" for name, s in self.phase_s.items()),
            "  safeties off: " + (", ".join(sorted(self.unsafe)) or "none"),
            "  crash points: " + (self.crash_at or "none"),
            "  faults injected:",
        ]
        for kind in FaultPlan.kinds():
            if self.faults[kind] or self.skipped[kind]:
                skipped = f" ({self.skipped[kind]} skipped)" if self.skipped[kind] else ""
                lines.append(f"    {kind:17} {self.faults[kind]:5d}{skipped}")
        lines.append("  exits (each followed by a restart):")
        for name, count in sorted(self.exits.items()):
            lines.append(f"    {name:24} {count:5d}")
        for failure in self.failures[:5]:
            lines.append(f"    e.g. {failure}")
        return lines

    def to_json(self) -> dict[str, object]:
        """The result as JSON-ready data."""
        return {
            "check": self.report.to_json(),
            "updates_in_logs": self.updates_in_logs,
            "faults": dict(self.faults),
            "skipped": dict(self.skipped),
            "exits": dict(self.exits),
            "failures": self.failures,
            "sent": self.sent,
            "receipted": self.receipted,
            "drained": self.drained,
            "elapsed_s": round(self.elapsed_s, 1),
            "phase_s": self.phase_s,
            "unsafe": sorted(self.unsafe),
            "crash_at": self.crash_at,
            "topology": self.topology,
            "missing_records": self.missing_records,
        }
