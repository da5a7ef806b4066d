"""Nested tables written back as TOML, for the report of what ran; never a reader or an engine.

Imports the standard library and ``protocol.errors`` only. ``scenario.py``
re-exports ``dump_toml``, its public address.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedtier.protocol.errors import ConfigError

__all__ = ["dump_toml"]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


def dump_toml(tables: Mapping[str, object]) -> str:
    """Write nested tables back as TOML (scalars first, then sub-tables); for reports."""
    lines: list[str] = []

    def emit(prefix: str, table: Mapping[str, object]) -> None:
        top = not prefix
        scalars = {k: v for k, v in table.items() if not _is_table_like(v, top)}
        nested = {k: v for k, v in table.items() if _is_table_like(v, top)}
        if prefix and (scalars or not nested):
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        if scalars:
            lines.append("")
        for key, value in nested.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, list):
                for item in value:
                    lines.append(f"[[{name}]]")
                    lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                    lines.append("")
            else:
                assert isinstance(value, Mapping)
                emit(name, value)

    emit("", tables)
    return "\n".join(lines).rstrip() + "\n"


def _is_table_like(value: object, top: bool) -> bool:
    if isinstance(value, Mapping):
        # Small leaf tables (flush = {...}) stay inline, as they are written in scenarios.
        return top or any(isinstance(v, Mapping) for v in value.values()) or len(value) > 4
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)
