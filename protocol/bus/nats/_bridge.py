"""The trio-asyncio bridge and the nats-py error boundary; imports no other module of the package.

Every call into nats-py crosses the bridge once through ``_aio`` (about
30-85 us a crossing), so callers bridge coarse operations, and whatever
nats-py raises is mapped to ``protocol.errors`` by ``_boundary`` with
``raise ... from exc``. Rules 2, 3 and 8 of docs/transport.md (NATS) say why.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import ParamSpec, TypeVar

import nats.errors
import nats.js.errors
import trio_asyncio

from fedtier.protocol.errors import (
    BusClosed,
    BusError,
    BusUnavailable,
    FedtierError,
    LocalProtocolError,
    PublishError,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")


@asynccontextmanager
async def open_nats_loop() -> AsyncIterator[None]:
    """Open the trio-asyncio loop that nats-py runs on.

    A daemon opens it once, directly under ``trio.run``, around everything
    that uses NATS; ``open_nats_bus`` then reuses it. (``open_nats_bus`` opens
    one itself when none is open, which suits tests and one-shot tools.)

    trio-asyncio wraps whatever leaves the loop in nested exception groups;
    when the group holds a single exception, that exception is re-raised
    alone so callers see our error types, not the wrapping.
    """
    sole: BaseException | None = None
    try:
        async with trio_asyncio.open_loop():
            yield
    except BaseExceptionGroup as group:
        sole = _sole_leaf(group)
        if sole is None:
            raise
    if sole is not None:
        # Raised outside the except block so the group is not chained onto it.
        raise sole


def _sole_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


def _loop_is_open() -> bool:
    loop = trio_asyncio.current_loop.get()
    return loop is not None and not loop.is_closed()


async def _aio(fn: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run one asyncio coroutine function on the trio-asyncio loop: one bridge crossing.

    On trio cancellation the asyncio task is cancelled and ``trio.Cancelled``
    is raised here.
    """
    if not _loop_is_open():
        raise BusClosed(
            "no trio-asyncio loop is open here; use open_nats_loop() or open_nats_bus()"
        )
    result: _T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
    return result


def _translate(exc: BaseException, action: str, *, outcome_unknown: bool) -> FedtierError | None:
    """Map a nats/asyncio exception to our tree; None for anything we do not recognise.

    ``outcome_unknown`` marks writes (publish, KV put, object put): when the
    reply is missing the write may have happened, so the caller must retry
    with the same id (``PublishError``). Reads map to ``BusUnavailable``.
    """
    # The builtin TimeoutError first: nats' TimeoutError derives from it, and
    # on 3.11 it is an OSError, which would otherwise read as a socket failure.
    if isinstance(exc, TimeoutError):
        if outcome_unknown:
            return PublishError(
                f"{action}: no reply in time; outcome unknown, retry with the same id"
            )
        return BusUnavailable(f"{action}: no reply in time")
    if isinstance(exc, asyncio.CancelledError):
        # An asyncio cancellation that trio did not ask for: the loop or the
        # connection is going away underneath the call.
        if outcome_unknown:
            return PublishError(f"{action}: interrupted; outcome unknown, retry with the same id")
        return BusClosed(f"{action}: interrupted because the connection is closing")
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        if outcome_unknown:
            return PublishError(
                f"{action}: no JetStream responder (stream missing or server restarting); "
                "outcome unknown, retry with the same id"
            )
        return BusUnavailable(f"{action}: no JetStream responder")
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return BusClosed(f"{action}: the NATS connection is closed")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return LocalProtocolError(f"{action}: message larger than the server's max_payload")
    if isinstance(exc, nats.errors.BadSubjectError | nats.errors.BadHeaderError):
        return LocalProtocolError(f"{action}: {exc}")
    if isinstance(exc, nats.js.errors.InvalidKeyError | nats.js.errors.InvalidBucketNameError):
        return LocalProtocolError(f"{action}: invalid key or bucket name")
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return BusUnavailable(f"{action}: JetStream unavailable ({exc})")
    if isinstance(exc, nats.js.errors.APIError):
        if outcome_unknown:
            return PublishError(
                f"{action}: JetStream refused it: {exc.description} (code {exc.err_code})"
            )
        return BusError(f"{action}: JetStream refused it: {exc.description} (code {exc.err_code})")
    if isinstance(exc, nats.errors.Error | OSError):
        return BusUnavailable(f"{action}: {exc}")
    return None


@contextmanager
def _boundary(action: str, *, outcome_unknown: bool = False) -> Iterator[None]:
    """Translate what nats-py raises inside the block; our own errors pass through."""
    try:
        yield
    except FedtierError:
        raise
    except (Exception, asyncio.CancelledError) as exc:
        mapped = _translate(exc, action, outcome_unknown=outcome_unknown)
        if mapped is None:
            raise
        raise mapped from exc
