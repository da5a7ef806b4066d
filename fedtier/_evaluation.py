"""The central's evaluator, built from ``[evaluation]`` with the client's models; never the lab.

The composition root's one job here: ``fedtier.tiers`` defines what an
evaluator is (``tiers.central.ModelEvaluator``) and when it runs, and
``fedtier.client.evaluation`` knows models and data; this module joins them
for ``fedtier central`` so that tiers never import the client. Everything
heavy is imported when the central starts, not when ``fedtier`` parses its
arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtier.protocol.errors import ConfigError, LayoutMismatch

if TYPE_CHECKING:
    from fedtier.protocol.layout import ModelLayout
    from fedtier.tiers.central import ModelEvaluator
    from fedtier.tiers.config import CentralConfig, TierConfig

__all__ = ["build_evaluator", "central_layout"]


def central_layout(config: CentralConfig) -> ModelLayout:
    """The layout of the central's model: its newest stored version's, else the initial file's.

    Raises:
        ConfigError: neither can be read.
    """
    from fedtier.protocol.envelope import parse_envelope
    from fedtier.protocol.messages import ModelBlob
    from fedtier.tiers.config import load_initial_model
    from fedtier.tiers.store import read_latest_version

    if config.store_path.is_file():
        latest = read_latest_version(config.store_path)
        if latest is not None:
            blob = parse_envelope(latest.record.blob, config.limits).message
            if isinstance(blob, ModelBlob):
                return blob.tensors
    return load_initial_model(config.initial_model)[0]


def build_evaluator(config: TierConfig) -> ModelEvaluator | None:
    """The evaluator ``config``'s ``[evaluation]`` names, or None (not a central, or no table).

    The held-out data is read and the model built now, before the central
    starts, so a wrong path or a model that does not fit the central's layout
    stops ``fedtier central`` with one sentence instead of failing every
    evaluation.

    Raises:
        ConfigError: the data, the model or the metrics cannot be used.
    """
    from fedtier.tiers.config import CentralConfig

    if not isinstance(config, CentralConfig) or config.evaluation is None:
        return None
    from fedtier.client.evaluation import make_evaluator

    settings = config.evaluation
    layout = central_layout(config)
    try:
        return make_evaluator(
            settings.model,
            settings.data,
            args=settings.args,
            data_args=settings.data_args,
            label=settings.label,
            task=settings.task,
            metrics=settings.metrics,
            base_dir=settings.base_dir,
            layout=layout,
        )
    except ConfigError as exc:
        raise ConfigError(f"[evaluation]: {exc}") from exc
    except LayoutMismatch as exc:
        raise ConfigError(
            f"[evaluation] model {settings.model!r} does not fit the central's model: {exc}"
        ) from exc
