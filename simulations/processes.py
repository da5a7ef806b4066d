"""Child processes of a simulation run, supervised from trio; never imports tiers, client or a bus.

``open_process_group(log_dir)`` yields a ``ProcessGroup``; ``await
group.start(name, argv, ...)`` starts one child (each in its own process group,
so a Ctrl-C at the terminal reaches only the parent, which then stops the
children in the order it chooses). A child's stderr is copied line by line to
``log_dir/<name>.log`` and watched for a readiness pattern; its stdout, when
asked for, is handed to a callback line by line (the fleet's JSON progress).

``group.stop(child)`` sends SIGTERM, waits up to a grace period for the exit
(a tier daemon flushes its buffer meanwhile), then SIGKILLs and reaps it.
Leaving the ``async with`` block, by any exit including cancellation and
Ctrl-C, stops every child still running (SIGTERM to all, then SIGKILL past
the deadline) and reaps it, so no child outlives the parent's trio run. Only
an uncatchable SIGKILL of the parent itself can orphan children.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, TypeVar

import trio

from fedtier.protocol.errors import ChildFailed

__all__ = [
    "Child",
    "ProcessGroup",
    "open_process_group",
    "sigterm_as_interrupt",
    "stop_on_signals",
]

T = TypeVar("T")

_TAIL_LINES: Final = 12
_TAIL_IN_MESSAGES: Final = 3
_MAX_LINE_BYTES: Final = 1 << 20
# A grandchild could hold a pipe open after the child exits; stop reading then.
_PUMP_AFTER_EXIT_S: Final = 2.0


@dataclass(eq=False)
class Child:
    """One supervised child process.

    Attributes:
        name: its label (log file name, messages).
        argv: the command it runs.
        process: the trio process.
        log_path: where its stderr goes.
        ready: set once a stderr line matched the readiness pattern (at
            once when there is none).
        exited: set once the process has exited and been reaped.
        tail: its last stderr lines, for error messages.
        stopping: set when the parent asked it to stop (an exit is then expected).
        stderr_done: set once its stderr is read to the end (its last words are
            in ``tail`` and the log file then).
    """

    name: str
    argv: Sequence[str]
    process: trio.Process
    log_path: Path
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=_TAIL_LINES))
    stopping: bool = False
    stderr_done: trio.Event = field(default_factory=trio.Event)
    # Pipe readers are shielded: cancelling them would close the pipes under a
    # child that is still shutting down (its last log lines lost, its writes
    # failing). They end at EOF, or shortly after the child was reaped.
    pump_scopes: list[trio.CancelScope] = field(default_factory=list)

    @property
    def returncode(self) -> int | None:
        """The exit status once exited (negative: killed by that signal)."""
        return self.process.returncode

    def describe_exit(self) -> str:
        """One sentence: how it ended and its last log lines."""
        code = self.returncode
        how = (
            "is still running"
            if code is None
            else f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with status {code}"
        )
        last = " | ".join(list(self.tail)[-_TAIL_IN_MESSAGES:]) if self.tail else "(no output)"
        return f"{self.name} {how}; last log lines: {last} (full log: {self.log_path})"


class ProcessGroup:
    """The children of one run; build it with ``open_process_group``."""

    def __init__(self, nursery: trio.Nursery, log_dir: Path, env: Mapping[str, str]) -> None:
        self._nursery = nursery
        self._log_dir = log_dir
        self._env = dict(env)
        self.children: list[Child] = []
        # Unparked whenever a child gets ready or exits.
        self._changed = trio.lowlevel.ParkingLot()

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready_pattern: str | None = None,
        on_stdout_line: Callable[[str], None] | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> Child:
        """Start ``argv`` as child ``name``; returns at once (see ``wait_ready``).

        Args:
            name: label and log file stem.
            argv: the command (no shell).
            ready_pattern: a regular expression; the child is ready once a
                stderr line matches it. None: ready at once.
            on_stdout_line: called with each stdout line (without the newline);
                None sends stdout to the log file too.
            env: variables set for this child on top of the group's
                environment; a None value removes the variable.
        """
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        child_env = dict(self._env)
        for key, value in (env or {}).items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = value
        # A local append-only file: opening and writing a line take microseconds,
        # less than a thread hop through trio.open_file would cost.
        log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115, ASYNC230 - closed by the pump
        try:
            process = await trio.lowlevel.open_process(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if on_stdout_line is not None else log_file.fileno(),
                stderr=subprocess.PIPE,
                env=child_env,
                # Its own process group: a terminal's Ctrl-C goes to the parent
                # only, which stops children in order (brokers last).
                process_group=0,
            )
        except BaseException:
            log_file.close()
            raise
        child = Child(name, tuple(argv), process, log_path)
        self.children.append(child)
        pattern = re.compile(ready_pattern) if ready_pattern is not None else None
        if pattern is None:
            child.ready.set()
        assert process.stderr is not None
        stderr_scope = trio.CancelScope(shield=True)
        child.pump_scopes.append(stderr_scope)
        self._nursery.start_soon(
            self._pump_stderr, child, stderr_scope, process.stderr, log_file, pattern
        )
        if on_stdout_line is not None:
            assert process.stdout is not None
            stdout_scope = trio.CancelScope(shield=True)
            child.pump_scopes.append(stdout_scope)
            self._nursery.start_soon(
                self._pump_stdout, stdout_scope, process.stdout, on_stdout_line
            )
        self._nursery.start_soon(self._reap, child)
        return child

    async def wait_ready(self, children: Sequence[Child], *, timeout_s: float) -> None:
        """Wait until every child in ``children`` is ready.

        Raises:
            ChildFailed: one exited first, or they were not all ready in time.
        """
        with trio.move_on_after(timeout_s):
            while True:
                for child in children:
                    if child.exited.is_set() and not child.ready.is_set():
                        raise ChildFailed(f"{child.describe_exit()} before it was ready")
                if all(c.ready.is_set() for c in children):
                    return
                await self._changed.park()
        late = [c.name for c in children if not c.ready.is_set()]
        raise ChildFailed(f"{', '.join(late)} not ready within {timeout_s:g} s")

    async def stop(
        self, children: Sequence[Child], *, grace_s: float, sig: int = signal.SIGTERM
    ) -> None:
        """Signal ``children`` at once, wait up to ``grace_s`` for them, SIGKILL the rest.

        Returns once every one of them has been reaped. Shielded: a stop runs
        to its end even when the caller is being cancelled.
        """
        with trio.CancelScope(shield=True):
            for child in children:
                child.stopping = True
                if child.returncode is None:
                    _send(child, sig)
            with trio.move_on_after(grace_s):
                for child in children:
                    await child.exited.wait()
            for child in children:
                if not child.exited.is_set():
                    _send(child, signal.SIGKILL)
            for child in children:
                await child.exited.wait()

    async def changed(self) -> None:
        """Wait until some child gets ready or exits."""
        await self._changed.park()

    def running(self) -> list[Child]:
        """Children not yet exited."""
        return [c for c in self.children if not c.exited.is_set()]

    # -- tasks ---------------------------------------------------------------------------

    async def _reap(self, child: Child) -> None:
        # Shielded: a reaped child is the one guarantee we must keep while
        # cancelled; stop()/the group exit make the wait short.
        with trio.CancelScope(shield=True):
            await child.process.wait()
        for scope in child.pump_scopes:
            scope.deadline = min(scope.deadline, trio.current_time() + _PUMP_AFTER_EXIT_S)
        child.exited.set()
        self._changed.unpark_all()

    async def _pump_stderr(
        self,
        child: Child,
        scope: trio.CancelScope,
        stream: trio.abc.ReceiveStream,
        log_file: IO[bytes],
        pattern: re.Pattern[str] | None,
    ) -> None:
        lines = _LineReader(stream)
        try:
            with scope:
                while (line := await lines.next_line()) is not None:
                    log_file.write(line + b"\n")
                    text = line.decode("utf-8", "replace")
                    child.tail.append(text[:400])
                    if pattern is not None and not child.ready.is_set() and pattern.search(text):
                        child.ready.set()
                        self._changed.unpark_all()
        finally:
            log_file.close()
            child.stderr_done.set()
            await stream.aclose()

    @staticmethod
    async def _pump_stdout(
        scope: trio.CancelScope, stream: trio.abc.ReceiveStream, on_line: Callable[[str], None]
    ) -> None:
        lines = _LineReader(stream)
        try:
            with scope:
                while (line := await lines.next_line()) is not None:
                    on_line(line.decode("utf-8", "replace"))
        finally:
            await stream.aclose()


def _send(child: Child, sig: int) -> None:
    # It may have exited between the check and the signal.
    with contextlib.suppress(ProcessLookupError):
        child.process.send_signal(sig)


class _LineReader:
    """Lines of a byte stream, without their newline; a plain class, not an async generator."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False

    async def next_line(self) -> bytes | None:
        """The next line (a last one without newline included); None at EOF."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if self._eof or len(self._buffer) > _MAX_LINE_BYTES:
                if not self._buffer:
                    return None
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                self._eof = True
            self._buffer += chunk


@asynccontextmanager
async def open_process_group(
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    stop_grace_s: float = 10.0,
) -> AsyncIterator[ProcessGroup]:
    """Supervise child processes; on exit stop and reap every one still running.

    Args:
        log_dir: where each child's ``<name>.log`` goes.
        env: the children's environment (default: this process's).
        stop_grace_s: how long children get after SIGTERM at exit before SIGKILL.
    """
    async with trio.open_nursery() as nursery:
        group = ProcessGroup(nursery, log_dir, os.environ if env is None else env)
        try:
            yield group
        finally:
            await group.stop(group.running(), grace_s=stop_grace_s)


async def stop_on_signals(run: Callable[[], Awaitable[T]]) -> T:
    """Await ``run()``; SIGTERM or SIGINT cancels it, then raises ``KeyboardInterrupt``.

    For a lab command that starts brokers and children (the benches): without
    it a SIGTERM (``kill``, a service manager, a CI timeout) ended the Python
    process at once and left every child it had started running, and a
    command started in the background with SIGINT ignored could not be
    stopped cleanly at all. Cancelling runs the cleanup of every context the
    run entered, so its children are stopped and its files removed before the
    command exits (status 130, like Ctrl-C).
    """
    result: list[T] = []
    received: list[int] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    received.append(signum)
                    nursery.cancel_scope.cancel()
                    return

            async def body() -> None:
                result.append(await run())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(body)
    if received:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(received[0]).name}")
    return result[0]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C does.

    For the synchronous parts of a lab command (starting a broker before
    ``trio.run``, stopping it after): Python's default SIGTERM ends the
    process without running a single ``finally``, so a broker it started
    would outlive it. Inside ``trio.run`` :func:`stop_on_signals` takes over.
    Only in the main thread; the previous handler comes back at the end.
    """

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
