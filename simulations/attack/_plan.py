"""What an attack run does: the attack names, what each must end as, and the options; no I/O.

Imported by every other module of the package; imports nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from fedtier.protocol.errors import ConfigError

__all__ = ["ATTACKS", "EXPECTED", "TIER_EXPECTED", "AttackOptions", "Expect", "TierExpect"]

Expect = Literal["bounded", "rejected", "duplicate", "flood"]
"""What the defences must make of one attack's input.

* ``bounded``: accepted only with its influence bounded (the stored weight is at
  most ``max_samples``, the stored clip brings its norm under the edge's
  bound), or refused with a typed reason; an accepted one must then be counted
  exactly once or quarantined with a reason.
* ``rejected``: a rejected receipt with a typed reason, never accepted.
* ``duplicate``: a ``duplicate`` receipt (counted once already) or a typed
  rejection, never accepted a second time.
* ``flood``: at most ``burst`` + ``rate_per_s`` x elapsed accepted, the rest
  ``rate_limited`` (or another typed reason).
"""

EXPECTED: Final[Mapping[str, Expect]] = {
    # Signed by a registered device, with valid envelopes.
    "weight_inflation": "bounded",  # n_samples = 2**63-1
    "scaling": "bounded",  # delta x 1e6
    "sign_flip": "bounded",  # -10 x an honest-sized delta
    "future_base": "rejected",  # base_version = current + 1000
    "future_base_max": "rejected",  # base_version = 2**63-1
    "replay_id": "duplicate",  # an accepted update id again, with a new seq
    "replay_seq": "rejected",  # a new update id with an already used seq
    "other_topic": "rejected",  # signed by the attacker, published on another device's topic
    "forged_signature": "rejected",  # the signature's last bit flipped
    "garbage": "rejected",  # random bytes
    "oversized": "rejected",  # a header over max_header_bytes
    "deep_nesting": "rejected",  # 100,000 nested arrays
    "wide_nesting": "rejected",  # a 4 MiB array of empty arrays (within max_header_bytes)
    "flood": "flood",  # 3 x burst updates back to back
}
ATTACKS: Final = tuple(EXPECTED)

TierExpect = Literal["quarantined", "contained"]
"""What the regional must make of a hostile partial from a registered edge key.

* ``quarantined``: stored in its quarantine table with a typed reason.
* ``contained``: quarantined with a typed reason, or folded; either way every
  daemon keeps running and no honest update is lost.
"""

TIER_EXPECTED: Final[Mapping[str, TierExpect]] = {
    "partial_repeated_inputs": "quarantined",  # one input id twice: no id derives
    "partial_huge_sample_count": "contained",  # sample_count 1e308 each: over the weight cap
    "partial_leaf_counted_twice": "quarantined",  # a leaf already counted via another input
}


@dataclass(frozen=True, slots=True)
class AttackOptions:
    """One attack run.

    Attributes:
        out_dir: artefacts (process logs, device logs, ``attack.json``).
        devices: honest devices (fleet processes, training).
        attackers: attacker devices; each holds a registered device key and
            runs its share of ``ATTACKS`` (every attack runs at least once,
            round-robin over the attackers, ``rounds`` times).
        regions: region -> sites (one edge per site).
        updates: accepted honest updates to wait for before the drain.
        rounds: how many times the list of attacks is run.
        seed: seeds keys' order, data split, honest behaviour and attack bytes.
        max_samples: the edges' cap on one update's weight.
        rate_per_s, burst: the edges' per-device token bucket.
        max_updates_per_version: the edges' per-device contribution cap.
        max_norm: the edges' warm-up norm bound (adaptive afterwards).
        norm_warmup: accepted norms an edge needs before its adaptive bound
            holds; the attacks start once the fleet had this many accepted per
            site, so they meet the adaptive bound, not the warm-up one.
        updates_per_s: the honest fleet's target update rate.
        receipt_timeout_s: how long an attacker waits for the edge's answer.
        max_run_s: bound on the run phase.
        drain_timeout_s: bound on the drain.
        tier_attacks: also send hostile partials signed by a registered edge key.
        tls: run the brokers as ``deploy/`` does: TLS with a client certificate
            per device and daemon, Mosquitto with the deployed ACL (an attacker
            publishing on another device's topic is refused by the broker).
        keep_workdir: keep keys, configs and stores.
        progress: called with a line now and then (None: quiet).
    """

    out_dir: Path
    devices: int = 12
    attackers: int = 2
    regions: tuple[tuple[str, tuple[str, ...]], ...] = (("r1", ("s1", "s2")),)
    updates: int = 40
    rounds: int = 1
    seed: int = 0
    max_samples: int = 200
    rate_per_s: float = 2.0
    burst: float = 4.0
    max_updates_per_version: int = 8
    max_norm: float = 100.0
    norm_warmup: int = 16
    updates_per_s: float = 6.0
    receipt_timeout_s: float = 15.0
    max_run_s: float = 300.0
    drain_timeout_s: float = 60.0
    tier_attacks: bool = True
    tls: bool = True
    keep_workdir: bool = False
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.attackers < 1 or self.devices < 1 or self.rounds < 1:
            raise ConfigError("--devices, --attackers and --rounds must be at least 1")
