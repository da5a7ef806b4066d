"""The sans-IO tier core: admission, the open buffer, the cut of a partial, sealing a version.

Bytes, ``now`` and what the tier has seen go in; decisions, partials and model
versions come out. Nothing here imports trio, sqlite, OpenTelemetry, logging or
a clock (``tests/unit/test_import_rules.py`` checks it), in the manner of h11.
The edge, regional and central daemons (``fedtier.tiers.edge`` ...) wrap this
core with the state store, acknowledgements, receipts and spans; the simulator
(``fedtier.simulations.sim``) and ``fedtier.tiers.testing`` call it directly, so
there is one admission and one cut.
"""

from __future__ import annotations

from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.core._admission import (
    AcceptedInput,
    AdmissionRules,
    Decision,
    ModelView,
    NothingSeen,
    Outcome,
    SeenInputs,
    SenderKeys,
    admit_partial,
    admit_update,
    check_payload,
)
from fedtier.tiers.core._bounds import F32_SAFE, fold_bound, max_abs
from fedtier.tiers.core._buffer import HIST_BUCKETS, BufferedInput, TierBuffer, fold_message
from fedtier.tiers.core._capacity import MESSAGE_OVERHEAD, check_fits, partial_envelope_bound
from fedtier.tiers.core._cut import (
    MODEL_CODEC,
    RobustCut,
    SealedVersion,
    build_partial,
    robust_cut,
    seal_version,
    step_model,
)
from fedtier.tiers.core._influence import (
    DEFAULT_BURST,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_MAX_UPDATES_PER_VERSION,
    DEFAULT_RATE_PER_S,
    DEFAULT_WARMUP_NORM,
    AdaptiveNorm,
    ContributionCounter,
    DeclaredCaps,
    InfluenceRules,
    InfluenceState,
    NormBound,
    TokenBuckets,
    capped_weight,
    declared_default,
)
from fedtier.tiers.core._reputation import (
    DEFAULT_SKETCH_DIM,
    Reputation,
    ReputationRules,
    sketch,
)
from fedtier.tiers.core._robust import (
    OUTLIER_SCORES,
    ROBUST_RULES,
    OutlierScore,
    RobustDecision,
    RobustRule,
    RobustRules,
    decide_outliers,
    robust_mean,
)

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_MAX_UPDATES_PER_VERSION",
    "DEFAULT_RATE_PER_S",
    "DEFAULT_SKETCH_DIM",
    "DEFAULT_WARMUP_NORM",
    "F32_SAFE",
    "HIST_BUCKETS",
    "MESSAGE_OVERHEAD",
    "MODEL_CODEC",
    "OUTLIER_SCORES",
    "ROBUST_RULES",
    "AcceptedInput",
    "Accumulator",
    "AdaptiveNorm",
    "AdmissionRules",
    "BufferedInput",
    "ContributionCounter",
    "Decision",
    "DeclaredCaps",
    "InfluenceRules",
    "InfluenceState",
    "ModelView",
    "NormBound",
    "NothingSeen",
    "Outcome",
    "OutlierScore",
    "Reputation",
    "ReputationRules",
    "RobustCut",
    "RobustDecision",
    "RobustRule",
    "RobustRules",
    "SealedVersion",
    "SeenInputs",
    "SenderKeys",
    "TierBuffer",
    "TokenBuckets",
    "admit_partial",
    "admit_update",
    "build_partial",
    "capped_weight",
    "check_fits",
    "check_payload",
    "decide_outliers",
    "declared_default",
    "fold_bound",
    "fold_message",
    "max_abs",
    "partial_envelope_bound",
    "robust_cut",
    "robust_mean",
    "seal_version",
    "sketch",
    "step_model",
]
