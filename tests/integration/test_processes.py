"""Supervised children: readiness from a log line, ordered stop, nothing left behind on cancel."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from fedtier.protocol.errors import ChildFailed
from fedtier.simulations.processes import (
    open_process_group,
    sigterm_as_interrupt,
    stop_on_signals,
)

# A child that logs readiness, then waits for SIGTERM and logs that too.
_POLITE = """
import signal, sys, time
def bye(*_):
    print("got SIGTERM", file=sys.stderr, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print('{"n": 1}', flush=True)
print("child ready", file=sys.stderr, flush=True)
signal.pause()
"""
# A child that ignores SIGTERM: only SIGKILL ends it.
_STUBBORN = """
import signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("child ready", file=sys.stderr, flush=True)
while True:
    signal.pause()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_ready_then_stop_in_order_keeps_the_last_log_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    with trio.fail_after(20):
        async with open_process_group(tmp_path) as group:
            child = await group.start(
                "polite",
                [sys.executable, "-c", _POLITE],
                ready_pattern="child ready",
                on_stdout_line=lines.append,
            )
            await group.wait_ready([child], timeout_s=10)
            await group.stop([child], grace_s=5)
            assert child.returncode == 0
    assert "got SIGTERM" in (tmp_path / "polite.log").read_text()
    assert lines == ['{"n": 1}']


async def test_stubborn_children_are_killed_when_the_group_is_cancelled(tmp_path: Path) -> None:
    pids = []
    with trio.fail_after(20):
        with trio.move_on_after(60) as scope:
            async with open_process_group(tmp_path, stop_grace_s=0.5) as group:
                for name in ("a", "b"):
                    child = await group.start(
                        name, [sys.executable, "-c", _STUBBORN], ready_pattern="child ready"
                    )
                    pids.append(child.process.pid)
                await group.wait_ready(group.children, timeout_s=10)
                scope.cancel()
                await trio.sleep_forever()
    assert pids
    assert not any(_alive(pid) for pid in pids)


async def test_a_child_that_exits_before_ready_is_one_sentence(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_process_group(tmp_path) as group:
            child = await group.start(
                "broken",
                [
                    sys.executable,
                    "-c",
                    "import sys; print('no config', file=sys.stderr); sys.exit(2)",
                ],
                ready_pattern="never",
            )
            with pytest.raises(ChildFailed, match=r"broken exited with status 2.*no config"):
                await group.wait_ready([child], timeout_s=10)


async def test_sigterm_stops_a_lab_command_and_every_child_it_started(tmp_path: Path) -> None:
    # What a bench does when killed: its children are stopped by their group's
    # cleanup before it exits, never left running.
    pids: list[int] = []

    async def run() -> None:
        async with open_process_group(tmp_path) as group:
            child = await group.start(
                "polite", [sys.executable, "-c", _POLITE], ready_pattern="child ready"
            )
            await group.wait_ready([child], timeout_s=10)
            pids.append(child.process.pid)
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep_forever()

    with trio.fail_after(20), pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        await stop_on_signals(run)
    assert pids
    assert not _alive(pids[0])
    assert "got SIGTERM" in (tmp_path / "polite.log").read_text()


async def test_stop_on_signals_returns_the_result_when_no_signal_comes() -> None:
    async def run() -> int:
        await trio.sleep(0)
        return 42

    assert await stop_on_signals(run) == 42


def test_sigterm_outside_trio_runs_the_finally_blocks_then_the_old_handler_is_back() -> None:
    cleaned: list[str] = []
    before = signal.getsignal(signal.SIGTERM)

    def bench() -> None:
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()  # not reached: the handler raises first
            finally:
                cleaned.append("broker stopped")

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        bench()
    assert cleaned == ["broker stopped"]
    assert signal.getsignal(signal.SIGTERM) == before
