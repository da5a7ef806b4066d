"""Simulated devices: the client's trainers, error feedback and codecs; never imports tiers or trio.

Imports numpy, protocol and client (and torch, lazily, for the mlp model);
never trio, a bus or a tier. One device run is what ``client.device`` does in
its worker thread (``_build_update``): train from the current model, take
``trained - base``, skip a non-finite delta, encode it (through
``ErrorFeedback`` when on), and seal a ``DeviceUpdate``. Trainers and
error-feedback residuals are created on a device's first run, so a 10,000-device
fleet costs memory only for the devices that actually train.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedtier.client.error_feedback import ErrorFeedback
from fedtier.client.trainers import NumpyLogRegTrainer, TorchTrainer, TrainResult, make_mlp
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import seal
from fedtier.protocol.errors import LocalProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import DeviceUpdate
from fedtier.simulations.sim.data import FederatedData
from fedtier.simulations.sim.nodes import SimKeys, identity_for
from fedtier.simulations.sim.scenario import TrainingSpec

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceRun", "LocalTraining", "update_id_for"]

FLEET = "sim"
# Signed messages carry a wall time; the simulator puts virtual time after this epoch.
EPOCH_MS = 1_764_288_000_000

Trainer = NumpyLogRegTrainer | TorchTrainer


def update_id_for(seed: int, device: int, run: int) -> bytes:
    """A reproducible 16-byte update id, unique per (seed, device, run)."""
    return hashlib.blake2b(f"{seed}/{device}/{run}".encode(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class DeviceRun:
    """One finished local run, sealed as the device would send it.

    Attributes:
        envelope: the signed ``DeviceUpdate`` bytes (what crosses the uplink).
        payload_bytes: the codec payload's size (values and indices).
        train_loss: the mean training loss the trainer reported.
    """

    envelope: bytes
    payload_bytes: int
    train_loss: float


class LocalTraining:
    """Every simulated device's trainer, error feedback and identity, created on first use.

    Args:
        spec: the scenario's local training.
        data: the devices' data.
        codec: the devices' codec name.
        error_feedback: carry each device's compression residual.
        seed: the run's seed (trainer shuffles, identities, update ids).
    """

    def __init__(
        self,
        spec: TrainingSpec,
        data: FederatedData,
        *,
        codec: str,
        error_feedback: bool,
        seed: int,
    ) -> None:
        self.spec = spec
        self.data = data
        self.seed = seed
        self._module: torch.nn.Module | None = None
        self.evaluator = self._make_trainer(data.X_test, data.y_test, seed=0)
        self.layout: ModelLayout = self.evaluator.layout
        self.initial_params: npt.NDArray[np.float32] = self.evaluator.initial_params()
        self.codec = CodecSpec.parse(codec, num_params=self.layout.num_params)
        self.error_feedback = error_feedback
        self._trainers: dict[int, Trainer] = {}
        self._feedback: dict[int, ErrorFeedback] = {}
        self._identities: dict[int, SigningIdentity] = {}
        self.keys = SimKeys()
        """Every device's public key, registered as its identity is made (nodes verify with it)."""
        self._runs: dict[int, int] = {}

    @property
    def model_bytes(self) -> int:
        """Size of a model download (float32 values)."""
        return 4 * self.layout.num_params

    def steps_per_epoch(self, device: int) -> int:
        """Local SGD steps in one pass over ``device``'s data."""
        return -(-int(self.data.samples[device]) // self.spec.batch_size)

    def _make_trainer(
        self, X: npt.NDArray[np.float32], y: npt.NDArray[np.int64], *, seed: int
    ) -> Trainer:
        spec = self.spec
        if spec.model == "logreg":
            return NumpyLogRegTrainer(
                self.data.num_features,
                self.data.num_classes,
                X,
                y,
                epochs=spec.local_epochs,
                batch_size=spec.batch_size,
                lr=spec.lr,
                mu=spec.mu,
                seed=seed,
            )
        if self._module is None:
            # One module for every device: a TorchTrainer loads the parameters it is
            # given before each run, and the simulator runs one device at a time.
            self._module = make_mlp(
                self.data.num_features, spec.hidden, self.data.num_classes, seed=self.seed
            )
        return TorchTrainer(
            self._module,
            X,
            y,
            epochs=spec.local_epochs,
            batch_size=spec.batch_size,
            lr=spec.lr,
            momentum=spec.momentum,
            mu=spec.mu,
            seed=seed,
        )

    def trainer(self, device: int) -> Trainer:
        """``device``'s trainer (created on first use, seeded from the run seed)."""
        trainer = self._trainers.get(device)
        if trainer is None:
            seed = int.from_bytes(update_id_for(self.seed, device, -1)[:4], "little")
            trainer = self._make_trainer(
                self.data.X_train[device], self.data.y_train[device], seed=seed
            )
            self._trainers[device] = trainer
        return trainer

    def identity(self, device: int) -> SigningIdentity:
        """``device``'s signing identity."""
        identity = self._identities.get(device)
        if identity is None:
            identity = self.keys.register(identity_for(f"device-{device}", self.seed))
            self._identities[device] = identity
        return identity

    def run(
        self,
        device: int,
        params: npt.NDArray[np.float32],
        base_version: int,
        *,
        max_steps: int | None = None,
        now_s: float = 0.0,
    ) -> DeviceRun | None:
        """Train ``device`` from ``params`` and seal its update.

        Args:
            device: the device index.
            params: the model it trains from (not modified).
            base_version: that model's version.
            max_steps: cap on local steps (a straggler's partial work).
            now_s: virtual time, for the message's ``created_ms``.

        Returns:
            The sealed run, or None when the delta is not finite or out of the
            codec's range (the device skips such a run).
        """
        trainer = self.trainer(device)
        result: TrainResult = trainer.train(params, max_steps=max_steps)
        delta = np.subtract(result.params, params, dtype=np.float32)
        if not bool(np.isfinite(delta).all()):
            return None
        try:
            if self.error_feedback:
                feedback = self._feedback.get(device)
                if feedback is None:
                    feedback = self._feedback[device] = ErrorFeedback(self.layout.num_params)
                payload = feedback.encode(delta, self.codec)
            else:
                payload = encode(delta, self.codec)
        except LocalProtocolError:
            return None
        run = self._runs.get(device, 0) + 1
        self._runs[device] = run
        identity = self.identity(device)
        message = DeviceUpdate(
            fleet=FLEET,
            sender=identity.key_id,
            seq=run,
            created_ms=EPOCH_MS + math.floor(now_s * 1000),
            update_id=update_id_for(self.seed, device, run),
            base_version=base_version,
            layout=self.layout.fingerprint,
            num_params=self.layout.num_params,
            n_samples=result.n_samples,
            codec=self.codec,
        )
        loss = result.metrics.get("loss", math.nan)
        return DeviceRun(seal(message, payload, identity), len(payload), loss)

    def evaluate(
        self, params: npt.NDArray[np.float32], X: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
    ) -> dict[str, float]:
        """Loss and accuracy of ``params`` on ``(X, y)`` (the trainers' own evaluation)."""
        return self.evaluator.evaluate(params, X, y)
