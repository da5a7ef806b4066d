"""deploy/local/README.md run as written: its commands make a mesh where an update makes a version.

The README's ``sh`` blocks are the steps, in order, run in a copy of
``deploy/local`` with bash. An HTML comment before a block (invisible when the
README is rendered) says how: ``recipe: skip`` (the ``cd`` into the folder),
``recipe: background ready="REGEX"`` (a terminal that keeps running: a broker
or a daemon, ready once its log matches), ``recipe: expect="REGEX"`` (runs to
its end, exit 0, and its output must match). Blocks without a comment run to
their end with exit 0. The only changes to the copy are the ones the recipe's
own files name: other port numbers (a test may not take the fixed ports) and,
as root, ``user root`` in mosquitto.conf.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import trio

from fedtier.simulations.processes import Child, ProcessGroup, open_process_group
from fedtier.simulations.testing import DEPLOY_DIR, find_mosquitto, find_nats_server, free_port

pytestmark = pytest.mark.brokers

RECIPE: Final = DEPLOY_DIR / "local"
PORTS: Final = (1884, 4222, 8222, 9464, 9465, 9466)
"""Every port the recipe uses; each one is replaced by a free one in the copy."""
STEP_TIMEOUT_S: Final = 40.0
DAEMONS: Final = ("central", "regional", "edge")

_BLOCK: Final = re.compile(
    r"(?:<!--\s*recipe:\s*(?P<note>.*?)\s*-->\s*\n)?```sh\n(?P<body>.*?)```", re.S
)
_ATTR: Final = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Step:
    """One ``sh`` block of the README and how to run it."""

    commands: str
    mode: str  # "run", "background" or "skip"
    ready: str | None = None
    expect: str | None = None


def read_steps(readme: Path) -> list[Step]:
    """The README's ``sh`` blocks, in order."""
    steps = []
    for block in _BLOCK.finditer(readme.read_text()):
        note = block["note"] or ""
        attrs = dict(_ATTR.findall(note))
        mode = _ATTR.sub("", note).strip() or "run"
        assert mode in ("run", "background", "skip"), f"unknown recipe step: {note}"
        assert mode != "background" or "ready" in attrs, f"a background step needs ready=: {note}"
        steps.append(Step(block["body"], mode, attrs.get("ready"), attrs.get("expect")))
    return steps


def _free_port() -> int:
    return free_port()


def _with_ports(text: str, ports: dict[int, int]) -> str:
    for old, new in ports.items():
        text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
    return text


def copy_recipe(dest: Path, ports: dict[int, int]) -> Path:
    """``deploy/local`` copied to ``dest``, on other ports (and as root, Mosquitto told to stay)."""
    shutil.copytree(RECIPE, dest, ignore=shutil.ignore_patterns("keys", "data", "models", "state"))
    for path in dest.iterdir():
        if path.suffix in (".toml", ".conf"):
            path.write_text(_with_ports(path.read_text(), ports))
    if os.geteuid() == 0:
        # What mosquitto.conf tells a root user to add.
        conf = dest / "mosquitto.conf"
        assert "Add the line `user root`" in conf.read_text()
        conf.write_text(conf.read_text() + "user root\n")
    return dest


async def start_in_background(
    group: ProcessGroup,
    commands: str,
    workdir: Path,
    ready: str,
    *,
    timeout_s: float = STEP_TIMEOUT_S,
) -> tuple[str, Child]:
    """Start a documented long-running step (a daemon, a broker) and wait for its ready line.

    It is named after the command (``fedtier central ...`` -> ``central``).
    """
    words = commands.split()
    name = words[1] if commands.startswith("fedtier ") else words[0]
    argv = ["bash", "-c", f"cd {shlex.quote(str(workdir))} && exec {commands.strip()}"]
    child = await group.start(name, argv, ready_pattern=ready)
    await group.wait_ready([child], timeout_s=timeout_s)
    return name, child


async def run_step(
    number: int,
    commands: str,
    workdir: Path,
    env: dict[str, str],
    expect: str | None,
    *,
    timeout_s: float = STEP_TIMEOUT_S,
) -> str:
    """Run a documented step to its end, as a user would in bash; check and return its output."""
    with trio.move_on_after(timeout_s) as deadline:
        result = await trio.run_process(
            ["bash", "-euo", "pipefail", "-c", commands],
            cwd=workdir,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert not deadline.cancelled_caught, f"step {number} did not end: {commands}"
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert result.returncode == 0, f"step {number} failed: {commands}\n{output}"
    if expect is not None:
        assert re.search(expect, output), f"step {number}: {expect!r} not in\n{output}"
    return output


def test_the_readme_names_its_steps() -> None:
    steps = read_steps(RECIPE / "README.md")
    background = [s.commands.strip() for s in steps if s.mode == "background"]
    assert background == [
        "mosquitto -c mosquitto.conf",
        "nats-server -c nats-server.conf",
        "fedtier central --config central.toml",
        "fedtier regional --config regional.toml",
        "fedtier edge --config edge.toml",
    ]
    assert any("fedtier keys new" in s.commands for s in steps)
    assert any("fedtier model init" in s.commands for s in steps)
    assert any(s.expect and "fedtier device" in s.commands for s in steps)


async def test_the_local_recipe_runs_as_written(tmp_path: Path) -> None:
    ports = {port: _free_port() for port in PORTS}
    workdir = copy_recipe(tmp_path / "local", ports)
    # The tools as the README assumes them: fedtier, python and nats-server from
    # the active virtual environment, mosquitto wherever it is installed.
    path = os.pathsep.join(
        [
            str(Path(sys.executable).parent),
            str(find_nats_server().parent),
            str(find_mosquitto().parent),
            os.environ.get("PATH", ""),
        ]
    )
    env = {**{k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}, "PATH": path}
    started: dict[str, Child] = {}
    with trio.fail_after(120):
        async with open_process_group(tmp_path / "logs", env=env, stop_grace_s=20) as group:
            for number, step in enumerate(read_steps(RECIPE / "README.md")):
                commands = _with_ports(step.commands, ports)
                if step.mode == "skip":
                    continue
                if step.mode == "background":
                    assert step.ready is not None
                    name, child = await start_in_background(group, commands, workdir, step.ready)
                    started[name] = child
                    continue
                await run_step(number, commands, workdir, env, step.expect)
            # The device's updates made new versions: the central says so too.
            central_log = started["central"].log_path.read_text()
            assert re.search(r"model v1 made from epoch 0", central_log), central_log
            # Ctrl-C in each terminal: the daemons stop cleanly, status 0.
            daemons = [started[name] for name in reversed(DAEMONS)]
            await group.stop(daemons, grace_s=20, sig=signal.SIGINT)
            for child in daemons:
                assert child.returncode == 0, child.describe_exit()
                await child.stderr_done.wait()
                assert "shut down cleanly" in child.log_path.read_text(), child.describe_exit()
