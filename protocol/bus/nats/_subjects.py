"""NATS subject, durable-name and header rules; plain string checks, imports no I/O library."""

from __future__ import annotations

from collections.abc import Mapping

from fedtier.protocol.errors import LocalProtocolError

# Header names starting with this prefix belong to NATS (Nats-Msg-Id,
# Nats-Expected-Stream, ...): refused on publish so a caller cannot forge them,
# stripped on delivery so headers round-trip exactly as the caller wrote them.
_RESERVED_HEADER_PREFIX = "nats-"
_MSG_ID_HEADER = "Nats-Msg-Id"


def _check_subject(subject: str, *, allow_wildcards: bool) -> None:
    tokens = subject.split(".")
    if not subject or any(not t or any(c.isspace() for c in t) for t in tokens):
        raise LocalProtocolError(f"{subject!r} is not a NATS subject (empty token or whitespace)")
    for i, part in enumerate(tokens):
        if part in ("*", ">"):
            if not allow_wildcards:
                raise LocalProtocolError(f"cannot publish to wildcard subject {subject!r}")
            if part == ">" and i != len(tokens) - 1:
                raise LocalProtocolError(f"'>' must be the last token of {subject!r}")


def _pattern_covers(pattern: str, subject_filter: str) -> bool:
    """Return True when every subject ``subject_filter`` matches also matches ``pattern``."""
    p_tokens = pattern.split(".")
    f_tokens = subject_filter.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(f_tokens) > i  # '>' needs at least one token; a filter '>' has one
        if i >= len(f_tokens):
            return False
        f = f_tokens[i]
        if f == ">":
            return False  # the filter reaches deeper than this pattern allows
        if p != "*" and p != f:
            return False
    return len(p_tokens) == len(f_tokens)


def _check_durable_name(durable: str) -> None:
    if not durable or any(c in durable for c in ".*>") or any(c.isspace() for c in durable):
        raise LocalProtocolError(
            f"durable name {durable!r} must be non-empty without . * > or spaces"
        )


def _wire_headers(headers: Mapping[str, str] | None, msg_id: str | None) -> dict[str, str] | None:
    """Build a fresh headers dict for one publish (js.publish mutates the dict it is given)."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if key.lower().startswith(_RESERVED_HEADER_PREFIX):
            raise LocalProtocolError(f"header {key!r} is reserved for NATS; use another name")
        out[key] = value
    if msg_id is not None:
        if not msg_id:
            raise LocalProtocolError("msg_id must be a non-empty string")
        out[_MSG_ID_HEADER] = msg_id
    return out or None


def _user_headers(raw: Mapping[str, str] | None) -> dict[str, str]:
    if not raw:
        return {}
    return {k: v for k, v in raw.items() if not k.lower().startswith(_RESERVED_HEADER_PREFIX)}
