"""Model factories the shipped scenarios name (``model.factory``); imports torch, lazily.

Imports torch (inside the factory) and ``client.plugins`` for the ``Dataset``
type; never an engine, a tier or a bus. A factory here is an ordinary plug-in,
called exactly as a user's own ``"package.module:factory"`` would be:
keyword arguments from ``[model.args]``, plus ``dataset=`` (the data at hand,
to size the input and output layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtier.protocol.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fedtier.client.plugins import Dataset

__all__ = ["mlp"]


def mlp(*, dataset: Dataset, hidden: int = 64, batchnorm: bool = True) -> torch.nn.Module:
    """Linear - [BatchNorm1d] - ReLU - Linear: the BatchNorm study's model, with or without BN.

    Args:
        dataset: the data at hand: its features size the input, its classes
            the output (one output for regression).
        hidden: hidden units.
        batchnorm: put a ``BatchNorm1d`` between the first layer and the ReLU.
            Everything else is the same module, so with and without BatchNorm
            compare one change.

    Raises:
        ConfigError: ``hidden`` is not a positive integer.
    """
    import torch

    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ConfigError(f"model arg hidden is {hidden!r}; expected an integer >= 1")
    outputs = dataset.num_classes if dataset.num_classes is not None else 1
    layers: list[torch.nn.Module] = [torch.nn.Linear(dataset.num_features, hidden)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(hidden))
    layers += [torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)]
    return torch.nn.Sequential(*layers)
