"""Server permission refusals, ended at once as typed errors; imports the connection for typing.

nats-server drops a message it refuses and reports it only to the error
callback (docs/transport.md, NATS, rule 15), so each call names the subjects,
streams and buckets it touches and a violation on one of them ends it:
``PublishError`` for a refused write, ``ConfigError`` for a refused read or
setup call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import nats.errors
import trio

from fedtier.protocol.errors import ConfigError, FedtierError, PublishError

if TYPE_CHECKING:
    from fedtier.protocol.bus.nats._connection import _ConnectionEvents

# nats-py lowercases the server's -ERR text: 'nats: permissions violation for
# publish to "ft.fleet1.up.central"'.
_PERMISSION_VIOLATION_RE = re.compile(
    r'permissions violation for (?:publish|subscription) to "([^"]+)"', re.IGNORECASE
)


class _RefusalWatch:
    """One call in flight that a permissions violation on its subjects ends at once.

    ``names`` are lowercased subjects, stream, bucket or consumer names: a
    violating subject matches when it equals one or has one as a token
    (``$js.api.stream.info.kv_ft_fleet1_models`` matches ``kv_ft_fleet1_models``).
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.scope = trio.CancelScope()
        self.violation: str | None = None

    def offer(self, subject: str, message: str) -> None:
        if self.violation is None and (
            subject in self.names or not self.names.isdisjoint(subject.split("."))
        ):
            self.violation = message
            self.scope.cancel()


@contextmanager
def _refusals(
    events: _ConnectionEvents, action: str, names: Iterable[str], *, write: bool
) -> Iterator[_RefusalWatch]:
    """End the block at once with a typed error when the server refuses one of ``names``.

    A refused write raises ``PublishError`` (nothing was stored; retrying will
    not help until the permissions change); a refused read or setup call
    raises ``ConfigError``. Yields the watch, whose ``violation`` says
    afterwards whether that is what happened.
    """
    watch = _RefusalWatch(frozenset(name.lower() for name in names))
    events.refusal_watches.add(watch)
    try:
        with watch.scope:
            yield watch
    except Exception as exc:
        if watch.violation is None:
            raise
        raise _refused(action, watch.violation, write=write) from exc
    finally:
        events.refusal_watches.discard(watch)
    if watch.violation is not None:
        raise _refused(action, watch.violation, write=write)


def _refused(action: str, violation: str, *, write: bool) -> FedtierError:
    message = (
        f"{action}: the NATS server refused it ({violation}); grant it in this user's "
        "permissions (deploy/nats/accounts.conf) or use another user"
    )
    return PublishError(message) if write else ConfigError(message)


def _is_auth_refusal(exc: BaseException | None) -> bool:
    # nats-py raises a plain Error("nats: 'Authorization Violation'") when the
    # server refuses the CONNECT, and AuthorizationError on other paths.
    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    )
