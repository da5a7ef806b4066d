"""The start-up check that nats-server fsyncs each JetStream write; imports no nats-py.

The client protocol does not expose ``sync_interval``; the monitoring
endpoint's ``jetstream.config.sync_always`` does (docs/transport.md, NATS,
Costs): one HTTP GET in a worker thread.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import trio

from fedtier.protocol.bus.nats._config import NatsConfig
from fedtier.protocol.errors import ConfigError

logger = logging.getLogger("fedtier.protocol.bus.nats")


def _read_varz(url: str, timeout_s: float, cafile: Path | None) -> Any:
    if not url.startswith(("http://", "https://")):  # urlopen would also open file: URLs
        raise ValueError(f"not an http(s) URL: {url!r}")
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    with urllib.request.urlopen(url, timeout=timeout_s, context=ctx) as resp:  # noqa: S310
        return json.loads(resp.read())


async def _check_sync_always(config: NatsConfig) -> None:
    """Refuse a JetStream server that acknowledges writes before they are on disk."""
    if not config.require_sync_always:
        return
    if config.monitoring_url is None:
        logger.warning(
            "nats %s: monitoring_url is not set, so JetStream's sync_interval cannot be "
            "checked; make sure every server runs with 'sync_interval: always'",
            config.name,
        )
        return
    url = config.monitoring_url.rstrip("/") + "/varz"
    # A server that restarts right after the connect (a crash loop, a rolling
    # restart) refuses or drops the monitoring request for a moment: retry as the
    # connect does. A wrong URL keeps failing and is reported after the last try.
    delay = config.connect_backoff_s
    for attempt in range(1, config.connect_attempts + 1):
        try:
            varz = await trio.to_thread.run_sync(
                _read_varz,
                url,
                config.request_timeout_s,
                config.tls_ca_file,
                abandon_on_cancel=True,
            )
            break
        except (TimeoutError, OSError) as exc:
            if attempt == config.connect_attempts:
                raise ConfigError(
                    f"cannot read {url} to check JetStream's sync_interval after {attempt} "
                    f"attempts ({exc}); fix monitoring_url or set require_sync_always = false"
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
        except ValueError as exc:  # not http(s), or not JSON: retrying will not help
            raise ConfigError(
                f"cannot read {url} to check JetStream's sync_interval ({exc}); fix "
                "monitoring_url or set require_sync_always = false"
            ) from exc
        await trio.sleep(delay)
        delay *= 2
    server = varz.get("server_name") or varz.get("server_id") or config.monitoring_url
    jetstream = varz.get("jetstream") or {}
    js_config = jetstream.get("config")
    if not js_config:
        raise ConfigError(
            f"nats-server {server!r} ({config.monitoring_url}) has JetStream disabled"
        )
    if js_config.get("sync_always") is not True:
        raise ConfigError(
            f"nats-server {server!r} ({config.monitoring_url}) acknowledges JetStream writes "
            "before they reach the disk; add 'sync_interval: always' to its jetstream block "
            "(see deploy/nats/nats-server.conf) and restart it"
        )
