"""Client-side error feedback for lossy codecs; imports only numpy and protocol, never I/O.

A device that compresses its delta loses the part the codec drops. Error
feedback keeps that part (the residual) and adds it to the next round's delta,
so nothing is lost for good: after any number of rounds,
``sum(true deltas) - sum(decoded payloads) == residual`` (up to float32
rounding). Seide et al. 2014 (1-bit SGD); Karimireddy et al. 2019 (EF-SGD).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec, decode, encode
from fedtier.protocol.errors import LocalProtocolError

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Keeps the compression residual between rounds (Seide 2014; Karimireddy 2019 EF-SGD).

    One instance per model layout on a device. Not thread-safe. The residual
    lives in memory only: a device that restarts starts again from zero, which
    loses at most one round's compression error.

    Args:
        num_params: length of every delta this instance will encode.
    """

    def __init__(self, num_params: int) -> None:
        if type(num_params) is not int or num_params < 1:
            raise LocalProtocolError(f"num_params is {num_params!r}; it must be an int >= 1")
        self._num_params = num_params
        self._residual: npt.NDArray[np.float32] = np.zeros(num_params, np.float32)

    @property
    def num_params(self) -> int:
        """Length of every delta this instance encodes."""
        return self._num_params

    @property
    def residual(self) -> npt.NDArray[np.float32]:
        """What earlier rounds' payloads left out, as a read-only view."""
        view = self._residual.view()
        view.flags.writeable = False
        return view

    def encode(
        self, delta: npt.NDArray[np.float32], spec: CodecSpec, *, seed: int | None = None
    ) -> bytes:
        """Encode ``delta + residual`` and keep what the payload leaves out.

        If encoding raises, the residual is unchanged.

        Args:
            delta: this round's 1-D float32 delta, ``num_params`` long.
            spec: the codec.
            seed: i8 only: seed for stochastic rounding.

        Returns:
            The payload, as :func:`protocol.codecs.encode` gives it.

        Raises:
            LocalProtocolError: wrong array, or the codec cannot encode the values.
        """
        if (
            not isinstance(delta, np.ndarray)
            or delta.dtype != np.float32
            or delta.shape != (self._num_params,)
        ):
            raise LocalProtocolError(
                f"delta must be a 1-D float32 array of {self._num_params} values"
            )
        compensated = delta + self._residual
        payload = encode(compensated, spec, seed=seed)
        # Subtract what the receiver will decode, not what we meant to send, so
        # quantization error is carried over as well as the dropped entries.
        np.subtract(compensated, decode(payload, spec, self._num_params), out=self._residual)
        return payload

    def reset(self) -> None:
        """Forget the residual, e.g. when the model layout or the codec changes."""
        self._residual.fill(0)
