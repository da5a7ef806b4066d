"""The check that every nats-server fsyncs each JetStream write; imports no nats-py.

The client protocol does not expose ``sync_interval``; each server's
monitoring endpoint (``/varz`` -> ``jetstream.config.sync_always``) does
(docs/transport.md, NATS, Costs): one HTTP GET per server in a worker thread.
The check fails closed: at start every server must answer and say so; after a
reconnect (the client may now write through a node that was restarted with
another config) and every ``sync_recheck_s`` every server is read again, one
that does not answer is polled until it does (a node that is down acknowledges
nothing), and one that answers without ``sync_interval: always`` ends the bus
with a ``ConfigError``.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from fedtier.protocol.bus.nats._config import NatsConfig
from fedtier.protocol.errors import ConfigError

logger = logging.getLogger("fedtier.protocol.bus.nats")

# While a server does not answer after a reconnect: the longest pause between
# two reads, and how often the wait is logged (a node can stay down for hours).
_POLL_MAX_S: Final = 5.0
_POLL_LOG_S: Final = 30.0


def _read_varz(url: str, timeout_s: float, cafile: Path | None) -> Any:
    if not url.startswith(("http://", "https://")):  # urlopen would also open file: URLs
        raise ValueError(f"not an http(s) URL: {url!r}")
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    with urllib.request.urlopen(url, timeout=timeout_s, context=ctx) as resp:  # noqa: S310
        return json.loads(resp.read())


async def _fetch_varz(config: NatsConfig, base: str) -> Any:
    """One read of ``base``/varz; ``OSError``/``TimeoutError`` when the server does not answer."""
    url = base.rstrip("/") + "/varz"
    try:
        return await trio.to_thread.run_sync(
            _read_varz,
            url,
            config.request_timeout_s,
            config.tls_ca_file,
            abandon_on_cancel=True,
        )
    except ValueError as exc:  # not http(s), or not JSON: retrying will not help
        raise ConfigError(
            f"cannot read {url} to check JetStream's sync_interval ({exc}); fix the "
            "monitoring URL or set require_sync_always = false"
        ) from exc


def _verdict(base: str, varz: Any, *, when: str) -> None:
    """Raise ``ConfigError`` unless ``varz`` shows JetStream with ``sync_always``."""
    if not isinstance(varz, dict):
        raise ConfigError(f"{base}/varz did not return a JSON object; is it a nats-server?")
    server = varz.get("server_name") or varz.get("server_id") or base
    jetstream = varz.get("jetstream") or {}
    js_config = jetstream.get("config")
    if not js_config:
        raise ConfigError(f"{when}nats-server {server!r} ({base}) has JetStream disabled")
    if js_config.get("sync_always") is not True:
        raise ConfigError(
            f"{when}nats-server {server!r} ({base}) acknowledges JetStream writes "
            "before they reach the disk; add 'sync_interval: always' to its jetstream block "
            "(see deploy/nats/nats-server.conf) and restart it"
        )


async def _check_sync_always(config: NatsConfig) -> None:
    """At start: refuse unless every server answers and fsyncs every JetStream write.

    A server that restarts right after the connect (a crash loop, a rolling
    restart) refuses or drops the monitoring request for a moment: each URL is
    retried as the connect is. One that keeps failing is a ``ConfigError``: an
    unchecked server may be the one that acknowledges a write.
    """
    if not config.require_sync_always:
        return
    for base in config.sync_check_urls:
        url = base.rstrip("/") + "/varz"
        delay = config.connect_backoff_s
        for attempt in range(1, config.connect_attempts + 1):
            try:
                varz = await _fetch_varz(config, base)
                break
            except (TimeoutError, OSError) as exc:
                if attempt == config.connect_attempts:
                    raise ConfigError(
                        f"cannot read {url} to check JetStream's sync_interval after "
                        f"{attempt} attempts ({exc}); fix the monitoring URL, start that "
                        "server, or set require_sync_always = false"
                    ) from exc
                logger.warning(
                    "nats %s: reading %s failed (attempt %d/%d: %s); retrying in %.1f s",
                    config.name,
                    url,
                    attempt,
                    config.connect_attempts,
                    exc,
                    delay,
                )
            await trio.sleep(delay)
            delay *= 2
        _verdict(base, varz, when="")


async def _recheck_sync_always(
    config: NatsConfig,
    reconnects: Callable[[], int],
    changed: Callable[[], trio.Event],
) -> None:
    """After start: read every server again after each reconnect and every ``sync_recheck_s``.

    Returns only by raising ``ConfigError`` (a server found without
    ``sync_interval: always``); runs until cancelled otherwise.

    Args:
        config: the bus's configuration.
        reconnects: how many reconnects the connection has made so far.
        changed: the connection's current "state changed" event.
    """
    if not config.require_sync_always:
        await trio.sleep_forever()
    seen = reconnects()
    while True:
        # Wait for a reconnect (or the periodic check); nothing to read meanwhile.
        with trio.move_on_after(config.sync_recheck_s or float("inf")):
            while reconnects() == seen:
                await changed().wait()
        why = "after a reconnect, " if reconnects() != seen else "on a periodic check, "
        seen = reconnects()
        pending = list(config.sync_check_urls)
        delay = config.connect_backoff_s
        next_log_at = trio.current_time()
        while pending:
            for base in list(pending):
                try:
                    varz = await _fetch_varz(config, base)
                except (TimeoutError, OSError) as exc:
                    if trio.current_time() >= next_log_at:
                        logger.warning(
                            "nats %s: %s does not answer (%s); checking its sync_interval "
                            "when it does",
                            config.name,
                            base,
                            exc,
                        )
                    continue
                _verdict(base, varz, when=why)
                pending.remove(base)
            if trio.current_time() >= next_log_at:
                next_log_at = trio.current_time() + _POLL_LOG_S
            if pending:
                await trio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)
