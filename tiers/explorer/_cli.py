"""``fedtier trace serve`` and ``fedtier trace collect``: open a store, run a server; no views.

Both print one line saying where they listen (scripts and the browser test
read it) and serve until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from fedtier.tiers.explorer._http import collector_server, explorer_server
from fedtier.tiers.explorer._store import SpanStore

__all__ = ["parse_listen", "run_collect", "run_serve"]

DEFAULT_SERVE = "127.0.0.1:8321"
DEFAULT_COLLECT = "127.0.0.1:4318"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free port) as a pair.

    Raises:
        ValueError: not ``HOST:PORT`` with a port in 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the server like Ctrl-C, so the scratch database is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str) -> int:
    print(f"fedtier trace: {message}", file=sys.stderr)
    return 2


def run_serve(args: argparse.Namespace) -> int:
    """``fedtier trace serve (--dir DIR | --db FILE) [--listen HOST:PORT]``."""
    if (args.dir is None) == (args.db is None):
        return _fail("serve needs exactly one of --dir DIR (span files) or --db FILE (collector)")
    try:
        host, port = parse_listen(args.listen or DEFAULT_SERVE)
    except ValueError as exc:
        return _fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="fedtier-explorer-") as scratch:
        if args.dir is not None:
            # Span files are loaded into a scratch database: every view then
            # runs the same indexed queries as over a collector's store.
            store = SpanStore(Path(scratch) / "spans.sqlite")
            started = time.monotonic()
            try:
                files, spans, torn = store.load_dir(args.dir)
            except FileNotFoundError as exc:
                store.close()
                return _fail(str(exc))
            print(
                f"loaded {spans} spans from {files} files in {time.monotonic() - started:.1f} s"
                f" ({torn} unreadable lines skipped)",
                flush=True,
            )
        else:
            if not Path(args.db).is_file():
                return _fail(f"span database {str(args.db)!r} does not exist")
            store = SpanStore(args.db)
        with store:
            try:
                server = explorer_server(store, host, port)
            except OSError as exc:
                return _fail(f"cannot listen on {host}:{port}: {exc}")
            with server:
                print(f"explorer on http://{host}:{server.server_port}/", flush=True)
                with _sigterm_interrupts(), contextlib.suppress(KeyboardInterrupt):
                    server.serve_forever()
    return 0


def run_collect(args: argparse.Namespace) -> int:
    """``fedtier trace collect --db FILE [--listen HOST:PORT]``: an OTLP/HTTP receiver."""
    if args.db is None or args.dir is not None:
        return _fail("collect needs --db FILE (created if missing) and no --dir")
    try:
        host, port = parse_listen(args.listen or DEFAULT_COLLECT)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        import opentelemetry.proto  # noqa: F401 - only checked: protobuf bodies need it
    except ImportError:
        return _fail("collect needs opentelemetry-proto: pip install 'fedtier[otlp]'")
    with SpanStore(args.db) as store:
        try:
            server = collector_server(store, host, port)
        except OSError as exc:
            return _fail(f"cannot listen on {host}:{port}: {exc}")
        with server:
            print(
                f"collecting OTLP/HTTP spans on http://{host}:{server.server_port}/v1/traces"
                f" into {args.db}",
                flush=True,
            )
            with _sigterm_interrupts(), contextlib.suppress(KeyboardInterrupt):
                server.serve_forever()
    return 0
