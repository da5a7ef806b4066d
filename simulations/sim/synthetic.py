"""The FedProx Synthetic(alpha, beta) generator, one local distribution per device; numpy only.

Imports numpy and ``protocol.errors``; no engine, trainer or tier.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020),
section 5.1, and their generator (``data/synthetic_*/generate_synthetic.py``
in ``litian96/FedProx``). For device ``k``::

    u_k ~ N(0, alpha)            B_k ~ N(0, beta)
    W_k ~ N(u_k, 1)  (F x C)     b_k ~ N(u_k, 1)  (C)
    v_k ~ N(B_k, 1)  (F)         x ~ N(v_k, diag(j^-1.2)),  j = 1..F
    y = argmax(softmax(x W_k + b_k))

``alpha`` controls how much the devices' models differ, ``beta`` how much
their inputs differ. Synthetic IID draws one ``W``, ``b`` for everyone and
zero-mean inputs; with ``iid`` and ``beta > 0`` the model stays shared and only
the inputs shift, ``v_k = B_k * 1`` (the reference generator's ``iid`` branch),
which keeps a very large fleet learnable while its devices still differ.

Samples per device are ``int(lognormal(4, 2)) + 50``; each device keeps its
first 90% for training and the rest for test, as the reference generator does
after a shuffle (our samples are drawn i.i.d., so they need none). The draws
come in a different order than the reference code's, so the datasets are the
same in distribution, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import ConfigError

__all__ = ["DeviceSplit", "feature_variances", "generate_synthetic"]


@dataclass(frozen=True, slots=True)
class DeviceSplit:
    """One device's local data.

    Attributes:
        X_train: training inputs, float32, shape ``(n_train, F)``.
        y_train: training labels, int64.
        X_test: held-out inputs.
        y_test: held-out labels.
    """

    X_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    X_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def feature_variances(features: int) -> npt.NDArray[np.float64]:
    """The diagonal of the input covariance, ``j^-1.2`` for ``j = 1..features``."""
    return np.power(np.arange(1, features + 1, dtype=np.float64), -1.2)


def generate_synthetic(
    num_devices: int,
    *,
    alpha: float,
    beta: float,
    iid: bool,
    rng: np.random.Generator,
    features: int = 60,
    classes: int = 10,
    samples_log_mean: float = 4.0,
    samples_log_sigma: float = 2.0,
    samples_min: int = 50,
    samples_max: int | None = None,
    sizes: Sequence[int] | None = None,
    test_fraction: float = 0.1,
) -> list[DeviceSplit]:
    """Draw Synthetic(alpha, beta) (or Synthetic IID) for ``num_devices`` devices.

    Args:
        num_devices: devices to draw data for.
        alpha: spread of the devices' models; ignored when ``iid``.
        beta: spread of the devices' input means (with ``iid``: of their
            common shift ``B_k``).
        iid: Synthetic IID: one shared model, zero-mean inputs.
        rng: the only source of randomness.
        features: input dimension F.
        classes: number of classes C.
        samples_log_mean: samples per device are
            ``int(lognormal(samples_log_mean, samples_log_sigma)) + samples_min``.
        samples_log_sigma: see ``samples_log_mean``.
        samples_min: see ``samples_log_mean``.
        samples_max: cap on samples per device, None for none.
        sizes: each device's sample count, replacing the drawn ones (which are
            drawn anyway, so the devices' model and input means, drawn before
            any sample, are those the same ``rng`` gives without ``sizes``);
            one per device, each >= 2.
        test_fraction: each device's held-out share.

    Raises:
        ConfigError: fewer than one device or a share outside (0, 1).
    """
    if num_devices < 1:
        raise ConfigError(f"synthetic data needs at least one device, got {num_devices}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction is {test_fraction!r}; expected a number in (0, 1)")
    drawn = rng.lognormal(samples_log_mean, samples_log_sigma, num_devices).astype(np.int64)
    drawn += samples_min
    if samples_max is not None:
        np.minimum(drawn, samples_max, out=drawn)
    if sizes is not None:
        if len(sizes) != num_devices or min(sizes) < 2:
            raise ConfigError(
                f"sizes names {len(sizes)} sample counts for {num_devices} devices; "
                "expected one per device, each >= 2"
            )
        drawn = np.asarray(sizes, dtype=np.int64)
    scale = np.sqrt(feature_variances(features))
    if iid:
        shared_w = rng.normal(0.0, 1.0, (features, classes))
        shared_b = rng.normal(0.0, 1.0, classes)
        model_means = np.zeros(num_devices)
        shift = rng.normal(0.0, beta, num_devices) if beta > 0 else np.zeros(num_devices)
        input_means = np.repeat(shift[:, None], features, axis=1)
    else:
        model_means = rng.normal(0.0, alpha, num_devices)
        input_spread = rng.normal(0.0, beta, num_devices)
        input_means = rng.normal(input_spread[:, None], 1.0, (num_devices, features))
    splits: list[DeviceSplit] = []
    for k in range(num_devices):
        if iid:
            w, b = shared_w, shared_b
        else:
            w = rng.normal(model_means[k], 1.0, (features, classes))
            b = rng.normal(model_means[k], 1.0, classes)
        n = int(drawn[k])
        x = input_means[k] + rng.standard_normal((n, features)) * scale
        # argmax of the softmax is the argmax of the logits.
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        n_train = max(1, min(n - 1, int((1.0 - test_fraction) * n)))
        x32 = x.astype(np.float32)
        splits.append(DeviceSplit(x32[:n_train], y[:n_train], x32[n_train:], y[n_train:]))
    return splits
