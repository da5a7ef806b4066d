"""The device SDK; imports protocol, never tiers or simulations, and nothing heavy on import.

Run a device from Python (``client.runner`` has the whole story)::

    import fedtier.client

    fedtier.client.run_device(
        config="device.toml",              # keys, broker, outbox (a device TOML)
        model="mypkg.models:make_model",   # "mlp", "logreg", a factory, an nn.Module, a Trainer
        data="data/train.csv",             # "mypkg.data:load", a Dataset, (X, y)
        label="quality",
        rounds=10,
    )

Anything that is not torch trains behind the ``Trainer`` protocol
(``layout``, ``train(params) -> TrainResult``, ``evaluate``). The names below
load their modules on first use, so ``import fedtier.client`` costs nothing
and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from fedtier.client.config import DeviceSettings as DeviceSettings
    from fedtier.client.config import load_device_settings as load_device_settings
    from fedtier.client.plugins import DataRequest as DataRequest
    from fedtier.client.plugins import Dataset as Dataset
    from fedtier.client.plugins import load_data as load_data
    from fedtier.client.plugins import load_model as load_model
    from fedtier.client.runner import run_device as run_device
    from fedtier.client.runner import run_device_async as run_device_async
    from fedtier.client.torch_trainer import TorchTrainer as TorchTrainer
    from fedtier.client.trainers import Trainer as Trainer
    from fedtier.client.trainers import TrainResult as TrainResult

__all__ = [
    "DataRequest",
    "Dataset",
    "DeviceSettings",
    "TorchTrainer",
    "TrainResult",
    "Trainer",
    "load_data",
    "load_device_settings",
    "load_model",
    "run_device",
    "run_device_async",
]

_HOMES: Final = {
    "DataRequest": "plugins",
    "Dataset": "plugins",
    "DeviceSettings": "config",
    "TorchTrainer": "torch_trainer",
    "TrainResult": "trainers",
    "Trainer": "trainers",
    "load_data": "plugins",
    "load_device_settings": "config",
    "load_model": "plugins",
    "run_device": "runner",
    "run_device_async": "runner",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedtier.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedtier.client.{home}"), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
