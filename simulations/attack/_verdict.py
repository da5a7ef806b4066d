"""What an attack run found and whether the defences held; must not import trio or a bus.

``judge`` turns the attackers' receipts, what the edges stored and quarantined,
the central's lineage and the exactly-once checker's report into one
``AttackResult``. The rule per attack is ``_plan.EXPECTED``; what "accepted"
may mean for each is stated there and in docs/attacks.md.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from fedtier.protocol.errors import Reason
from fedtier.simulations.attack._plan import EXPECTED, TIER_EXPECTED, AttackOptions
from fedtier.simulations.checker import CheckReport, render_report

__all__ = ["BROKER_REFUSED", "AttackResult", "Outcome", "StoredInput", "judge"]

_TYPED: frozenset[str] = frozenset(r.value for r in Reason)
BROKER_REFUSED: Final = "refused_by_broker"
"""An ``Outcome.status``: the broker's ACL refused the publish (TLS mesh)."""
_NORM_SLACK = 1.0 + 1e-4  # f32 rounding of a clipped delta


@dataclass(slots=True)
class Outcome:
    """The edge's answer to one hostile input.

    Attributes:
        attack: its name in ``ATTACKS`` (``setup``: an honest-sized update an
            attacker sent to have one to replay).
        device: the attacker's device name.
        update_id: the id it carried (hex), None for bytes without one.
        status: ``accepted``, ``duplicate``, ``rejected``, ``no_receipt``, or
            ``refused_by_broker`` (the broker's ACL refused the publish with
            PUBACK "Not authorized"; nothing reached an edge).
        reason: the receipt's reason token ("" when accepted).
        norm: L2 norm of the delta as sent (0 for envelopes without one).
        allowance: for an input of a flood, how many of that flood the token
            bucket may accept.
        batch: which flood of its device it belongs to.
    """

    attack: str
    device: str
    update_id: str | None
    status: str
    reason: str
    norm: float
    allowance: float | None = None
    batch: int = 0

    @property
    def accepted(self) -> bool:
        """True when the edge accepted it (a duplicate was accepted earlier)."""
        return self.status == "accepted"


@dataclass(frozen=True, slots=True)
class StoredInput:
    """What an edge stored for an accepted update: the weight and clip it is folded with."""

    edge: str
    weight: float
    clip_scale: float


@dataclass(slots=True)
class AttackResult:
    """The verdict of one attack run.

    Attributes:
        report: the exactly-once checker on the honest devices' updates.
        updates_in_logs: honest update ids in the device logs.
        honest_accepted: honest updates with an accepted receipt.
        outcomes: every hostile input's answer.
        effects: per accepted hostile update (hex id), the influence it kept:
            weight, clip scale, effective norm, and where it ended (``counted``
            or ``quarantined:<reason>``).
        failures: every broken guarantee, one sentence each.
        crashes: daemons or fleets that exited without being asked.
        drained: every receipted update was counted before the daemons stopped.
        elapsed_s: wall time of the run.
        devices, attackers: the run's size.
        model_version: the central's newest version at the end (its
            parameters are checked finite).
        blob: the tampered model blob: the edge that met it, its version,
            whether the edge skipped it and the newest version it served after.
    """

    report: CheckReport
    updates_in_logs: int
    honest_accepted: int
    outcomes: list[Outcome]
    effects: dict[str, dict[str, object]]
    failures: list[str]
    crashes: list[str]
    drained: bool
    elapsed_s: float
    devices: int
    attackers: int
    model_version: int
    blob: dict[str, object] | None = None
    counts: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """True when any guarantee broke (see ``failures``, ``crashes``, the checker)."""
        return bool(self.failures or self.crashes or self.report.failed or not self.drained)

    def summary_lines(self) -> list[str]:
        """The verdict as printed lines: the checker, then the attacks."""
        lines = render_report(self.report, self.updates_in_logs)
        lines.append(
            f"attack run: {self.elapsed_s:.0f} s, {self.devices} honest devices, "
            f"{self.attackers} attackers, {self.honest_accepted} honest updates accepted, "
            f"{len(self.outcomes)} hostile inputs, model v{self.model_version}, "
            f"drained: {'yes' if self.drained else 'no'}"
        )
        lines.append("  attack                      expect       answers (status:reason x count)")
        for attack, counts in self.counts.items():
            answers = ", ".join(f"{key} x{n}" for key, n in sorted(counts.items()))
            expect: str = EXPECTED.get(attack) or TIER_EXPECTED.get(attack) or "-"
            lines.append(f"    {attack:26} {expect:12} {answers}")
        lines.append(f"  accepted hostile updates: {len(self.effects)}")
        for uid, effect in list(self.effects.items())[:8]:
            lines.append(f"    {uid[:12]} {effect}")
        if self.blob is not None:
            lines.append(f"  tampered model blob: {self.blob}")
        lines.append(f"  daemon or fleet crashes: {len(self.crashes)}")
        lines.extend(f"    {crash}" for crash in self.crashes[:5])
        lines.append(f"  broken guarantees: {len(self.failures)}")
        lines.extend(f"    {failure}" for failure in self.failures[:20])
        lines.append("verdict: " + ("FAILED" if self.failed else "every defence held"))
        return lines

    def to_json(self) -> dict[str, object]:
        """The result as JSON-ready data."""
        return {
            "check": self.report.to_json(),
            "updates_in_logs": self.updates_in_logs,
            "honest_accepted": self.honest_accepted,
            "devices": self.devices,
            "attackers": self.attackers,
            "model_version": self.model_version,
            "blob": self.blob,
            "hostile_inputs": len(self.outcomes),
            "counts": {attack: dict(c) for attack, c in self.counts.items()},
            "effects": self.effects,
            "failures": self.failures,
            "crashes": self.crashes,
            "drained": self.drained,
            "elapsed_s": round(self.elapsed_s, 1),
            "failed": self.failed,
        }


def judge(
    options: AttackOptions,
    outcomes: Sequence[Outcome],
    *,
    report: CheckReport,
    updates_in_logs: int,
    honest_accepted: int,
    attacker_counted: Mapping[str, int],
    stored: Mapping[str, StoredInput],
    quarantined: Mapping[str, str],
    crashes: list[str],
    blob: Mapping[str, object] | None,
    model: tuple[int, bool],
    drained: bool,
    elapsed_s: float,
) -> AttackResult:
    """Apply ``EXPECTED`` to every outcome and the fate rules to every accepted one."""
    failures: list[str] = []
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    effects: dict[str, dict[str, object]] = {}
    for outcome in outcomes:
        if outcome.attack in TIER_EXPECTED:
            problem = _partial_problem(outcome, quarantined)
            where = quarantined.get(outcome.update_id or "")
            counts[outcome.attack]["folded" if where is None else f"quarantined:{where}"] += 1
            if problem:
                failures.append(f"{outcome.attack} from {outcome.device}: {problem}")
            continue
        counts[outcome.attack][f"{outcome.status}:{outcome.reason or '-'}"] += 1
        problem = _answer_problem(outcome)
        if problem:
            failures.append(f"{outcome.attack} from {outcome.device}: {problem}")
        if outcome.accepted and outcome.update_id is not None:
            effect, problem = _fate(options, outcome, attacker_counted, stored, quarantined)
            effects[outcome.update_id] = effect
            if problem:
                failures.append(f"{outcome.attack} {outcome.update_id[:12]}: {problem}")
    failures.extend(_flood_problems(outcomes))
    version, finite = model
    if blob is not None:
        tampered = blob["tampered_version"]
        served = blob["served_after"]
        assert isinstance(tampered, int)
        assert isinstance(served, int)
        if not blob["skipped"]:
            failures.append(f"{blob['edge']} never reported skipping the tampered v{tampered}")
        if served <= tampered:
            failures.append(f"{blob['edge']} served no model after the tampered v{tampered}")
    if not finite:
        failures.append(f"the central's newest model v{version} holds inf or NaN")
    planned = set(EXPECTED) | (set(TIER_EXPECTED) if options.tier_attacks else set())
    missing = sorted(planned - counts.keys())
    if missing:
        failures.append(f"attacks that never ran: {', '.join(missing)}")
    return AttackResult(
        report=report,
        updates_in_logs=updates_in_logs,
        honest_accepted=honest_accepted,
        outcomes=list(outcomes),
        effects=effects,
        failures=failures,
        crashes=crashes,
        drained=drained,
        elapsed_s=elapsed_s,
        devices=options.devices,
        attackers=options.attackers,
        model_version=version,
        blob=None if blob is None else dict(blob),
        counts=dict(counts),
    )


def _partial_problem(outcome: Outcome, quarantined: Mapping[str, str]) -> str | None:
    """Why the regional's handling of a hostile partial breaks its rule, or None."""
    reason = quarantined.get(outcome.update_id or "")
    if reason is not None and reason not in _TYPED:
        return f"quarantined with an untyped reason {reason!r}"
    if reason is None and TIER_EXPECTED[outcome.attack] == "quarantined":
        return "not quarantined"
    return None


def _answer_problem(outcome: Outcome) -> str | None:
    """Why the edge's answer breaks the attack's rule, or None."""
    if outcome.status == "no_receipt":
        return "no receipt within the timeout"
    if outcome.status == BROKER_REFUSED:
        # A typed refusal one step earlier: MQTT reason code 0x87, nothing routed.
        return None if EXPECTED.get(outcome.attack) == "rejected" else "refused by the broker"
    if outcome.status == "rejected":
        if outcome.reason not in _TYPED:
            return f"rejected with an untyped reason {outcome.reason!r}"
        return None
    expect = EXPECTED.get(outcome.attack)
    if outcome.status == "accepted" and expect in ("bounded", "flood", None):
        return None  # bounded: checked against the store in _fate
    if outcome.status == "duplicate" and expect == "duplicate":
        return None
    return f"{outcome.status} (expected {expect})"


def _fate(
    options: AttackOptions,
    outcome: Outcome,
    counted: Mapping[str, int],
    stored: Mapping[str, StoredInput],
    quarantined: Mapping[str, str],
) -> tuple[dict[str, object], str | None]:
    """What became of an accepted hostile update, and why that is wrong, if it is."""
    uid = outcome.update_id
    assert uid is not None
    times = counted.get(uid, 0)
    effect: dict[str, object] = {"attack": outcome.attack, "counted": times}
    if uid in quarantined:
        effect["quarantined"] = quarantined[uid]
    input_ = stored.get(uid)
    if input_ is None:
        return effect, "accepted, but no edge stored it"
    effective = outcome.norm * input_.clip_scale
    effect.update(
        weight=input_.weight, clip_scale=input_.clip_scale, effective_norm=round(effective, 4)
    )
    if input_.weight > options.max_samples:
        return effect, f"folded with weight {input_.weight:g} > max_samples {options.max_samples}"
    if effective > options.max_norm * _NORM_SLACK:
        return effect, f"folded with norm {effective:g} > the bound {options.max_norm:g}"
    if times > 1:
        return effect, f"counted {times} times"
    if times == 0 and uid not in quarantined:
        return effect, "accepted, then neither counted nor quarantined"
    return effect, None


def _flood_problems(outcomes: Sequence[Outcome]) -> list[str]:
    problems: list[str] = []
    floods: dict[tuple[str, int], list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        if outcome.attack == "flood":
            floods[outcome.device, outcome.batch].append(outcome)
    for (device, _), sent in floods.items():
        allowance = sent[-1].allowance
        accepted = sum(1 for o in sent if o.accepted)
        limited = sum(1 for o in sent if o.reason == Reason.RATE_LIMITED)
        if allowance is not None and accepted > allowance + 1:
            problems.append(
                f"flood from {device}: {accepted} accepted, over the bucket's {allowance:.1f}"
            )
        if limited == 0:
            problems.append(f"flood from {device}: no rate_limited receipt")
    return problems
