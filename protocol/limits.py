"""Hard caps on every size, length and count a decoder accepts; pure data, no imports beyond stdlib.

A receiver checks the caps before it allocates, so a hostile message costs at
most the cap. ``Limits`` is configurable per daemon; the defaults suit models
up to 16 Mi parameters. ``StructureCaps`` bounds the msgpack structure of one
encoded value (how deep, how many containers and objects); the header's caps
are not configured but derived from the message schemas and ``Limits``
(``protocol.messages.header_caps``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedtier.protocol.errors import LocalProtocolError

__all__ = ["DEFAULT_LIMITS", "Limits", "StructureCaps", "limits_for_model"]


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


def limits_for_model(num_params: int, base: Limits = DEFAULT_LIMITS) -> Limits:
    """``base``, raised where needed so that a model of ``num_params`` values fits.

    A device knows its model's layout, so it need not be configured for a
    large model: a blob of its own layout (float32, the widest dense codec,
    plus the largest header) is never above these caps, while every other cap
    stays ``base``'s.
    """
    if num_params < 1:
        raise LocalProtocolError(f"a model has at least one parameter, got {num_params}")
    widest = 4 * num_params + base.max_header_bytes + 1024
    return replace(
        base,
        max_params=max(base.max_params, num_params),
        max_envelope_bytes=max(base.max_envelope_bytes, widest),
    )


@dataclass(frozen=True, slots=True)
class StructureCaps:
    """The most msgpack structure one encoded value may have; also the shape of a schema value.

    A decoder walks the bytes against these caps before it builds anything, so
    a value within its byte cap cannot make it allocate a million containers
    (``[[[], [], ...], ...]``) or pre-size deep arrays that the bytes never fill.

    Attributes:
        max_depth: levels of nested containers; a scalar is 0, ``[]`` is 1, a
            header map holding an array is 2.
        max_maps: maps, at every level together, the value itself included.
        max_arrays: arrays, likewise.
        max_objects: msgpack objects in all: every container, map key, map
            value and array item counts one, the value itself included.
        max_map_len: entries of any one map.
        max_array_len: items of any one array.
    """

    max_depth: int
    max_maps: int
    max_arrays: int
    max_objects: int
    max_map_len: int
    max_array_len: int

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LocalProtocolError(f"cap {name} must be an integer >= 0, got {value!r}")

    def union(self, other: StructureCaps) -> StructureCaps:
        """The caps that admit both ``self`` and ``other``: each cap the larger."""
        return StructureCaps(
            max(self.max_depth, other.max_depth),
            max(self.max_maps, other.max_maps),
            max(self.max_arrays, other.max_arrays),
            max(self.max_objects, other.max_objects),
            max(self.max_map_len, other.max_map_len),
            max(self.max_array_len, other.max_array_len),
        )
