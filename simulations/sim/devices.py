"""Simulated devices: the client's trainers, error feedback and codecs; never imports tiers or trio.

Imports numpy, protocol and client (``client.plugins`` builds the model a
scenario names; torch lazily, for torch models); never trio, a bus or a tier.
One device run is what ``client.device`` does in its worker thread
(``_build_update``): train from the current model, take ``trained - base``,
skip a non-finite delta, encode it (through ``ErrorFeedback`` when on), and
seal a ``DeviceUpdate``. Trainers and error-feedback residuals are created on
a device's first run, so a 10,000-device fleet costs memory only for the
devices that actually train.

The model is built once from ``[model]`` (``client.plugins.load_model``, with
torch's RNG seeded from the run's seed so the start is reproducible), and
trained by ``client.torch_trainer.TorchTrainer`` with the scenario's ``[training]``
options: the same trainer, layout rule (``client.torch_state.layout_for_module``)
and FedBN policy as a real device. When nothing stays local every device trains
the same module in turn (the trainer reloads the global parameters before each
run); when tensors stay local (BatchNorm under ``batchnorm = "local"``, or
``model.local``) each device gets its own copy of the module, so its local
tensors persist across its runs as on a real device. A factory that returns a
``Trainer`` of its own (anything not torch) is called once per device with
``dataset=`` that device's data.

**Malicious devices.** With ``[attack]`` the engine sets :attr:`LocalTraining.attack`:
a malicious device trains as above (on poisoned data for a backdoor, from the
initial model for a stale rollback), ``simulations.sim._attack`` turns its result
into the vector, weight and base version it lies with, and it seals them with its
own registered key like any honest update (``burst`` copies under their own seqs).

**Scoring a model with local tensors.** There is no single global model then:
each device runs the global tensors with its own local ones. The simulator
scores every test example with the model of the device it was held out from
(``holdout = "device"`` or ``"loader"``), which is how FedBN is evaluated; with
a test set held out of the whole data, it scores every device's model on all
of it and weights them by their training examples. A device that has not
trained yet holds the factory's initial local tensors.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import numpy as np
import numpy.typing as npt

from fedtier.client.error_feedback import ErrorFeedback
from fedtier.client.plugins import Dataset, load_model, load_object
from fedtier.client.torch_trainer import TorchTrainer
from fedtier.client.trainers import NumpyLogRegTrainer, Trainer, TrainResult
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import seal
from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import DeviceUpdate
from fedtier.simulations.sim._attack import AttackPlan
from fedtier.simulations.sim.data import FederatedData, Labels, device_name
from fedtier.simulations.sim.nodes import SimKeys, identity_for
from fedtier.simulations.sim.specs import ModelSpec, TrainingSpec

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceRun", "LocalTraining", "update_id_for"]

FLEET = "sim"
# Signed messages carry a wall time; the simulator puts virtual time after this epoch.
EPOCH_MS = 1_764_288_000_000
# The metrics a scoring reports, by task (``loss`` always comes first).
_SCORES: Final = {"classification": ("accuracy",), "regression": ("mse", "r2")}


class _Trains(Protocol):
    """What the simulator needs of a trainer (``client.trainers.Trainer`` and the built-ins)."""

    @property
    def layout(self) -> ModelLayout: ...

    def train(self, params: npt.NDArray[np.float32]) -> TrainResult: ...

    def evaluate(
        self, params: npt.NDArray[np.float32], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> dict[str, float]: ...


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
        extra: more updates sent in the same arrival (a malicious device's
            ``burst``: the same vector under other update ids and seqs).
    """

    envelope: bytes
    payload_bytes: int
    train_loss: float
    extra: tuple[bytes, ...] = ()


class LocalTraining:
    """Every simulated device's trainer, error feedback and identity, created on first use.

    Args:
        model: the scenario's model.
        spec: the scenario's local training.
        data: the devices' data.
        codec: the devices' codec name.
        error_feedback: carry each device's compression residual.
        seed: the run's seed (model initialisation, trainer shuffles,
            identities, update ids).

    Raises:
        ConfigError: the model cannot be built or trained on this data.
    """

    def __init__(
        self,
        model: ModelSpec,
        spec: TrainingSpec,
        data: FederatedData,
        *,
        codec: str,
        error_feedback: bool,
        seed: int,
    ) -> None:
        self.model = model
        self.spec = spec
        self.data = data
        self.seed = seed
        self._loss: Callable[..., Any] | str | None = None
        if spec.loss not in ("auto",):
            self._loss = spec.loss
            if spec.loss not in ("cross_entropy", "mse"):
                self._loss = cast("Callable[..., Any]", load_object(spec.loss, what="loss"))
        # The module every device starts from (torch), or None: the built-in
        # logreg, or a factory that returns its own Trainer per device.
        self._prototype: torch.nn.Module | None = None
        self._shared: torch.nn.Module | None = None
        self._trainer_factory = False
        self.evaluator: _Trains = self._make_evaluator()
        self.layout: ModelLayout = self.evaluator.layout
        self.initial_params: npt.NDArray[np.float32] = self._initial_params()
        self.local_tensors = self._local_tensors()
        """The model's tensors that stay on the devices (sorted ``state_dict`` names)."""
        self.personal = bool(self.local_tensors)
        """Whether tensors stay on the devices (so each device has its own model)."""
        self.codec = CodecSpec.parse(codec, num_params=self.layout.num_params)
        self.error_feedback = error_feedback
        self._trainers: dict[int, _Trains] = {}
        self._feedback: dict[int, ErrorFeedback] = {}
        # Each device's identity and key id, made on its first run: deriving an
        # Ed25519 key costs more than a run's signature, and the key id is a hash.
        self._identities: dict[int, tuple[SigningIdentity, str]] = {}
        self._new_keys: list[bytes] = []
        self.keys = SimKeys()
        """Every device's public key, registered as its identity is made (nodes verify with it)."""
        self._runs: dict[int, int] = {}
        self.attack: AttackPlan | None = None
        """``[attack]``'s plan: which devices lie and what they send (None: all honest)."""
        self._poisoned: dict[int, _Trains] = {}

    # -- building ------------------------------------------------------------------

    @property
    def forkable(self) -> bool:
        """Whether device runs may go to forked workers: a built-in numpy model, nothing local."""
        return self._prototype is None and not self._trainer_factory and not self.personal

    @property
    def model_bytes(self) -> int:
        """Size of a model download (float32 values)."""
        return 4 * self.layout.num_params

    def steps_per_epoch(self, device: int) -> int:
        """Local steps in one pass over ``device``'s data."""
        return -(-int(self.data.samples[device]) // self.spec.batch_size)

    def _dataset(self, X: npt.NDArray[np.float32], y: Labels) -> Dataset:
        return Dataset(
            X, y, task=self.data.task, name=self.data.name, num_classes=self.data.num_classes
        )

    def _build(self, dataset: Dataset) -> object:
        """What the factory returns for ``dataset``, with torch's RNG seeded from the run."""
        m = self.model
        args = dict(m.args)
        if m.factory == "mlp":
            args.setdefault("seed", self.seed)
        if not m.is_torch or m.factory == "mlp":
            return load_model(m.factory, args=args, dataset=dataset)
        try:
            import torch
        except ImportError:
            return load_model(m.factory, args=args, dataset=dataset)
        # A factory initialises from torch's global RNG: seed it, and leave the
        # caller's RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return load_model(m.factory, args=args, dataset=dataset)

    def _make_evaluator(self) -> _Trains:
        data, spec = self.data, self.spec
        if self.model.factory == "logreg":
            if data.task != "classification" or data.num_classes is None:
                raise ConfigError(
                    f"model logreg classifies; {data.name!r} is a regression task (use "
                    "model.factory = 'mlp' or a torch factory)"
                )
            if data.X_test.ndim != 2:
                raise ConfigError(
                    f"model logreg needs 2-D features; the data has {data.X_test.shape}"
                )
            return self._logreg(data.X_test, data.y_test, seed=0)
        built = self._build(self._dataset(data.X_test, data.y_test))
        if isinstance(built, Trainer):
            self._trainer_factory = True
            return built
        module = cast("torch.nn.Module", built)
        if self._loss is None and spec.loss == "auto" and data.task == "regression":
            self._check_regression_outputs(module)
        # The evaluator's module is the one every device starts from: keep a copy
        # before anything loads parameters into it.
        self._prototype = copy.deepcopy(module)
        return self._torch(module, None, None, seed=0)

    def _check_regression_outputs(self, module: torch.nn.Module) -> None:
        import torch

        with torch.no_grad():
            was_training = module.training
            module.eval()
            out = module(torch.from_numpy(np.ascontiguousarray(self.data.X_test[:2])))
            module.train(was_training)
        if out.ndim > 2 or (out.ndim == 2 and out.shape[1] != 1):
            raise ConfigError(
                f"{self.data.name!r} is a regression task but the model has outputs of shape "
                f"{tuple(out.shape[1:])}; give it one output (or set training.loss)"
            )

    def _logreg(self, X: npt.NDArray[np.float32], y: Labels, *, seed: int) -> NumpyLogRegTrainer:
        assert self.data.num_classes is not None
        spec = self.spec
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

    def _torch(
        self,
        module: torch.nn.Module,
        X: npt.NDArray[np.float32] | None,
        y: Labels | None,
        *,
        seed: int,
    ) -> TorchTrainer:
        spec, model = self.spec, self.model
        try:
            return TorchTrainer(
                module,
                X,
                y,
                epochs=spec.local_epochs,
                batch_size=spec.batch_size,
                lr=spec.lr,
                momentum=spec.momentum,
                mu=spec.mu,
                seed=seed,
                task=self.data.task,
                loss=self._loss,
                optimizer=spec.optimizer,
                weight_decay=spec.weight_decay,
                lr_schedule=spec.lr_schedule,
                grad_clip=spec.grad_clip,
                drop_last=spec.drop_last,
                min_batch=spec.min_batch,
                metrics=("mse",) if self.data.task == "regression" else None,
                device=spec.device,
                local=model.local,
                batchnorm=model.batchnorm,
            )
        except LocalProtocolError as exc:
            raise ConfigError(f"model {model.factory!r} cannot train here: {exc}") from exc

    def _initial_params(self) -> npt.NDArray[np.float32]:
        initial = getattr(self.evaluator, "initial_params", None)
        if callable(initial):
            return np.asarray(initial(), dtype=np.float32)
        return np.zeros(self.layout.num_params, dtype=np.float32)

    def _local_tensors(self) -> tuple[str, ...]:
        if self._prototype is None:
            return ()
        from fedtier.client.torch_state import local_tensor_names

        names = local_tensor_names(
            self._prototype, local=self.model.local, batchnorm=self.model.batchnorm
        )
        return tuple(sorted(names))

    def trainer(self, device: int) -> _Trains:
        """``device``'s trainer (created on first use, seeded from the run seed)."""
        trainer = self._trainers.get(device)
        if trainer is None:
            trainer = self._trainers[device] = self._make_trainer(
                device, self.data.X_train[device], self.data.y_train[device]
            )
        return trainer

    def poisoned_trainer(self, device: int) -> _Trains:
        """A malicious ``device``'s trainer on its poisoned data (``AttackPlan.poison``)."""
        trainer = self._poisoned.get(device)
        if trainer is None:
            assert self.attack is not None
            X, y = self.attack.poison(device, self.data.X_train[device], self.data.y_train[device])
            trainer = self._poisoned[device] = self._make_trainer(device, X, y)
        return trainer

    def _make_trainer(self, device: int, X: npt.NDArray[np.float32], y: Labels) -> _Trains:
        """A trainer of ``device`` on ``(X, y)``, seeded from the run seed and the device."""
        seed = int.from_bytes(update_id_for(self.seed, device, -1)[:4], "little")
        if self._prototype is not None:
            if self.personal:
                module = copy.deepcopy(self._prototype)
            else:
                # One module for every device: a TorchTrainer loads the parameters it
                # is given before each run, and the simulator runs one device at a time.
                if self._shared is None:
                    self._shared = copy.deepcopy(self._prototype)
                module = self._shared
            return self._torch(module, X, y, seed=seed)
        if self._trainer_factory:
            return self._user_trainer(device, X, y)
        return self._logreg(X, y, seed=seed)

    def _user_trainer(self, device: int, X: npt.NDArray[np.float32], y: Labels) -> _Trains:
        built = self._build(self._dataset(X, y))
        if not isinstance(built, Trainer) or built.layout != self.layout:
            raise ConfigError(
                f"model factory {self.model.factory!r} gave device {device_name(device)} "
                f"{type(built).__name__} with another layout; it must return the same kind of "
                "Trainer for every dataset"
            )
        return built

    def identity(self, device: int) -> SigningIdentity:
        """``device``'s signing identity."""
        return self._identity(device)[0]

    def _identity(self, device: int) -> tuple[SigningIdentity, str]:
        known = self._identities.get(device)
        if known is None:
            identity = self.keys.register(identity_for(device_name(device), self.seed))
            known = self._identities[device] = (identity, identity.key_id)
            self._new_keys.append(identity.verify_key.raw)
        return known

    def take_new_keys(self) -> list[bytes]:
        """The raw public keys of identities made since the last call (a worker's enrolments)."""
        keys, self._new_keys = self._new_keys, []
        return keys

    # -- running -------------------------------------------------------------------

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
        plan = self.attack
        lies = plan is not None and plan.is_malicious(device)
        trainer = self.trainer(device)
        start = params
        if lies:
            assert plan is not None
            if plan.trains_on_poison:
                trainer = self.poisoned_trainer(device)
            if plan.trains_from_initial:
                start = self.initial_params
        result: TrainResult
        if isinstance(trainer, NumpyLogRegTrainer | TorchTrainer):
            result = trainer.train(start, max_steps=max_steps)
        else:  # a user's Trainer: partial work is its own business
            result = trainer.train(start)
        delta = np.subtract(result.params, start, dtype=np.float32)
        n_samples, claimed_base, copies = result.n_samples, base_version, 1
        if lies:
            assert plan is not None
            crafted = plan.craft(
                result.params, start, params, n_samples=n_samples, base_version=base_version
            )
            delta, n_samples = crafted.delta, crafted.n_samples
            claimed_base, copies = crafted.base_version, crafted.copies
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
        identity, key_id = self._identity(device)
        envelopes: list[bytes] = []
        for _ in range(copies):
            run = self._runs.get(device, 0) + 1
            self._runs[device] = run
            message = DeviceUpdate(
                fleet=FLEET,
                sender=key_id,
                seq=run,
                created_ms=EPOCH_MS + math.floor(now_s * 1000),
                update_id=update_id_for(self.seed, device, run),
                base_version=claimed_base,
                layout=self.layout.fingerprint,
                num_params=self.layout.num_params,
                n_samples=n_samples,
                codec=self.codec,
            )
            envelopes.append(seal(message, payload, identity))
        loss = result.metrics.get("loss", math.nan)
        return DeviceRun(envelopes[0], len(payload), loss, tuple(envelopes[1:]))

    # -- scoring -------------------------------------------------------------------

    def evaluate(
        self,
        params: npt.NDArray[np.float32],
        X: npt.NDArray[np.float32],
        y: Labels,
        owner: npt.NDArray[np.int64] | None = None,
    ) -> dict[str, float]:
        """``loss`` and the task's scores of ``params`` on ``(X, y)``.

        Classification scores ``accuracy``; regression ``mse`` and ``r2``.
        With local tensors (:attr:`personal`) every example is scored by the
        model of its ``owner`` device, or, without owners, every device's
        model on all of ``(X, y)`` (see the module docstring).
        """
        if not self.personal:
            return self._scores(self.evaluator, params, X, y)
        if owner is None:
            return self._fleet_mean(params, X, y)
        parts: list[tuple[int, dict[str, float]]] = []
        order = np.argsort(owner, kind="stable")
        devices, starts = np.unique(owner[order], return_index=True)
        bounds = itertools.pairwise([*starts.tolist(), len(order)])
        for device, (a, b) in zip(devices.tolist(), bounds, strict=True):
            idx = order[a:b]
            parts.append((len(idx), self._scores(self._scorer(device), params, X[idx], y[idx])))
        total = sum(n for n, _ in parts)
        out = {
            name: sum(n * s[name] for n, s in parts) / total
            for name in ("loss", *_SCORES[self.data.task])
        }
        if self.data.task == "regression":
            out["r2"] = _r2_from_mse(out["mse"], y)
        return out

    def _scorer(self, device: int) -> _Trains:
        """The trainer with ``device``'s local tensors (the initial ones if it never trained)."""
        return self._trainers.get(device, self.evaluator)

    def _fleet_mean(
        self, params: npt.NDArray[np.float32], X: npt.NDArray[np.float32], y: Labels
    ) -> dict[str, float]:
        weights: list[tuple[float, dict[str, float]]] = []
        samples = self.data.samples
        untrained = float(samples.sum()) - float(sum(samples[d] for d in self._trainers))
        if untrained > 0:
            weights.append((untrained, self._scores(self.evaluator, params, X, y)))
        for device, trainer in sorted(self._trainers.items()):
            weights.append((float(samples[device]), self._scores(trainer, params, X, y)))
        total = sum(w for w, _ in weights)
        names = ("loss", *_SCORES[self.data.task])
        return {name: sum(w * s[name] for w, s in weights) / total for name in names}

    def _scores(
        self,
        trainer: _Trains,
        params: npt.NDArray[np.float32],
        X: npt.NDArray[np.float32],
        y: Labels,
    ) -> dict[str, float]:
        metrics = trainer.evaluate(params, X, y)
        if self.data.task == "regression" and "mse" not in metrics:
            # A user's Trainer reports what it likes; MSE is the loss's job then.
            metrics = {**metrics, "mse": metrics["loss"]}
        if self.data.task == "regression":
            metrics["r2"] = _r2_from_mse(metrics["mse"], y)
        return {name: float(metrics[name]) for name in ("loss", *_SCORES[self.data.task])}


def _r2_from_mse(mse: float, y: Sequence[float] | npt.NDArray[Any]) -> float:
    """R^2 of predictions with this mean squared error on targets ``y``."""
    truth = np.asarray(y, dtype=np.float64)
    variance = float(truth.var())
    if variance == 0.0:
        return 1.0 if mse == 0.0 else 0.0
    return 1.0 - mse / variance
