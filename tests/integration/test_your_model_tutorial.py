"""docs/your-model.md run as written, in a folder outside the repository, against real brokers.

The tutorial is a list of fenced blocks, run in order in an empty temporary
folder (the user's own: their module is there, never in fedtier):

* a block whose info string names a file (````` ```python title=mymodels.py `````)
  is written to that file;
* an ``sh`` block is run with bash, as in ``test_local_recipe.py``, whose
  comment syntax it shares: ``recipe: skip`` (the ``cd`` into the folder),
  ``recipe: background ready="REGEX"`` (a broker or a daemon in a terminal of
  its own), ``recipe: expect="REGEX"`` (its output must match);
  ``wait="NAME" until="REGEX"`` first waits, with a deadline, until the log
  of background process NAME matches (what the text tells the user to wait
  for).

The only changes are the ones ``test_local_recipe.py`` makes to the recipe's
files: free ports instead of the fixed ones, in every config the user writes
or copies, and ``user root`` in mosquitto.conf when run as root. ``FEDTIER``,
which the tutorial asks the user to set, is the checkout. Then the test checks
what the tutorial says the user sees: a report naming the data and its
metric, versions with evaluation metrics, and an exported ``.pt`` that loads in
plain torch and predicts exactly what the version's parameters predict inside
fedtier.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

import numpy as np
import pytest
import torch  # make test installs fedtier[torch]: a missing torch is a failure, not a skip
import trio

from fedtier.simulations.processes import Child, open_process_group
from fedtier.simulations.testing import DEPLOY_DIR, find_mosquitto, find_nats_server
from tests.integration.test_local_recipe import (
    PORTS,
    _free_port,
    _with_ports,
    run_step,
    start_in_background,
)

pytestmark = pytest.mark.brokers

REPO: Final = DEPLOY_DIR.parent
TUTORIAL: Final = REPO / "docs" / "your-model.md"
STEP_TIMEOUT_S: Final = 60.0
DAEMONS: Final = ("central", "regional", "edge")
VERSION: Final = 5
"""The version the tutorial exports: v0, three updates by the CLI, two from Python."""

_BLOCK: Final = re.compile(
    r"(?:<!--\s*recipe:\s*(?P<note>.*?)\s*-->\s*\n)?"
    r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$",
    re.S | re.M,
)
_ATTR: Final = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_TITLE: Final = re.compile(r"\btitle=(?:\"([^\"]+)\"|(\S+))")


@dataclass(frozen=True)
class Step:
    """One block of the tutorial: a file to write or commands to run."""

    mode: str  # "file", "run", "background" or "skip"
    body: str
    file: str | None = None
    ready: str | None = None
    expect: str | None = None
    wait: str | None = None
    until: str | None = None


def read_steps(doc: Path) -> list[Step]:
    """The tutorial's file blocks and ``sh`` blocks, in order; other blocks are output."""
    steps = []
    for block in _BLOCK.finditer(doc.read_text()):
        info = block["info"].strip()
        title = _TITLE.search(info)
        if title is not None:
            assert block["note"] is None, f"a file block takes no recipe comment: {info}"
            steps.append(Step("file", block["body"], file=title[1] or title[2]))
            continue
        if info != "sh":
            continue
        note = block["note"] or ""
        attrs = dict(_ATTR.findall(note))
        mode = _ATTR.sub("", note).strip() or "run"
        assert mode in ("run", "background", "skip"), f"unknown recipe step: {note}"
        assert mode != "background" or "ready" in attrs, f"a background step needs ready=: {note}"
        assert ("wait" in attrs) == ("until" in attrs), f"wait= goes with until=: {note}"
        steps.append(
            Step(
                mode,
                block["body"],
                ready=attrs.get("ready"),
                expect=attrs.get("expect"),
                wait=attrs.get("wait"),
                until=attrs.get("until"),
            )
        )
    return steps


def localise(workdir: Path, ports: dict[int, int]) -> None:
    """The configs in ``workdir`` on the test's ports (and Mosquitto told to stay root)."""
    for path in workdir.iterdir():
        if path.suffix in (".toml", ".conf"):
            text = path.read_text()
            changed = _with_ports(text, ports)
            if changed != text:
                path.write_text(changed)
    conf = workdir / "mosquitto.conf"
    if os.geteuid() == 0 and conf.is_file() and "\nuser root\n" not in conf.read_text():
        # What mosquitto.conf tells a root user to add.
        assert "Add the line `user root`" in conf.read_text()
        conf.write_text(conf.read_text() + "user root\n")


async def wait_for_log(child: Child, pattern: str, *, timeout_s: float) -> None:
    """Wait until ``child``'s log matches ``pattern``; its output is written as it comes."""
    delay_s = 0.01
    with trio.move_on_after(timeout_s):
        while not re.search(pattern, child.log_path.read_text()):
            assert child.returncode is None, child.describe_exit()
            await trio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.2)
        return
    raise AssertionError(f"{pattern!r} not in {child.name}'s log: {child.describe_exit()}")


def user_module(workdir: Path, name: str) -> ModuleType:
    """The user's own module from their folder, without putting the folder on sys.path."""
    spec = importlib.util.spec_from_file_location(f"tutorial_{name}", workdir / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tutorial_names_its_steps() -> None:
    steps = read_steps(TUTORIAL)
    files = [s.file for s in steps if s.mode == "file"]
    assert files[:2] == ["make_data.py", "mymodels.py"]
    assert {"scenario.toml", "central.toml", "device-1.toml", "my_device.py", "predict.py"} <= set(
        files
    )
    commands = "\n".join(s.body for s in steps if s.mode == "run")
    for command in (
        "fedtier sim run scenario.toml --out out/sim",
        "fedtier keys new",
        "fedtier model init --model mymodels:make_model",
        "fedtier device --config device-1.toml",
        "python my_device.py",
        "fedtier model list --config central.toml",
        f"fedtier model export {VERSION} --config central.toml --format pt",
        "python predict.py",
    ):
        assert command in commands, command
    background = [s.body.strip() for s in steps if s.mode == "background"]
    assert background == [
        "mosquitto -c mosquitto.conf",
        "nats-server -c nats-server.conf",
        "fedtier central --config central.toml",
        "fedtier regional --config regional.toml",
        "fedtier edge --config edge.toml",
    ]


async def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    workdir = tmp_path / "wine"
    workdir.mkdir()
    assert not workdir.resolve().is_relative_to(REPO.resolve())
    ports = {port: _free_port() for port in PORTS}
    # The tools as the tutorial assumes them: fedtier, python and nats-server
    # from the active virtual environment, mosquitto wherever it is installed.
    path = os.pathsep.join(
        [
            str(Path(sys.executable).parent),
            str(find_nats_server().parent),
            str(find_mosquitto().parent),
            os.environ.get("PATH", ""),
        ]
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PYTHONPATH")},
        "PATH": path,
        "FEDTIER": str(REPO),
    }
    started: dict[str, Child] = {}
    outputs: dict[str, str] = {}
    with trio.fail_after(240):
        async with open_process_group(tmp_path / "logs", env=env, stop_grace_s=20) as group:
            for number, step in enumerate(read_steps(TUTORIAL)):
                if step.mode == "skip":
                    continue
                if step.mode == "file":
                    assert step.file is not None
                    (workdir / step.file).write_text(step.body)
                    localise(workdir, ports)
                    continue
                commands = _with_ports(step.body, ports)
                if step.mode == "background":
                    assert step.ready is not None
                    name, child = await start_in_background(
                        group, commands, workdir, step.ready, timeout_s=STEP_TIMEOUT_S
                    )
                    started[name] = child
                    continue
                if step.wait is not None:
                    assert step.until is not None
                    await wait_for_log(started[step.wait], step.until, timeout_s=STEP_TIMEOUT_S)
                output = await run_step(
                    number, commands, workdir, env, step.expect, timeout_s=STEP_TIMEOUT_S
                )
                localise(workdir, ports)  # configs the step copied in
                outputs[commands.strip()] = output

            # What the user is told to look at, checked before the daemons stop.
            listing = await trio.run_process(
                ["fedtier", "model", "list", "--config", "central.toml", "--json"],
                cwd=workdir,
                env=env,
                capture_stdout=True,
            )
            central_log = started["central"].log_path.read_text()
            daemons = [started[name] for name in reversed(DAEMONS)]
            await group.stop(daemons, grace_s=20, sig=signal.SIGINT)
            for child in daemons:
                assert child.returncode == 0, child.describe_exit()
                await child.stderr_done.wait()
                assert "shut down cleanly" in child.log_path.read_text(), child.describe_exit()

    # The simulation's report names the user's data and its metric.
    report = (workdir / "out/sim/report.md").read_text()
    assert "data.csv (CSV), label 'cultivar' (classification)" in report
    assert "| final test accuracy |" in report
    assert "kept on the devices by batchnorm local (FedBN)" in report
    assert "test_accuracy" in (workdir / "out/sim/metrics.csv").read_text().splitlines()[0]
    assert "wine (my loader)" in (workdir / "out/shards/report.md").read_text()

    # Every version the tutorial made, v5 with its evaluation on test.csv.
    versions = {row["version"]: row for row in json.loads(listing.stdout)["versions"]}
    assert sorted(versions) == list(range(VERSION + 1))
    assert set(versions[VERSION]["metrics"]) == {"accuracy", "loss"}
    assert re.search(r"model v\d+ made from epoch", central_log), central_log
    assert f"model v{VERSION} evaluated" in central_log

    # The exported .pt loads in plain torch and predicts what the version's
    # parameters predict inside fedtier: loaded from the npz export into the
    # factory's module, and through the central's own evaluator.
    from fedtier.client.evaluation import predict
    from fedtier.tiers.config import load_initial_model

    make_model = user_module(workdir, "mymodels").make_model
    table = np.loadtxt(workdir / "test.csv", delimiter=",", skiprows=1, dtype=np.float32)
    X, y = table[:, :-1], table[:, -1]
    exported = make_model()
    exported.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    exported.eval()
    with torch.no_grad():
        from_pt = exported(torch.from_numpy(X)).numpy()

    with np.load(workdir / "model-v5.npz", allow_pickle=False) as archive:
        tensors = {name: torch.from_numpy(archive[name]) for name in archive.files}
    from_npz_model = make_model()
    missing, unexpected = from_npz_model.load_state_dict(tensors, strict=False)
    assert not unexpected
    # BatchNorm stays on the devices (FedBN): the version leaves the factory's.
    # (torch fills in a missing num_batches_tracked itself, as for old checkpoints.)
    assert sorted(missing) == ["1.bias", "1.running_mean", "1.running_var", "1.weight"]
    from_npz_model.eval()
    with torch.no_grad():
        from_npz = from_npz_model(torch.from_numpy(X)).numpy()
    np.testing.assert_array_equal(from_pt, from_npz)

    layout, params = load_initial_model(workdir / "model-v5.npz")
    inside = predict(make_model(), params, layout, X)
    np.testing.assert_allclose(from_pt, inside, rtol=0, atol=1e-6)

    # ... and predict.py's accuracy is the one the central recorded for v5.
    printed = re.search(r"accuracy on test\.csv: ([0-9.]+)", outputs["python predict.py"])
    assert printed is not None
    accuracy = float(np.mean(from_pt.argmax(axis=1) == y))
    assert float(printed[1]) == pytest.approx(accuracy, abs=1e-4)
    assert versions[VERSION]["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
