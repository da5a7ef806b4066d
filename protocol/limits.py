"""Hard caps on every size, length and count a decoder accepts; pure data, no imports beyond stdlib.

A receiver checks the caps before it allocates, so a hostile message costs at
most the cap. ``Limits`` is configurable per daemon; the defaults suit models
up to 16 Mi parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtier.protocol.errors import LocalProtocolError

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps applied while decoding.

    Attributes:
        max_envelope_bytes: whole envelope on the wire.
        max_header_bytes: the signed header.
        max_params: parameters of a model, so decoded floats take at most
            ``4 * max_params`` bytes (the decompressed-size cap).
        max_ids: update or partial ids listed in one partial.
        max_str_chars: any string field.
        max_metrics: entries of an update's ``metrics`` map.
        max_hist_buckets: entries of a staleness histogram.
        max_tensors: tensors in a model layout.
        max_ndim: dimensions of one tensor.
    """

    max_envelope_bytes: int = 80 * 1024 * 1024
    max_header_bytes: int = 4 * 1024 * 1024
    max_params: int = 16 * 1024 * 1024
    max_ids: int = 65_536
    max_str_chars: int = 256
    max_metrics: int = 16
    max_hist_buckets: int = 256
    max_tensors: int = 4096
    max_ndim: int = 8

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LocalProtocolError(f"limit {name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()
